//! Text from outside the process, as it may be shown: a server's answer (an
//! agentex-auth error body, a SpiceDB status message), a row any writer
//! wrote (a resource type or id, a stored `last_error`), a configuration
//! file (a TOML parse error quotes the offending line), a URL that may hold
//! a password. One door for all of it, so that no output path — a
//! terminal, a text log line, a row's `last_error`, a report table — can
//! forget it.
//!
//! Characters a terminal or a log viewer *acts on* (ANSI escapes, carriage
//! returns, newlines that forge a second log line, bidirectional overrides
//! that reorder what is read, zero-width characters that hide text) are
//! written as visible escapes (`\u{1b}`, `\n`) rather than dropped: an
//! operator debugging a dead row sees what the server really answered, and
//! two different ids never look the same. A backslash is left as it is, so
//! escaping is idempotent: text escaped once (a stored `last_error`) shows
//! the same when escaped again on the way out.

use std::borrow::Cow;
use std::fmt;

use url::Url;

/// The longest error stored on a row or shown as one line, in characters,
/// the ellipsis included.
pub const MAX_ERROR_CHARS: usize = 512;

/// What ends a text that was cut.
pub const ELLIPSIS: char = '…';

/// Whether `c` is shown as an escape: control characters (C0, DEL, C1),
/// and the invisible format characters and separators that change how the
/// text around them is laid out or read.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'                          // soft hyphen
            | '\u{61c}'                       // Arabic letter mark
            | '\u{180e}'                      // Mongolian vowel separator
            | '\u{200b}'..='\u{200f}'         // zero-width space/joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}'         // line and paragraph separators
            | '\u{202a}'..='\u{202e}'         // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'         // word joiner, invisible operators
            | '\u{2066}'..='\u{206f}'         // bidi isolates, deprecated formats
            | '\u{feff}'                      // zero-width no-break space (BOM)
            | '\u{fff9}'..='\u{fffb}'         // interlinear annotations
            | '\u{e0001}' | '\u{e0020}'..='\u{e007f}' // tag characters
        )
}

/// The characters `c` is shown as.
fn escaped_len(c: char) -> usize {
    match c {
        '\n' | '\r' | '\t' => 2,
        c if needs_escape(c) => {
            // `\u{` + hex digits + `}`
            let digits = (32 - (c as u32 | 1).leading_zeros()).div_ceil(4) as usize;
            4 + digits
        }
        _ => 1,
    }
}

fn write_escaped(out: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        c if needs_escape(c) => write!(out, "\\u{{{:x}}}", c as u32),
        c => out.write_char(c),
    }
}

/// `text` with every character of [`needs_escape`] written as a visible
/// escape; borrowed when there is none (the common case). Not bounded: for
/// identifiers (a resource id) whose every character matters.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        // Writing to a String cannot fail.
        let _ = write_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// `text` as one line of at most `max` characters: surrounding whitespace
/// trimmed, escaped as [`escape`] does, and, when longer, cut (never inside
/// an escape) and ended with [`ELLIPSIS`].
pub fn line(text: &str, max: usize) -> String {
    if max == 0 {
        return String::new();
    }
    let text = text.trim();
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut shown = 0;
    // Where the text is cut if it turns out too long: the ellipsis must fit.
    let mut cut = None;
    for c in text.chars() {
        let n = escaped_len(c);
        if cut.is_none() && shown + n > max - 1 {
            cut = Some(out.len());
        }
        if shown + n > max {
            out.truncate(cut.unwrap_or(0));
            out.push(ELLIPSIS);
            return out;
        }
        let _ = write_escaped(&mut out, c);
        shown += n;
    }
    out
}

/// An error (ours, a server's, a stored one) as one line of at most
/// [`MAX_ERROR_CHARS`]: what a row's `last_error`, a log line and the CLI's
/// `error:` line hold.
pub fn error_line(text: &str) -> String {
    line(text, MAX_ERROR_CHARS)
}

