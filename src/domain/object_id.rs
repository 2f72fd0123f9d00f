//! The `authz-outbox` object-id encoding: how a selector SpiceDB cannot hold
//! verbatim (`run-schedule::a1::s1`) is stored as an object id, reversibly.
//!
//! SpiceDB object ids allow only `[a-zA-Z0-9/_|\-=+]` (at most 1,024
//! characters). Every UTF-8 byte in `[a-zA-Z0-9/_|\-+]` is kept; every
//! other byte, `=` included (it is the escape), becomes `=` and two
//! upper-case hex digits. UUIDs and other plain ids are unchanged, so ids
//! written before the encoding existed still read back as themselves.
//! Decoding is strict (lower-case hex, an escape of a byte that needed
//! none, a dangling `=`, non-UTF-8 are errors), so every object id has at
//! most one selector: the mapping is a bijection.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectIdError {
    #[error("selector is empty")]
    Empty,
    #[error("encoded object id is {0} characters; SpiceDB allows at most 1024")]
    TooLong(usize),
    #[error("object id {0:?} is not in the authz-outbox encoding")]
    NotEncoded(String),
}

/// The longest object id SpiceDB accepts.
pub const MAX_OBJECT_ID: usize = 1024;

fn kept(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'|' | b'-' | b'+')
}

/// The object id for a selector.
pub fn encode(selector: &str) -> Result<String, ObjectIdError> {
    if selector.is_empty() {
        return Err(ObjectIdError::Empty);
    }
    let mut out = String::with_capacity(selector.len());
    for &b in selector.as_bytes() {
        if kept(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.len() > MAX_OBJECT_ID {
        return Err(ObjectIdError::TooLong(out.len()));
    }
    Ok(out)
}

/// The selector an object id was encoded from.
pub fn decode(object_id: &str) -> Result<String, ObjectIdError> {
    let bad = || ObjectIdError::NotEncoded(object_id.chars().take(80).collect());
    if object_id.is_empty() {
        return Err(ObjectIdError::Empty);
    }
    let bytes = object_id.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'=' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            if !hex
                .iter()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))
            {
                return Err(bad());
            }
            let text = std::str::from_utf8(hex).map_err(|_| bad())?;
            let value = u8::from_str_radix(text, 16).map_err(|_| bad())?;
            if kept(value) {
                return Err(bad());
            }
            out.push(value);
            i += 3;
        } else if kept(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(bad());
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_are_unchanged_and_others_escaped() {
        let uuid = "3f2b8c1e-9a4d-4e8f-b1c2-0d9e8f7a6b5c";
        assert_eq!(encode(uuid).as_deref(), Ok(uuid));
        assert_eq!(
            encode("run-schedule::a1::s1").as_deref(),
            Ok("run-schedule=3A=3Aa1=3A=3As1")
        );
        assert_eq!(encode("a=b").as_deref(), Ok("a=3Db"));
        assert_eq!(encode("*").as_deref(), Ok("=2A"));
        assert_eq!(encode("é").as_deref(), Ok("=C3=A9"));
    }

    #[test]
    fn round_trips() {
        for s in [
            "run-schedule::a1::s1",
            "a=b",
            "=3A",
            "x y\tz",
            "é/ü|+",
            "*",
            "a::",
        ] {
            assert_eq!(
                decode(&encode(s).expect("encodes")).as_deref(),
                Ok(s),
                "{s}"
            );
        }
    }

    #[test]
    fn decoding_is_strict() {
        for bad in ["a=3a", "a=", "a=4", "=41", "a b", "=C3", "a:b"] {
            assert!(decode(bad).is_err(), "{bad}");
        }
        assert_eq!(encode(""), Err(ObjectIdError::Empty));
        assert_eq!(encode(&":".repeat(400)), Err(ObjectIdError::TooLong(1200)));
    }
}
