//! The overview's last hour: deliveries per minute of every type and their
//! mean capture-to-delivered latency, from the minutes the workers add to
//! `authz_outbox_delivery_minutes` ([`crate::outbox::minutes`]).
//!
//! The page once counted the outbox's delivered rows for this, a scan of
//! every row delivered in the hour that slowed the delivery it reported on
//! (BENCHMARKS.md, issue 23); now it reads at most 60 rows per type and
//! worker.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::outbox::minutes::{Minute, minute_of};

/// Minutes shown (the current one included).
pub const MINUTES: usize = 60;

/// One minute's deliveries of one type, as read.
pub type Read = (DateTime<Utc>, String, Minute);

/// Deliveries per minute for the last hour, oldest first, with the mean
/// latency of each minute.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    pub delivered: Vec<f64>,
    pub latency_ms: Vec<f64>,
}

/// The start of the oldest minute shown at `now`: what the page reads from.
pub fn first_minute(now: DateTime<Utc>) -> DateTime<Utc> {
    minute_of(now) - Duration::minutes(MINUTES as i64 - 1)
}

/// Where in the chart a minute falls at `now`, if it is shown.
fn index(at: DateTime<Utc>, now: DateTime<Utc>) -> Option<usize> {
    let i = usize::try_from((minute_of(at) - first_minute(now)).num_minutes()).ok()?;
    (i < MINUTES).then_some(i)
}

/// Rows delivered per type within the minutes shown at `now`.
pub fn delivered_by_type(read: &[Read], now: DateTime<Utc>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for (at, t, m) in read {
        if index(*at, now).is_some() {
            *out.entry(t.clone()).or_default() += m.delivered;
        }
    }
    out
}

/// All types' deliveries and mean latency per minute shown at `now`.
pub fn rates(read: &[Read], now: DateTime<Utc>) -> Rates {
    let mut per = vec![Minute::default(); MINUTES];
    for (at, _, m) in read {
        if let Some(i) = index(*at, now) {
            per[i] += *m;
        }
    }
    Rates {
        delivered: per.iter().map(|m| m.delivered as f64).collect(),
        latency_ms: per
            .iter()
            .map(|m| {
                if m.delivered > 0 {
                    m.latency_ms_sum / m.delivered as f64
                } else {
                    0.0
                }
            })
            .collect(),
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

    fn minute(delivered: i64, latency_ms_sum: f64) -> Minute {
        Minute {
            delivered,
            latency_ms_sum,
        }
    }

    #[test]
    fn the_hour_shown_starts_59_minutes_before_the_current_one() {
        assert_eq!(first_minute(at(10, 30, 20)), at(9, 31, 0));
    }

    #[test]
    fn types_and_minutes_are_summed_with_their_mean_latency() {
        let now = at(10, 30, 20);
        let read = vec![
            (at(9, 40, 0), "task".to_string(), minute(5, 50.0)),
            (at(10, 29, 0), "task".to_string(), minute(2, 10.0)),
            (at(10, 30, 0), "api_key".to_string(), minute(4, 8.0)),
            (at(10, 30, 0), "task".to_string(), minute(1, 4.0)),
        ];
        let by_type = delivered_by_type(&read, now);
        assert_eq!(by_type.get("task"), Some(&8));
        assert_eq!(by_type.get("api_key"), Some(&4));
        let r = rates(&read, now);
        assert_eq!(r.delivered.len(), MINUTES);
        assert_eq!(r.delivered[MINUTES - 1], 5.0, "10:30's types summed");
        assert_eq!(r.latency_ms[MINUTES - 1], 2.4);
        assert_eq!(r.delivered[MINUTES - 2], 2.0);
        assert_eq!(r.latency_ms[MINUTES - 2], 5.0);
        assert_eq!(r.delivered[9], 5.0, "9:40 is the tenth minute shown");
        assert_eq!(r.latency_ms[0], 0.0, "a minute without deliveries");
    }

    #[test]
    fn minutes_outside_the_hour_are_not_shown() {
        let now = at(10, 30, 20);
        let read = vec![
            (at(9, 30, 0), "task".to_string(), minute(7, 7.0)),
            (at(10, 31, 0), "task".to_string(), minute(3, 3.0)),
        ];
        assert_eq!(delivered_by_type(&read, now).get("task"), None);
        assert!(rates(&read, now).delivered.iter().all(|&n| n == 0.0));
    }
}
