//! gRPC statuses: the engine's errors turned back into the status real
//! SpiceDB answers, injected faults in gRPC terms, and the `grpc-timeout`
//! deadline a client sends.

use std::time::Duration;

use http::HeaderMap;
use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::faults::Fault;
use crate::ffi::FfiError;

/// The status a failed engine call answers.
///
/// The library reports a failed unary call as grpc-go's text of the status
/// SpiceDB returned (`rpc error: code = FailedPrecondition desc = relation
/// ... not found`); parsing it back gives the client the very code a real
/// SpiceDB would send (`FAILED_PRECONDITION`, `INVALID_ARGUMENT`, ...), not a
/// blanket `UNKNOWN`. Text in any other shape is `UNKNOWN`, as grpc-go
/// answers an error that carries no status.
pub fn from_engine(error: EngineError) -> Status {
    match error {
        EngineError::Ffi(FfiError::Call(text)) | EngineError::Schema(FfiError::Call(text)) => {
            from_go_text(&text)
        }
        EngineError::Grpc(status) => status,
        EngineError::Decode(error) => {
            Status::internal(format!("cannot decode SpiceDB response: {error}"))
        }
        EngineError::Abandoned => Status::cancelled(EngineError::Abandoned.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn from_go_text(text: &str) -> Status {
    text.strip_prefix("rpc error: code = ")
        .and_then(|rest| rest.split_once(" desc = "))
        .and_then(|(name, description)| Some(Status::new(code_from_go(name)?, description)))
        .unwrap_or_else(|| Status::unknown(text.to_string()))
}

/// grpc-go's `codes.Code.String()` names.
fn code_from_go(name: &str) -> Option<Code> {
    Some(match name {
        "OK" => Code::Ok,
        "Canceled" => Code::Cancelled,
        "Unknown" => Code::Unknown,
        "InvalidArgument" => Code::InvalidArgument,
        "DeadlineExceeded" => Code::DeadlineExceeded,
        "NotFound" => Code::NotFound,
        "AlreadyExists" => Code::AlreadyExists,
        "PermissionDenied" => Code::PermissionDenied,
        "ResourceExhausted" => Code::ResourceExhausted,
        "FailedPrecondition" => Code::FailedPrecondition,
        "Aborted" => Code::Aborted,
        "OutOfRange" => Code::OutOfRange,
        "Unimplemented" => Code::Unimplemented,
        "Internal" => Code::Internal,
        "Unavailable" => Code::Unavailable,
        "DataLoss" => Code::DataLoss,
        "Unauthenticated" => Code::Unauthenticated,
        _ => return None,
    })
}

/// The canonical name of a code (`UNAVAILABLE`): how gRPC outcomes are
/// counted in the stats.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The status an injected fault answers before doing anything, as gRPC maps
/// the HTTP answer it stands for: 500 → `INTERNAL`, 502 and 503 →
/// `UNAVAILABLE` (what clients retry), 429 → `RESOURCE_EXHAUSTED` with the
/// standard `grpc-retry-pushback-ms` trailer carrying `Retry-After`.
/// A hang and applied-then-503 end in `UNAVAILABLE` too (see the caller).
pub fn injected(fault: Fault, retry_after_secs: u64) -> Status {
    match fault {
        Fault::Status500 => Status::internal("injected fault: 500"),
        Fault::Status502 => Status::unavailable("injected fault: 502"),
        Fault::Status503 => Status::unavailable("injected fault: 503"),
        Fault::RateLimited => {
            let mut status = Status::resource_exhausted("injected fault: 429");
            let pushback = retry_after_secs.saturating_mul(1000).to_string();
            if let Ok(value) = pushback.parse() {
                status
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", value);
            }
            status
        }
        Fault::Hang => Status::unavailable("injected fault: hang"),
        Fault::AppliedThen503 => Status::unavailable("injected fault: applied, then 503"),
    }
}

/// The deadline a client sent as `grpc-timeout` (1 to 8 digits and a unit:
/// `H M S m u n`); `None` when absent or malformed, as the gRPC spec says to
/// treat it.
pub fn deadline(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..split)?, value.get(split..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_status_text_becomes_its_status() {
        let status = from_engine(EngineError::Ffi(FfiError::Call(
            "rpc error: code = FailedPrecondition desc = relation/permission `nope` not found under definition `api_key`".into(),
        )));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "relation/permission `nope` not found under definition `api_key`"
        );
        let status = from_engine(EngineError::Schema(FfiError::Call(
            "rpc error: code = InvalidArgument desc = parse error: x desc = y".into(),
        )));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "parse error: x desc = y");
        let status = from_engine(EngineError::Ffi(FfiError::Call("boom".into())));
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(status.message(), "boom");
        let status = from_engine(EngineError::Ffi(FfiError::Call(
            "rpc error: code = Weird desc = x".into(),
        )));
        assert_eq!(status.code(), Code::Unknown);
    }

    #[test]
    fn every_go_code_name_is_known() {
        for (name, code) in [
            ("Canceled", Code::Cancelled),
            ("DeadlineExceeded", Code::DeadlineExceeded),
            ("Unavailable", Code::Unavailable),
            ("Unauthenticated", Code::Unauthenticated),
            ("DataLoss", Code::DataLoss),
        ] {
            assert_eq!(code_from_go(name), Some(code));
        }
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }

    #[test]
    fn faults_map_to_grpc_codes() {
        assert_eq!(injected(Fault::Status500, 1).code(), Code::Internal);
        assert_eq!(injected(Fault::Status502, 1).code(), Code::Unavailable);
        assert_eq!(injected(Fault::Status503, 1).code(), Code::Unavailable);
        assert_eq!(injected(Fault::Hang, 1).code(), Code::Unavailable);
        assert_eq!(injected(Fault::AppliedThen503, 1).code(), Code::Unavailable);
        let limited = injected(Fault::RateLimited, 7);
        assert_eq!(limited.code(), Code::ResourceExhausted);
        assert_eq!(
            limited
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("7000")
        );
    }

    #[test]
    fn grpc_timeout_parses() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().expect("header"));
            deadline(&headers)
        };
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(with("123456789m"), None, "more than 8 digits");
        assert_eq!(with("m"), None);
        assert_eq!(with("5x"), None);
        assert_eq!(with("-5m"), None);
        assert_eq!(deadline(&HeaderMap::new()), None);
    }
}
