//! Whether the worker may send, and how much: a circuit breaker for outages
//! and a pause for a rejected credential.
//!
//! Both protect the backlog. During an outage, every row sent fails and
//! spends an attempt, so after `threshold` consecutive transient failures the
//! gate opens and admits a single probe row per cool-down; the rest stay
//! pending, attempts untouched. A 401 means our own credential is wrong: no
//! row is at fault, so the row is released without spending its attempt, the
//! worker reports not-ready, and it probes with one row per cool-down until
//! the credential is fixed.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenReason {
    Outage,
    Credential,
}

/// What the claimer may take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: a full batch.
    All,
    /// Open and cooled down: exactly one row, the probe.
    Probe,
    /// Open: nothing until then (or until a probe in flight answers).
    Nothing { until: Instant },
}

/// The result of one delivery, as the gate sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// agentex-auth answered something other than 401 or a transient error:
    /// it is up and accepts our credential.
    Answered,
    Transient,
    Unauthorized,
    /// The probe row was settled without a request (superseded, bad data).
    NoRequest,
}

#[derive(Debug)]
struct State {
    open: Option<(OpenReason, Instant)>,
    cooldown: Duration,
    consecutive_failures: u32,
    probe_in_flight: bool,
}

#[derive(Debug)]
pub struct Gate {
    threshold: u32,
    base: Duration,
    cap: Duration,
    state: Mutex<State>,
}

impl Gate {
    pub fn new(threshold: u32, base: Duration, cap: Duration) -> Self {
        Gate {
            threshold: threshold.max(1),
            base,
            cap,
            state: Mutex::new(State {
                open: None,
                cooldown: base,
                consecutive_failures: 0,
                probe_in_flight: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent under every panic point (plain field
        // writes), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let mut s = self.lock();
        match s.open {
            None => Admit::All,
            Some((_, until)) if s.probe_in_flight || now < until => Admit::Nothing {
                until: if s.probe_in_flight {
                    later(now, self.base)
                } else {
                    until
                },
            },
            Some(_) => {
                s.probe_in_flight = true;
                Admit::Probe
            }
        }
    }

    /// The claimer admitted a probe but found no row to send.
    pub fn probe_unused(&self) {
        self.lock().probe_in_flight = false;
    }

    /// Feeds one delivery's result. Returns the new open reason when this
    /// result opened (or re-opened) the gate, for logging.
    pub fn record(&self, signal: Signal, was_probe: bool, now: Instant) -> Option<OpenReason> {
        let mut s = self.lock();
        if was_probe {
            s.probe_in_flight = false;
        }
        match signal {
            Signal::Answered => {
                s.open = None;
                s.cooldown = self.base;
                s.consecutive_failures = 0;
                None
            }
            Signal::NoRequest => None,
            Signal::Transient => {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                let reopen = match s.open {
                    Some((OpenReason::Outage, _)) => was_probe,
                    Some((OpenReason::Credential, _)) => false,
                    None => s.consecutive_failures >= self.threshold,
                };
                reopen.then(|| self.open(&mut s, OpenReason::Outage, now))
            }
            Signal::Unauthorized => {
                let first = !matches!(s.open, Some((OpenReason::Credential, _)));
                if first || was_probe {
                    Some(self.open(&mut s, OpenReason::Credential, now))
                } else {
                    None
                }
            }
        }
    }

    fn open(&self, s: &mut State, reason: OpenReason, now: Instant) -> OpenReason {
        let cooldown = match s.open {
            Some((current, _)) if current == reason => s.cooldown.saturating_mul(2).min(self.cap),
            _ => self.base,
        };
        s.cooldown = cooldown;
        s.open = Some((reason, later(now, cooldown)));
        reason
    }

    pub fn open_reason(&self) -> Option<OpenReason> {
        self.lock().open.map(|(reason, _)| reason)
    }

    pub fn cooldown(&self) -> Duration {
        self.lock().cooldown
    }
}

/// `now + after`, or as late as an `Instant` goes: no cool-down can panic.
fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(3, Duration::from_secs(1), Duration::from_secs(8))
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_and_probes_one_row() {
        let g = gate();
        let t0 = Instant::now();
        assert_eq!(g.record(Signal::Transient, false, t0), None);
        assert_eq!(g.record(Signal::Transient, false, t0), None);
        assert_eq!(g.admit(t0), Admit::All);
        assert_eq!(
            g.record(Signal::Transient, false, t0),
            Some(OpenReason::Outage)
        );
        assert!(matches!(g.admit(t0), Admit::Nothing { .. }));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(g.admit(later), Admit::Probe);
        // Only one probe at a time.
        assert!(matches!(g.admit(later), Admit::Nothing { .. }));
        // A failed probe doubles the cool-down.
        assert_eq!(
            g.record(Signal::Transient, true, later),
            Some(OpenReason::Outage)
        );
        assert_eq!(g.cooldown(), Duration::from_secs(2));
        assert!(matches!(
            g.admit(later + Duration::from_secs(1)),
            Admit::Nothing { .. }
        ));
        assert_eq!(g.admit(later + Duration::from_secs(2)), Admit::Probe);
        assert_eq!(g.record(Signal::Answered, true, later), None);
        assert_eq!(g.admit(later), Admit::All);
    }

    #[test]
    fn an_answer_resets_the_failure_streak() {
        let g = gate();
        let t0 = Instant::now();
        g.record(Signal::Transient, false, t0);
        g.record(Signal::Transient, false, t0);
        g.record(Signal::Answered, false, t0);
        g.record(Signal::Transient, false, t0);
        assert_eq!(g.admit(t0), Admit::All);
    }

    #[test]
    fn unauthorized_pauses_at_once_with_capped_backoff() {
        let g = gate();
        let mut now = Instant::now();
        assert_eq!(
            g.record(Signal::Unauthorized, false, now),
            Some(OpenReason::Credential)
        );
        assert_eq!(g.open_reason(), Some(OpenReason::Credential));
        for _ in 0..10 {
            now += g.cooldown();
            assert_eq!(g.admit(now), Admit::Probe);
            g.record(Signal::Unauthorized, true, now);
        }
        assert_eq!(g.cooldown(), Duration::from_secs(8));
        now += g.cooldown();
        assert_eq!(g.admit(now), Admit::Probe);
        g.record(Signal::Answered, true, now);
        assert_eq!(g.open_reason(), None);
    }

    #[test]
    fn a_new_reason_starts_from_the_base_cooldown() {
        let g = gate();
        let t0 = Instant::now();
        for _ in 0..3 {
            g.record(Signal::Transient, false, t0);
        }
        let later = t0 + Duration::from_secs(1);
        assert_eq!(g.admit(later), Admit::Probe);
        g.record(Signal::Transient, true, later);
        assert_eq!(g.cooldown(), Duration::from_secs(2));
        // The outage ends, but the credential is now refused: a different
        // cause, so its pause starts from the base, not the doubled outage's.
        let probe_at = later + Duration::from_secs(2);
        assert_eq!(g.admit(probe_at), Admit::Probe);
        assert_eq!(
            g.record(Signal::Unauthorized, true, probe_at),
            Some(OpenReason::Credential)
        );
        assert_eq!(g.cooldown(), Duration::from_secs(1));
    }

    #[test]
    fn unused_probe_is_returned() {
        let g = gate();
        let now = Instant::now();
        g.record(Signal::Unauthorized, false, now);
        let later = now + Duration::from_secs(1);
        assert_eq!(g.admit(later), Admit::Probe);
        g.probe_unused();
        assert_eq!(g.admit(later), Admit::Probe);
    }
}
