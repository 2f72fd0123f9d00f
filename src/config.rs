//! Typed settings, checked once at start-up. The CLI builds these from flags
//! and environment variables; the library takes them as they are.

use std::time::Duration;

/// The largest value each setting accepts. Each is far past any sane
/// setting and far below where the arithmetic that combines them (a lease
/// added to now, a backoff doubled, a date in the past) could overflow: a
/// setting outside is refused at start, never wrapped or panicked on.
pub mod limits {
    use std::time::Duration;

    const HOUR: u64 = 3600;
    const DAY: u64 = 24 * HOUR;

    pub const CONCURRENCY: usize = 4096;
    pub const BATCH_SIZE: usize = 10_000;
    pub const MAX_ATTEMPTS: u32 = 1000;
    pub const CIRCUIT_THRESHOLD: u32 = 10_000;
    pub const LEASE: Duration = Duration::from_secs(HOUR);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
    pub const DEAD_AFTER: Duration = Duration::from_secs(365 * DAY);
    pub const BACKOFF_BASE: Duration = Duration::from_secs(HOUR);
    pub const BACKOFF_CAP: Duration = Duration::from_secs(DAY);
    pub const POLL_INTERVAL: Duration = Duration::from_secs(HOUR);
    pub const RETENTION: Duration = Duration::from_secs(3650 * DAY);
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(HOUR);
    /// `replay --since/--until`, `reconcile --grace`: how far back.
    pub const LOOKBACK: Duration = Duration::from_secs(3650 * DAY);
    /// `keys create --wait`.
    pub const WAIT: Duration = Duration::from_secs(HOUR);
    /// Reconcile's whole SpiceDB read, and each message of it.
    pub const SPICEDB_READ_TIMEOUT: Duration = Duration::from_secs(DAY);
    pub const SPICEDB_MESSAGE_TIMEOUT: Duration = Duration::from_secs(HOUR);
    pub const PAGE_SIZE: u32 = 100_000;
}

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
    #[error("{name} ({value}) must be at most {max}")]
    TooLarge {
        name: &'static str,
        value: String,
        max: String,
    },
}

fn at_most<T: PartialOrd + std::fmt::Debug>(
    name: &'static str,
    value: T,
    max: T,
) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::TooLarge {
            name,
            value: format!("{value:?}"),
            max: format!("{max:?}"),
        });
    }
    Ok(())
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
        at_most("concurrency", self.concurrency, limits::CONCURRENCY)?;
        at_most("batch size", self.batch_size, limits::BATCH_SIZE)?;
        at_most("max attempts", self.max_attempts, limits::MAX_ATTEMPTS)?;
        at_most(
            "circuit threshold",
            self.circuit_threshold,
            limits::CIRCUIT_THRESHOLD,
        )?;
        for (name, value, max) in [
            ("lease", self.lease, limits::LEASE),
            (
                "request timeout",
                self.request_timeout,
                limits::REQUEST_TIMEOUT,
            ),
            ("dead-after", self.dead_after, limits::DEAD_AFTER),
            ("backoff base", self.backoff_base, limits::BACKOFF_BASE),
            ("backoff cap", self.backoff_cap, limits::BACKOFF_CAP),
            ("poll interval", self.poll_interval, limits::POLL_INTERVAL),
            ("retention", self.retention, limits::RETENTION),
            (
                "shutdown timeout",
                self.shutdown_timeout,
                limits::SHUTDOWN_TIMEOUT,
            ),
        ] {
            at_most(name, value, max)?;
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
    fn refuses_settings_past_their_maximum() {
        let near_max = Duration::from_secs(u64::MAX);
        for config in [
            WorkerConfig {
                lease: near_max,
                ..WorkerConfig::default()
            },
            WorkerConfig {
                backoff_cap: Duration::from_secs(2_000_000 * 365 * 86_400),
                ..WorkerConfig::default()
            },
            WorkerConfig {
                concurrency: usize::MAX,
                ..WorkerConfig::default()
            },
            WorkerConfig {
                batch_size: limits::BATCH_SIZE + 1,
                ..WorkerConfig::default()
            },
            WorkerConfig {
                retention: near_max,
                ..WorkerConfig::default()
            },
        ] {
            assert!(
                matches!(config.validate(), Err(ConfigError::TooLarge { .. })),
                "{config:?}"
            );
        }
        let at_max = WorkerConfig {
            lease: limits::LEASE,
            request_timeout: limits::REQUEST_TIMEOUT,
            backoff_cap: limits::BACKOFF_CAP,
            concurrency: limits::CONCURRENCY,
            ..WorkerConfig::default()
        };
        assert_eq!(at_max.validate(), Ok(()));
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