/// [`escape`] as a `Display`, for format strings and tracing fields, with
/// no allocation: `tracing::info!(resource = %Escaped(&id), ...)`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(needs_escape) {
            return f.pad(self.0);
        }
        // Padding (`{:<48}` in a table) counts the escaped characters.
        f.pad(&escape(self.0))
    }
}

/// A URL as it may be shown: without user-info (`user:password@`). Text
/// that does not parse as a URL is not shown at all past its scheme.
/// Escaped like any other text from outside.
pub fn redact_url(raw: &str) -> String {
    let shown = match Url::parse(raw) {
        // `user:pass@host` parses as scheme `user` and an opaque path.
        Ok(url) if url.host().is_none() && raw.contains('@') => "<redacted>".into(),
        Ok(mut url) => {
            if !url.username().is_empty() || url.password().is_some() {
                let _ = url.set_username("");
                let _ = url.set_password(None);
            }
            url.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}"),
                None => raw.to_string(),
            },
            None if raw.contains('@') => "<redacted>".into(),
            None => raw.to_string(),
        },
    };
    escape(&shown).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_terminal_acts_on_is_shown_escaped() {
        assert_eq!(
            escape("a\u{1b}[31mred\u{1b}[0m\r\nb\u{7}\u{0}c\td"),
            "a\\u{1b}[31mred\\u{1b}[0m\\r\\nb\\u{7}\\u{0}c\\td"
        );
        assert_eq!(escape("x\u{202e}evil\u{2066}"), "x\\u{202e}evil\\u{2066}");
        assert_eq!(escape("\u{9b}2J\u{7f}"), "\\u{9b}2J\\u{7f}");
        assert_eq!(
            escape("zero\u{200b}width\u{feff}"),
            "zero\\u{200b}width\\u{feff}"
        );
        assert_eq!(escape("line\u{2028}sep"), "line\\u{2028}sep");
        assert!(matches!(escape("plain text: ü, 日本, é"), Cow::Borrowed(_)));
    }

    #[test]
    fn escaping_is_idempotent() {
        let once = escape("a\u{1b}b\nc\\d").into_owned();
        assert_eq!(escape(&once), once);
        assert_eq!(line(&once, 100), once);
    }

    #[test]
    fn a_line_is_bounded_and_marked_when_cut() {
        assert_eq!(line("  short \n", 10), "short");
        let long = "x".repeat(600);
        let cut = error_line(&long);
        assert_eq!(cut.chars().count(), MAX_ERROR_CHARS);
        assert!(cut.ends_with(ELLIPSIS));
        assert_eq!(line("abcdef", 6), "abcdef", "exactly max is not cut");
        assert_eq!(line("abcdefg", 6), "abcde…");
        // An escape is never cut in half.
        assert_eq!(line("abc\u{1b}defgh", 8), "abc…");
        for max in 1..40 {
            let shown = line("a\u{1b}b\u{202e}c\nd efghijklmnopqrstuvwxyz", max);
            assert!(shown.chars().count() <= max, "{max}: {shown}");
            assert!(!shown.chars().any(needs_escape), "{max}: {shown}");
        }
        assert_eq!(escaped_len('\u{1b}'), "\\u{1b}".len());
        assert_eq!(escaped_len('\u{e007f}'), "\\u{e007f}".len());
        assert_eq!(escaped_len('\u{0}'), "\\u{0}".len());
    }

    #[test]
    fn escaped_pads_by_what_is_shown() {
        assert_eq!(format!("[{:<6}]", Escaped("ab")), "[ab    ]");
        assert_eq!(format!("[{:<8}]", Escaped("a\nb")), "[a\\nb    ]");
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("https://svc:hunter2@auth.example/x"),
            "https://auth.example/x"
        );
        assert!(!redact_url("http://svc:hunter2@auth:notaport").contains("hunter2"));
        assert!(!redact_url("svc:hunter2@auth").contains("hunter2"));
        assert_eq!(redact_url("http://auth:8080"), "http://auth:8080/");
        assert_eq!(redact_url("http://a\u{1b}b:1"), "http://a\\u{1b}b:1");
    }
}
