//! The `authz-outbox` object-id encoding: how a host selector becomes a
//! SpiceDB object id and back.
//!
//! # Why
//!
//! SpiceDB object ids may hold only `[a-zA-Z0-9/_|\-=+]`, at most 1,024 of
//! them. Most host selectors are UUIDs and fit, but a schedule's selector is
//! `run-schedule::<agent_id>::<id>`, and `:` is not allowed. Whatever writes
//! such a selector into SpiceDB has to encode it, and whatever reads SpiceDB
//! back (reconcile) has to decode it the same way, so the mapping must be
//! reversible and have exactly one encoded form per selector: two spellings
//! of one selector would be two different objects in SpiceDB, and reconcile
//! would see one of them as drift forever.
//!
//! # The rules
//!
//! - Encoding works on the selector's UTF-8 bytes. A byte in
//!   `[a-zA-Z0-9/_|\-+]` is kept as is; every other byte (including `=`
//!   itself, which is the escape character) becomes `=` followed by its
//!   value as two UPPERCASE hex digits. So `run-schedule::a1::s1` becomes
//!   `run-schedule=3A=3Aa1=3A=3As1`, `a=b` becomes `a=3Db`, `*` becomes `=2A`,
//!   and a UUID is unchanged.
//! - Decoding reverses it, and rejects anything encoding cannot produce: a
//!   `=` not followed by two uppercase hex digits, an escaped byte that did
//!   not need escaping (`=41` for `A`), a byte outside SpiceDB's id alphabet,
//!   or bytes that are not UTF-8. Hence the mapping is a bijection between
//!   selectors and the ids it accepts.
//! - An empty selector (or id), and an encoded id longer than 1,024
//!   characters, are errors: SpiceDB would reject them.
//!
//! A crate of its own so that both sides use one implementation: the
//! product (`authz_outbox::domain::object_id`) encodes and reconcile
//! decodes, and agentex-auth-dev, which stands in for a separate service and
//! must not link the product, encodes what it stores the same way.

/// SpiceDB's maximum object id length.
pub const MAX_LEN: usize = 1024;

/// The escape character; never kept as is.
const ESCAPE: u8 = b'=';

const HEX_DIGITS: &[u8; 16] = b"0123456789ABCDEF";

/// Why a selector cannot be encoded or an object id cannot be decoded.
/// Positions are byte offsets into the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectIdError {
    #[error("an empty selector is not an object id")]
    Empty,
    #[error("encoded object id would be {len} characters, more than SpiceDB's {MAX_LEN}")]
    TooLong { len: usize },
    #[error("byte {byte:#04x} at {at} is not allowed in an encoded object id")]
    InvalidByte { at: usize, byte: u8 },
    #[error("`=` at {at} is not followed by two uppercase hex digits")]
    BadEscape { at: usize },
    #[error("escape at {at} encodes a byte that is kept as is (not the canonical encoding)")]
    NonCanonical { at: usize },
    #[error("decoded object id is not UTF-8")]
    NotUtf8,
}

/// Whether a byte is kept as is: SpiceDB's id alphabet minus the escape.
fn is_kept(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"/_|-+".contains(&byte)
}

fn encoded_len(selector: &str) -> usize {
    selector
        .bytes()
        .map(|b| if is_kept(b) { 1 } else { 3 })
        .sum()
}

/// The SpiceDB object id of a selector.
pub fn encode(selector: &str) -> Result<String, ObjectIdError> {
    if selector.is_empty() {
        return Err(ObjectIdError::Empty);
    }
    let len = encoded_len(selector);
    if len > MAX_LEN {
        return Err(ObjectIdError::TooLong { len });
    }
    let mut id = String::with_capacity(len);
    for byte in selector.bytes() {
        if is_kept(byte) {
            id.push(char::from(byte));
        } else {
            id.push(char::from(ESCAPE));
            id.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
            id.push(char::from(HEX_DIGITS[usize::from(byte & 0x0F)]));
        }
    }
    Ok(id)
}

/// The selector an object id encodes; an id [`encode`] cannot produce is an
/// error.
pub fn decode(object_id: &str) -> Result<String, ObjectIdError> {
    if object_id.is_empty() {
        return Err(ObjectIdError::Empty);
    }
    if object_id.len() > MAX_LEN {
        return Err(ObjectIdError::TooLong {
            len: object_id.len(),
        });
    }
    let bytes = object_id.as_bytes();
    let mut selector = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte == ESCAPE {
            let digit = |offset: usize| bytes.get(at + offset).copied().and_then(upper_hex);
            let (Some(high), Some(low)) = (digit(1), digit(2)) else {
                return Err(ObjectIdError::BadEscape { at });
            };
            let escaped = (high << 4) | low;
            if is_kept(escaped) {
                return Err(ObjectIdError::NonCanonical { at });
            }
            selector.push(escaped);
            at += 3;
        } else if is_kept(byte) {
            selector.push(byte);
            at += 1;
        } else {
            return Err(ObjectIdError::InvalidByte { at, byte });
        }
    }
    String::from_utf8(selector).map_err(|_| ObjectIdError::NotUtf8)
}

