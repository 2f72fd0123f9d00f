//! Worker memory must not grow with the rows it delivers: the exporter keeps
//! each histogram sample until upkeep folds it into buckets, so the worker
//! runs upkeep every second ([`authz_outbox::metrics::upkeep`]). Its own
//! process, so the recorder and the RSS are this test's alone.

use authz_outbox::metrics::{self as m, COMMIT_TO_DELIVERED, DELIVERY_DURATION};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("procfs")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Two samples per delivered row, as the worker records them.
fn deliver(rows: usize, upkeep_every: Option<usize>) {
    for i in 0..rows {
        metrics::histogram!(DELIVERY_DURATION, "operation" => "register").record(0.004);
        metrics::histogram!(COMMIT_TO_DELIVERED).record(0.004);
        if upkeep_every.is_some_and(|n| i % n == 0) {
            m::upkeep();
        }
    }
}

#[test]
fn delivering_rows_between_scrapes_does_not_grow_memory() {
    m::install().expect("recorder");
    // Warm up allocator and series.
    deliver(10_000, Some(1_000));
    m::upkeep();

    let before = rss_kib();
    // A 500,000-row stretch with upkeep as the housekeeping runs it
    // (every second, ~11,000 rows at the measured ceiling).
    deliver(500_000, Some(11_000));
    m::upkeep();
    let with_upkeep = rss_kib() - before;

    let before = rss_kib();
    deliver(500_000, None);
    let without_upkeep = rss_kib().saturating_sub(before);
    m::upkeep();

    eprintln!(
        "RSS growth over 500,000 rows: {with_upkeep} KiB with upkeep, {without_upkeep} KiB without"
    );
    assert!(
        with_upkeep < 1_024,
        "memory grew {with_upkeep} KiB over 500,000 rows despite upkeep"
    );
    assert!(
        without_upkeep > 4 * 1_024,
        "the samples-held-until-upkeep mechanism this test guards against did not show ({without_upkeep} KiB)"
    );
}
