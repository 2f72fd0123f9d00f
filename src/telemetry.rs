//! Logging set-up, in one place: `RUST_LOG` filters, `LOG_FORMAT=json`
//! switches to one JSON object per line for log shippers. Logs go to stderr
//! so command output on stdout stays machine-readable.
//!
//! One event is one line, whatever its fields hold: a field's text (an
//! error quoting a server, a resource id from a row any writer wrote) is
//! escaped by [`crate::display`] in the text format, so a newline in it
//! cannot forge a second log line and an ANSI sequence cannot repaint the
//! operator's terminal. The JSON format escapes control characters itself.
//! Colours only go to a terminal (and not with `NO_COLOR`), so a log file
//! holds no escape sequence of ours either.

use std::fmt::Write as _;
use std::io::IsTerminal;

use tracing::field::Field;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

pub fn init() {
    // pg_walstream logs every status update the relay sends at info.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,pg_walstream=warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour && !json);
    // A second init (tests) is harmless; ignore its error.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.fmt_fields(escaped_fields()).try_init()
    };
}

/// The text format's fields, each value escaped: `message` as it is,
/// others as `name=value`, separated by spaces (as the default formatter
/// writes them).
pub fn escaped_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(
        |writer: &mut Writer<'_>, field: &Field, value: &dyn std::fmt::Debug| {
            let mut text = String::new();
            write!(text, "{value:?}")?;
            let text = crate::display::escape(&text);
            match field.name() {
                "message" => write!(writer, "{text}"),
                name => write!(writer, "{}={text}", name.strip_prefix("r#").unwrap_or(name)),
            }
        },
    )
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_field_can_neither_forge_a_line_nor_paint_the_terminal() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(escaped_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                resource = %"task:t1\u{202e}",
                error = %"HTTP 400: bad\n2026-01-01T00:00:00Z  INFO forged\u{1b}[2J",
                id = "quoted\r",
                "row is dead"
            )
        });
        let text = String::from_utf8_lossy(&captured.0.lock().expect("lock")).to_string();
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with('\n'), "{text:?}");
        assert!(
            !text.trim_end().chars().any(crate::display::needs_escape),
            "{text:?}"
        );
        assert!(text.contains("row is dead"), "{text:?}");
        assert!(text.contains("resource=task:t1\\u{202e}"), "{text:?}");
        assert!(
            text.contains("error=HTTP 400: bad\\n2026-01-01T00:00:00Z  INFO forged\\u{1b}[2J"),
            "{text:?}"
        );
        assert!(text.contains("id=\"quoted\\r\""), "{text:?}");
    }
}