/// The value of an uppercase hex digit; lowercase is not canonical.
fn upper_hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples() {
        assert_eq!(
            encode("run-schedule::a1::s1").as_deref(),
            Ok("run-schedule=3A=3Aa1=3A=3As1")
        );
        assert_eq!(encode("a=b").as_deref(), Ok("a=3Db"));
        assert_eq!(encode("*").as_deref(), Ok("=2A"));
        let uuid = "0b7e2c1e-5d3f-4f6a-9a57-1d2c3b4a5f60";
        assert_eq!(encode(uuid).as_deref(), Ok(uuid));
        assert_eq!(encode("a/b_c|d-e+f").as_deref(), Ok("a/b_c|d-e+f"));
        assert_eq!(
            decode("run-schedule=3A=3Aa1=3A=3As1").as_deref(),
            Ok("run-schedule::a1::s1")
        );
    }

    #[test]
    fn tricky_selectors_round_trip() {
        let long_kept = "k".repeat(MAX_LEN);
        let long_escaped = ":".repeat(MAX_LEN / 3);
        let cases = [
            "=",
            "==",
            "=3D",
            "=2A",
            "%3A",
            "a b\tc\nd",
            "\0",
            "ä",
            "日本",
            "🦀::🦀",
            "user@example.com",
            "run-schedule::a1::s1",
            "run-schedule::agent=1::s::1",
            "*",
            "\u{7f}",
            "\u{10FFFF}",
            long_kept.as_str(),
            long_escaped.as_str(),
        ];
        for selector in cases {
            let id = encode(selector).unwrap_or_else(|e| panic!("{selector:?}: {e}"));
            assert!(id.len() <= MAX_LEN, "{selector:?}");
            assert!(
                id.bytes().all(|b| is_kept(b) || b == ESCAPE),
                "{selector:?} -> {id:?} is a SpiceDB id"
            );
            assert_eq!(
                decode(&id).as_deref(),
                Ok(selector),
                "{selector:?} -> {id:?}"
            );
        }
    }

    #[test]
    fn every_ascii_byte_round_trips_and_escapes_are_uppercase() {
        for byte in 1..=0x7Fu8 {
            let selector = char::from(byte).to_string();
            let id = encode(&selector).expect("ascii encodes");
            if is_kept(byte) {
                assert_eq!(id, selector);
            } else {
                assert_eq!(id, format!("={byte:02X}"));
            }
            assert_eq!(decode(&id), Ok(selector));
        }
    }

    #[test]
    fn every_escape_decodes_only_when_canonical() {
        for byte in 0..=0xFFu8 {
            let id = format!("={byte:02X}");
            let decoded = decode(&id);
            if is_kept(byte) {
                assert_eq!(decoded, Err(ObjectIdError::NonCanonical { at: 0 }), "{id}");
            } else if byte.is_ascii() {
                assert_eq!(decoded, Ok(char::from(byte).to_string()), "{id}");
            } else {
                assert_eq!(decoded, Err(ObjectIdError::NotUtf8), "{id}");
            }
        }
    }

    #[test]
    fn rejections() {
        assert_eq!(encode(""), Err(ObjectIdError::Empty));
        assert_eq!(decode(""), Err(ObjectIdError::Empty));
        assert_eq!(
            encode(&"k".repeat(MAX_LEN + 1)),
            Err(ObjectIdError::TooLong { len: MAX_LEN + 1 })
        );
        // 342 colons need 1,026 characters.
        assert_eq!(
            encode(&":".repeat(342)),
            Err(ObjectIdError::TooLong { len: 1026 })
        );
        assert_eq!(
            decode(&"k".repeat(MAX_LEN + 1)),
            Err(ObjectIdError::TooLong { len: MAX_LEN + 1 })
        );
        for (id, error) in [
            ("=", ObjectIdError::BadEscape { at: 0 }),
            ("a=", ObjectIdError::BadEscape { at: 1 }),
            ("=3", ObjectIdError::BadEscape { at: 0 }),
            ("=G0", ObjectIdError::BadEscape { at: 0 }),
            ("x=3a", ObjectIdError::BadEscape { at: 1 }),
            ("=3d", ObjectIdError::BadEscape { at: 0 }),
            ("==3D", ObjectIdError::BadEscape { at: 0 }),
            ("=41", ObjectIdError::NonCanonical { at: 0 }),
            ("a=2D", ObjectIdError::NonCanonical { at: 1 }),
            (
                "run-schedule::a1",
                ObjectIdError::InvalidByte { at: 12, byte: b':' },
            ),
            ("*", ObjectIdError::InvalidByte { at: 0, byte: b'*' }),
            ("a b", ObjectIdError::InvalidByte { at: 1, byte: b' ' }),
            ("ä", ObjectIdError::InvalidByte { at: 0, byte: 0xC3 }),
            ("=FF", ObjectIdError::NotUtf8),
            ("=C3", ObjectIdError::NotUtf8),
            ("=C3=28", ObjectIdError::NotUtf8),
        ] {
            assert_eq!(decode(id), Err(error), "{id:?}");
        }
        assert_eq!(decode("=C3=A4").as_deref(), Ok("ä"));
    }
}
