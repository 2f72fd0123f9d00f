//! What an answer from agentex-auth means for a row, as the host service
//! maps status codes (CONTRACT.md). Pure, so every branch is unit-tested.

use std::time::Duration;

use crate::auth_client::AuthAnswer;
use crate::domain::Operation;

/// The class of an answer, before attempts and age are considered.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Applied (or, for a deregister, already gone).
    Applied { consistency_token: Option<String> },
    /// Might succeed later: network, timeout, 408, 429, 5xx.
    Transient {
        status: Option<u16>,
        retry_after: Option<Duration>,
        error: String,
    },
    /// Will not succeed as it is: other 4xx.
    Permanent { status: u16, error: String },
    /// 401 (or gRPC UNAUTHENTICATED): *our* credential is wrong. Not the
    /// row's fault. `status` is the target's own code, kept on the row.
    Unauthorized { status: u16, error: String },
}

pub fn classify(operation: Operation, answer: AuthAnswer) -> Verdict {
    match answer {
        AuthAnswer::Success { consistency_token } => Verdict::Applied { consistency_token },
        // A retry cannot fix a misrouted URL (a login page, an ingress
        // rule): dead, visible in `status`, replayed once it is fixed.
        AuthAnswer::Redirect { status, location } => Verdict::Permanent {
            status,
            error: format!(
                "HTTP {status} redirect to {location:?} not followed: nothing was applied; \
                 AGENTEX_AUTH_URL must reach agentex-auth itself"
            ),
        },
        AuthAnswer::NotTheContract { status, reason } => Verdict::Permanent {
            status,
            error: format!(
                "HTTP {status} is not the contract's answer ({reason}); not counted as delivered"
            ),
        },
        AuthAnswer::Timeout => Verdict::Transient {
            status: None,
            retry_after: None,
            error: "request timed out".into(),
        },
        AuthAnswer::Network(error) => Verdict::Transient {
            status: None,
            retry_after: None,
            error: format!("unreachable: {error}"),
        },
        AuthAnswer::Status {
            status,
            retry_after,
            message,
        } => {
            let error = describe(status, &message);
            match status {
                401 => Verdict::Unauthorized { status, error },
                // Deleting what is not there is the goal reached.
                404 if operation == Operation::Deregister => Verdict::Applied {
                    consistency_token: None,
                },
                408 | 429 | 500..=599 => Verdict::Transient {
                    status: Some(status),
                    retry_after,
                    error,
                },
                // 403 (principal not allowed), 400, 404 on register, 409,
                // 422, and any other non-2xx: permanent, by class.
                _ => Verdict::Permanent { status, error },
            }
        }
    }
}

fn describe(status: u16, message: &str) -> String {
    let label = match status {
        401 => "credential rejected",
        403 => "principal not allowed",
        404 => "not found",
        409 => "conflict",
        422 => "unprocessable",
        429 => "rate limited",
        502 => "bad gateway",
        503 => "temporarily unavailable",
        400..=499 => "client error",
        500..=599 => "server error",
        _ => "unexpected status",
    };
    if message.is_empty() {
        format!("HTTP {status} {label}")
    } else {
        format!("HTTP {status} {label}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> AuthAnswer {
        AuthAnswer::Status {
            status: code,
            retry_after: None,
            message: String::new(),
        }
    }

    #[test]
    fn retryable_classes() {
        for code in [408, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(classify(Operation::Register, status(code)), Verdict::Transient { status: Some(c), .. } if c == code),
                "{code}"
            );
        }
        assert!(matches!(
            classify(Operation::Register, AuthAnswer::Timeout),
            Verdict::Transient { status: None, .. }
        ));
        assert!(matches!(
            classify(Operation::Deregister, AuthAnswer::Network("refused".into())),
            Verdict::Transient { .. }
        ));
    }

    #[test]
    fn permanent_classes() {
        for code in [400, 403, 404, 409, 418, 422, 302] {
            assert!(
                matches!(classify(Operation::Register, status(code)), Verdict::Permanent { status: c, .. } if c == code),
                "{code}"
            );
        }
    }

    #[test]
    fn a_redirect_is_never_applied_and_names_its_location() {
        for operation in [Operation::Register, Operation::Deregister] {
            let verdict = classify(
                operation,
                AuthAnswer::Redirect {
                    status: 302,
                    location: "/login".into(),
                },
            );
            match verdict {
                Verdict::Permanent { status, error } => {
                    assert_eq!(status, 302);
                    assert!(error.contains("\"/login\""), "{error}");
                    assert!(error.contains("not followed"), "{error}");
                }
                other => panic!("{operation:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_success_status_without_the_contracts_body_is_not_applied() {
        let verdict = classify(
            Operation::Deregister,
            AuthAnswer::NotTheContract {
                status: 200,
                reason: "body is not JSON".into(),
            },
        );
        assert!(
            matches!(&verdict, Verdict::Permanent { status: 200, error } if error.contains("not counted as delivered")),
            "{verdict:?}"
        );
    }

    #[test]
    fn deregister_of_something_already_gone_is_done() {
        assert!(matches!(
            classify(Operation::Deregister, status(404)),
            Verdict::Applied { .. }
        ));
        assert!(matches!(
            classify(Operation::Deregister, status(409)),
            Verdict::Permanent { .. }
        ));
    }

    #[test]
    fn unauthorized_is_the_workers_problem() {
        assert!(matches!(
            classify(Operation::Register, status(401)),
            Verdict::Unauthorized { status: 401, .. }
        ));
    }

    #[test]
    fn retry_after_is_kept() {
        let answer = AuthAnswer::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
            message: "slow down".into(),
        };
        assert_eq!(
            classify(Operation::Register, answer),
            Verdict::Transient {
                status: Some(429),
                retry_after: Some(Duration::from_secs(3)),
                error: "HTTP 429 rate limited: slow down".into()
            }
        );
    }

    /// `last_error` names the status's meaning, so an operator reading
    /// `status` or a dead row sees why without looking the code up.
    #[test]
    fn each_status_is_described_by_its_meaning() {
        for (code, label) in [
            (401, "credential rejected"),
            (403, "principal not allowed"),
            (404, "not found"),
            (409, "conflict"),
            (422, "unprocessable"),
            (429, "rate limited"),
            (502, "bad gateway"),
            (503, "temporarily unavailable"),
            (400, "client error"),
            (418, "client error"),
            (499, "client error"),
            (500, "server error"),
            (504, "server error"),
            (599, "server error"),
            (302, "unexpected status"),
            (600, "unexpected status"),
        ] {
            assert_eq!(describe(code, ""), format!("HTTP {code} {label}"));
        }
        assert_eq!(
            describe(409, "already there"),
            "HTTP 409 conflict: already there"
        );
    }
}
