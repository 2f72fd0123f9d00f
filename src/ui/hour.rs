//! The overview's last hour of deliveries, kept per minute and resource
//! type between refreshes, so that a refresh reads only the newest minutes.
//!
//! Reading the whole hour on every refresh cost a scan of every row
//! delivered in it: at a few thousand deliveries a second that is hundreds
//! of thousands of rows per refresh, taken from the delivery it reports on
//! (BENCHMARKS.md, issue 23). A refresh now re-reads from a little before
//! the previous one ([`OVERLAP`]) and replaces those [`BUCKET`]s: about
//! three refresh intervals' deliveries, whatever the hour holds.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, DurationRound, Utc};

/// Minutes shown (the current one included).
pub const MINUTES: usize = 60;

/// The time the deliveries are counted by (a divisor of a minute): what a
/// refresh re-reads is rounded down to it.
pub const BUCKET_SECONDS: i64 = 10;
const BUCKET: Duration = Duration::seconds(BUCKET_SECONDS);

/// How far before the previous refresh the next one reads again. A row's
/// `finished_at` is its recording transaction's start, so a transaction
/// that commits after a refresh may still add rows to a bucket that refresh
/// read; recording transactions last milliseconds. One that took longer
/// than this is missing from the chart (never from the outbox).
pub const OVERLAP: Duration = Duration::seconds(20);

/// Deliveries of one bucket and type: how many, and the sum of their
/// capture-to-delivered latencies in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bucket {
    pub delivered: i64,
    pub latency_ms_sum: f64,
}

/// One row of a read: the bucket's start, the type, what it holds.
pub type Read = (DateTime<Utc>, String, Bucket);

/// Deliveries per minute for the last hour, oldest first, with the mean
/// latency of each minute.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    pub delivered: Vec<f64>,
    pub latency_ms: Vec<f64>,
}

#[derive(Debug, Default)]
pub struct HourWindow {
    buckets: BTreeMap<(DateTime<Utc>, String), Bucket>,
    last_read: Option<DateTime<Utc>>,
}

fn minute(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::minutes(1)).unwrap_or(t)
}

fn bucket(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(BUCKET).unwrap_or(t)
}

/// The start of the oldest minute shown at `now`.
fn first_minute(now: DateTime<Utc>) -> DateTime<Utc> {
    minute(now) - Duration::minutes(MINUTES as i64 - 1)
}

impl HourWindow {
    /// Where the next read starts: the oldest minute shown on the first
    /// read, else the bucket [`OVERLAP`] before the previous read.
    pub fn read_from(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let first = first_minute(now);
        match self.last_read {
            Some(at) => bucket(at - OVERLAP).max(first),
            None => first,
        }
    }

    /// Takes in a read made at `now` from `from` (what [`Self::read_from`]
    /// said): every bucket from `from` on is replaced by what was read, and
    /// buckets no longer shown are dropped.
    pub fn apply(&mut self, from: DateTime<Utc>, read: Vec<Read>, now: DateTime<Utc>) {
        let first = first_minute(now);
        self.buckets.retain(|(m, _), _| *m >= first && *m < from);
        for (m, resource_type, bucket) in read {
            if m >= first {
                self.buckets.insert((m, resource_type), bucket);
            }
        }
        self.last_read = Some(now);
    }

    /// Rows delivered per type within the minutes shown.
    pub fn delivered_by_type(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for ((_, t), b) in &self.buckets {
            *out.entry(t.clone()).or_default() += b.delivered;
        }
        out
    }

    /// All types' deliveries and mean latency per minute shown at `now`.
    pub fn rates(&self, now: DateTime<Utc>) -> Rates {
        let first = first_minute(now);
        let mut count = vec![0i64; MINUTES];
        let mut sum = vec![0f64; MINUTES];
        for ((b_start, _), b) in &self.buckets {
            let Ok(i) = usize::try_from((minute(*b_start) - first).num_minutes()) else {
                continue;
            };
            if i < MINUTES {
                count[i] += b.delivered;
                sum[i] += b.latency_ms_sum;
            }
        }
        Rates {
            delivered: count.iter().map(|&n| n as f64).collect(),
            latency_ms: count
                .iter()
                .zip(&sum)
                .map(|(&n, &s)| if n > 0 { s / n as f64 } else { 0.0 })
                .collect(),
        }
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

    fn bucket(delivered: i64, latency_ms_sum: f64) -> Bucket {
        Bucket {
            delivered,
            latency_ms_sum,
        }
    }

    #[test]
    fn the_first_read_covers_the_hour_and_later_ones_only_the_newest_minutes() {
        let mut w = HourWindow::default();
        let now = at(10, 30, 20);
        assert_eq!(w.read_from(now), at(9, 31, 0));
        w.apply(w.read_from(now), vec![], now);
        assert_eq!(w.read_from(at(10, 30, 30)), at(10, 30, 0));
        // Hours later, never earlier than the minutes shown.
        assert_eq!(w.read_from(at(13, 0, 0)), at(12, 1, 0));
    }

    #[test]
    fn a_refresh_replaces_the_minutes_it_read_and_keeps_the_older_ones() {
        let mut w = HourWindow::default();
        let t0 = at(10, 30, 20);
        let from = w.read_from(t0);
        w.apply(
            from,
            vec![
                (at(9, 40, 0), "task".into(), bucket(5, 50.0)),
                (at(10, 29, 0), "task".into(), bucket(2, 10.0)),
                (at(10, 30, 0), "api_key".into(), bucket(1, 4.0)),
            ],
            t0,
        );
        // Ten seconds later: from 10:30:00 on is read again (a late commit
        // added rows to it); 10:29 and 9:40 were not read and stay.
        let t1 = at(10, 30, 30);
        let from = w.read_from(t1);
        assert_eq!(from, at(10, 30, 0));
        w.apply(
            from,
            vec![
                (at(10, 30, 0), "api_key".into(), bucket(3, 6.0)),
                (at(10, 30, 20), "api_key".into(), bucket(1, 2.0)),
                (at(10, 30, 20), "task".into(), bucket(1, 4.0)),
            ],
            t1,
        );
        let by_type = w.delivered_by_type();
        assert_eq!(by_type.get("task"), Some(&8));
        assert_eq!(by_type.get("api_key"), Some(&4));
        let rates = w.rates(t1);
        assert_eq!(rates.delivered.len(), MINUTES);
        assert_eq!(rates.delivered[MINUTES - 1], 5.0, "10:30's buckets summed");
        assert_eq!(rates.latency_ms[MINUTES - 1], 2.4);
        assert_eq!(rates.delivered[MINUTES - 2], 2.0);
        assert_eq!(rates.latency_ms[MINUTES - 2], 5.0);
        assert_eq!(rates.delivered[9], 5.0, "9:40 is the tenth minute shown");
    }

    #[test]
    fn minutes_older_than_the_hour_are_dropped() {
        let mut w = HourWindow::default();
        let t0 = at(10, 0, 0);
        let from = w.read_from(t0);
        w.apply(from, vec![(at(9, 5, 0), "task".into(), bucket(7, 7.0))], t0);
        assert_eq!(w.delivered_by_type().get("task"), Some(&7));
        let t1 = at(10, 5, 0);
        let from = w.read_from(t1);
        w.apply(from, vec![], t1);
        assert_eq!(w.delivered_by_type().get("task"), None);
        assert!(w.rates(t1).delivered.iter().all(|&n| n == 0.0));
    }
}
