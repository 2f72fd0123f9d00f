//! Typed settings, checked once at start-up. The CLI builds these from flags
//! and environment variables; the library takes them as they are.

use std::time::Duration;

/// How a worker claims and delivers.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Who holds a lease (shown in `locked_by`).
    pub worker_id: String,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Rows claimed per round trip.
    pub batch_size: usize,
    /// How long a claim holds its rows.
    pub lease: Duration,
    pub request_timeout: Duration,
    /// Attempts before a failing row may go dead...
    pub max_attempts: u32,
    /// ...and the age it must also have reached, so a long outage never
    /// dead-letters the backlog.
    pub dead_after: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// The fallback when a notification is missed.
    pub poll_interval: Duration,
    /// Delivered and superseded rows older than this are pruned.
    pub retention: Duration,
    /// In-flight rows get this long to finish on shutdown, then are released.
    pub shutdown_timeout: Duration,
    /// Consecutive transient failures that open the circuit.
    pub circuit_threshold: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "lease ({lease:?}) must be at least 3x the request timeout ({timeout:?}): a lease that \
         expires while a request is in flight lets a second worker deliver the same row out of order"
    )]
    LeaseTooShort { lease: Duration, timeout: Duration },
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("backoff cap ({cap:?}) must not be below the backoff base ({base:?})")]
    CapBelowBase { base: Duration, cap: Duration },
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            worker_id: default_worker_id(),
            concurrency: 32,
            batch_size: 100,
            lease: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            max_attempts: 20,
            dead_after: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            shutdown_timeout: Duration::from_secs(20),
            circuit_threshold: 10,
        }
    }
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, zero) in [
            ("concurrency", self.concurrency == 0),
            ("batch size", self.batch_size == 0),
            ("max attempts", self.max_attempts == 0),
            ("request timeout", self.request_timeout.is_zero()),
            ("poll interval", self.poll_interval.is_zero()),
            ("backoff base", self.backoff_base.is_zero()),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.lease < self.request_timeout.saturating_mul(3) {
            return Err(ConfigError::LeaseTooShort {
                lease: self.lease,
                timeout: self.request_timeout,
            });
        }
        if self.backoff_cap < self.backoff_base {
            return Err(ConfigError::CapBelowBase {
                base: self.backoff_base,
                cap: self.backoff_cap,
            });
        }
        Ok(())
    }
}

/// `hostname-pid`: unique per process, readable in `locked_by`.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(WorkerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn refuses_a_lease_that_does_not_outlast_the_request() {
        let config = WorkerConfig {
            lease: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            ..WorkerConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::LeaseTooShort { .. })
        ));
    }

    #[test]
    fn refuses_zero_concurrency() {
        let config = WorkerConfig {
            concurrency: 0,
            ..WorkerConfig::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::Zero("concurrency")));
    }
}
