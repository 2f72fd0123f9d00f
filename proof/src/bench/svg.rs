//! `latency.svg`: empirical CDFs on a log time axis, written by hand (no
//! plotting dependency). One line per series; the p50 and p99 of each are
//! where its line crosses the dashed guides.

use std::fmt::Write;

use super::stats::cdf;

pub struct Series<'a> {
    pub label: String,
    pub samples_ms: &'a [f64],
    pub colour: &'static str,
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

pub fn cdf_chart(title: &str, series: &[Series<'_>]) -> String {
    let all = series.iter().flat_map(|s| s.samples_ms.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo_decade = lo.max(0.01).log10().floor();
    let hi_decade = hi.max(lo).log10().ceil().max(lo_decade + 1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ms: f64| LEFT + (ms.max(0.01).log10() - lo_decade) / (hi_decade - lo_decade) * plot_w;
    let y = |p: f64| TOP + (1.0 - p) * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"##,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    // Grid: decades on x, tenths on y, dashed p50/p99 guides.
    let mut decade = lo_decade;
    while decade <= hi_decade {
        let ms = 10f64.powf(decade);
        let px = x(ms);
        let label = if ms < 1.0 {
            format!("{ms}")
        } else {
            format!("{ms:.0}")
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label} ms</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
        decade += 1.0;
    }
    for tenth in 0..=10 {
        let p = f64::from(tenth) / 10.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{p:.1}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y(p) + 4.0,
            py = y(p)
        );
    }
    for p in [0.5, 0.99] {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#999" stroke-dasharray="4 4"/><text x="{:.1}" y="{:.1}" fill="#666">p{}</text>"##,
            LEFT + plot_w,
            LEFT + 4.0,
            y(p) - 3.0,
            (p * 100.0) as u32,
            py = y(p)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (log scale)</text>
<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">fraction of operations ≤ x</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = cdf(s.samples_ms, 400)
            .into_iter()
            .map(|(ms, p)| format!("{:.1},{:.1}", x(ms), y(p)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"##,
            s.colour,
            points.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 36.0;
        let lx = LEFT + plot_w + 16.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            lx + 22.0,
            s.colour,
            lx + 28.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
