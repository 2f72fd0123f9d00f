//! Bar charts as inline SVG, drawn on the server: no script, no library,
//! nothing loaded.

use maud::{Markup, html};

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 110.0;

/// One bar per point (oldest first), scaled to the largest; `unit` labels
/// the maximum.
pub fn bars(title: &str, points: &[f64], unit: &str) -> Markup {
    let max = points.iter().cloned().fold(0.0_f64, f64::max);
    let n = points.len().max(1) as f64;
    let step = WIDTH / n;
    let label = format!("max {max:.0} {unit}");
    html! {
        figure.chart {
            figcaption.title { (title) " — " (label) }
            svg width=(WIDTH) height=(HEIGHT + 14.0) viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 14.0) }
                role="img" aria-label=(title) {
                line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) stroke="#8894a3" stroke-width="1" {}
                @for (i, v) in points.iter().enumerate() {
                    @let h = if max > 0.0 { v / max * (HEIGHT - 4.0) } else { 0.0 };
                    rect x=(format!("{:.1}", i as f64 * step + 0.5))
                        y=(format!("{:.1}", HEIGHT - h))
                        width=(format!("{:.1}", (step - 1.0).max(0.5)))
                        height=(format!("{h:.1}")) fill="#1f5fa8" {
                        title { (format!("{} min ago: {v:.0} {unit}", points.len() - i)) }
                    }
                }
                text x="0" y=(HEIGHT + 12.0) font-size="10" fill="#5b6470" { "-60m" }
                text x=(WIDTH - 22.0) y=(HEIGHT + 12.0) font-size="10" fill="#5b6470" { "now" }
            }
        }
    }
}
