//! The bearer token callers must present, when one is configured.
//!
//! The real agentex-auth authenticates its callers, and a real SpiceDB asks
//! for a preshared key; the stand-in checks one token on both ports (HTTP
//! `Authorization: Bearer …`, gRPC `authorization: Bearer …` metadata) so a
//! client's credential handling can be tested. With no token configured it
//! accepts every caller, as it always has.

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;

#[derive(Clone, Default)]
pub struct BearerToken(Option<Arc<str>>);

impl BearerToken {
    /// `None` or an empty token accepts every caller.
    pub fn new(token: Option<&str>) -> BearerToken {
        BearerToken(token.filter(|t| !t.is_empty()).map(Arc::from))
    }

    /// Whether an `authorization` value is acceptable: anything when no
    /// token is configured, else exactly `Bearer <token>` (the scheme in any
    /// case, as RFC 9110 allows).
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(expected) = &self.0 else {
            return true;
        };
        let Some((scheme, presented)) = authorization
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
        else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer")
            && same_bytes(presented.trim().as_bytes(), expected.as_bytes())
    }
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guessed token was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Never prints the token.
impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("BearerToken(<redacted>)"),
            None => f.write_str("BearerToken(none)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).expect("header")
    }

    #[test]
    fn without_a_token_everyone_is_accepted() {
        for token in [None, Some("")] {
            let token = BearerToken::new(token);
            assert!(token.accepts(None));
            assert!(token.accepts(Some(&header("Bearer whatever"))));
        }
    }

    #[test]
    fn with_a_token_only_that_bearer_is_accepted() {
        let token = BearerToken::new(Some("s3cret"));
        assert!(token.accepts(Some(&header("Bearer s3cret"))));
        assert!(token.accepts(Some(&header("bearer s3cret"))));
        assert!(!token.accepts(None));
        assert!(!token.accepts(Some(&header("Bearer s3cre"))));
        assert!(!token.accepts(Some(&header("Bearer s3cret2"))));
        assert!(!token.accepts(Some(&header("Basic s3cret"))));
        assert!(!token.accepts(Some(&header("s3cret"))));
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
