//! The worker's deliveries per minute and resource type, counted in memory
//! as the recorder writes them and added to `authz_outbox_delivery_minutes`
//! by the housekeeping task (and once more when the run ends): one small
//! statement every few seconds instead of the page counting the outbox.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use crate::outbox::minutes::{self, Minute, minute_of};

/// Counts not yet added to the database, by minute and resource type.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pending: Mutex<HashMap<(DateTime<Utc>, &'static str), Minute>>,
}

impl Tally {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(DateTime<Utc>, &'static str), Minute>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One delivery of `resource_type`, recorded at `finished`, `latency_ms`
    /// after its capture.
    pub(super) fn delivered(
        &self,
        resource_type: &'static str,
        finished: DateTime<Utc>,
        latency_ms: f64,
    ) {
        *self
            .lock()
            .entry((minute_of(finished), resource_type))
            .or_default() += Minute {
            delivered: 1,
            latency_ms_sum: latency_ms,
        };
    }

    /// Adds what was counted to the database. A failed write keeps the
    /// counts for the next one, except minutes the page no longer shows, so
    /// an unreachable database never makes the tally grow past an hour.
    pub(super) async fn flush(&self, pool: &PgPool, worker_id: &str) {
        let taken: Vec<(DateTime<Utc>, &'static str, Minute)> =
            self.lock().drain().map(|((at, t), m)| (at, t, m)).collect();
        if taken.is_empty() {
            return;
        }
        if let Err(e) = minutes::add(pool, worker_id, &taken).await {
            tracing::debug!(error = %e, "adding deliveries per minute failed; kept for the next try");
            let oldest = Utc::now() - Duration::hours(1);
            let mut pending = self.lock();
            for (at, t, m) in taken {
                if at >= oldest {
                    *pending.entry((at, t)).or_default() += m;
                }
            }
        }
    }

    #[cfg(test)]
    fn snapshot(&self) -> HashMap<(DateTime<Utc>, &'static str), Minute> {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, h, m, s)
            .single()
            .expect("a valid time")
    }

    #[test]
    fn deliveries_are_counted_per_minute_and_type() {
        let tally = Tally::default();
        tally.delivered("task", at(10, 0, 1), 4.0);
        tally.delivered("task", at(10, 0, 59), 6.0);
        tally.delivered("task", at(10, 1, 0), 1.0);
        tally.delivered("api_key", at(10, 0, 30), 2.0);
        let s = tally.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[&(at(10, 0, 0), "task")],
            Minute {
                delivered: 2,
                latency_ms_sum: 10.0
            }
        );
        assert_eq!(s[&(at(10, 1, 0), "task")].delivered, 1);
        assert_eq!(s[&(at(10, 0, 0), "api_key")].delivered, 1);
    }
}
