//! The retry schedule of a row: exponential with full jitter, capped.
//!
//! The schedule is stored in the row (`next_attempt_at`), not in a worker's
//! memory, so it survives restarts and is shared by every replica. This pure
//! function is all there is to it.

use std::time::Duration;

/// How long to wait before retrying after `attempts` failed attempts.
///
/// Full jitter (a uniform draw in `[0, min(cap, base * 2^(attempts-1))]`,
/// `jitter` in `[0, 1)`) spreads retries of a failed batch so they do not
/// arrive together. A server's `Retry-After` is a lower bound, itself bounded
/// by the cap so a bogus header cannot park a row for days.
pub fn retry_delay(
    attempts: u32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exponent = attempts.saturating_sub(1).min(32);
    let ceiling = base.saturating_mul(1u32 << exponent.min(31)).min(cap);
    let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(after) => jittered.max(after.min(cap)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(60);

    #[test]
    fn ceiling_doubles_per_attempt() {
        assert_eq!(
            retry_delay(1, BASE, CAP, None, 1.0),
            Duration::from_millis(500)
        );
        assert_eq!(retry_delay(2, BASE, CAP, None, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(4, BASE, CAP, None, 1.0), Duration::from_secs(4));
    }

    #[test]
    fn never_exceeds_the_cap_even_for_huge_attempt_counts() {
        for attempts in [8, 20, 31, 32, 1000, u32::MAX] {
            assert!(retry_delay(attempts, BASE, CAP, None, 1.0) <= CAP);
        }
        assert_eq!(retry_delay(1000, BASE, CAP, None, 1.0), CAP);
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        assert_eq!(retry_delay(3, BASE, CAP, None, 0.0), Duration::ZERO);
        assert_eq!(retry_delay(3, BASE, CAP, None, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_a_lower_bound_within_the_cap() {
        let after = Some(Duration::from_secs(7));
        assert_eq!(
            retry_delay(1, BASE, CAP, after, 0.0),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_delay(1, BASE, CAP, Some(Duration::from_secs(3600)), 0.0),
            CAP
        );
        // A larger jittered delay wins over a small Retry-After.
        assert_eq!(
            retry_delay(8, BASE, CAP, Some(Duration::from_secs(1)), 1.0),
            Duration::from_secs(60)
        );
    }
}
