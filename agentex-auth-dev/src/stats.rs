//! Counts of what the server answered, for tests and `GET /_dev/stats`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::faults::Endpoint;

/// A snapshot of the counters.
///
/// ```json
/// {"endpoints": {"register": {"200": 3, "503": 1, "applied_then_503": 1}},
///  "writes_applied": 4}
/// ```
///
/// Outcomes are the status code answered (`"200"`, `"401"`, `"403"`, `"422"`,
/// `"429"`, `"500"`, `"502"`, `"503"`, ...) except for two injected faults
/// that are counted by kind: `"hang"` (answered 503 after the hang, if the
/// client still listens) and `"applied_then_503"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub endpoints: BTreeMap<String, BTreeMap<String, u64>>,
    /// `WriteRelationships` and `DeleteRelationships` calls that committed.
    pub writes_applied: u64,
}

impl Stats {
    /// The count of one outcome of one endpoint (0 when never seen).
    pub fn count(&self, endpoint: Endpoint, outcome: &str) -> u64 {
        self.endpoints
            .get(endpoint.as_str())
            .and_then(|outcomes| outcomes.get(outcome))
            .copied()
            .unwrap_or(0)
    }
}

#[derive(Default)]
pub struct StatsRecorder {
    stats: Mutex<Stats>,
}

impl StatsRecorder {
    pub fn record(&self, endpoint: Endpoint, outcome: &str) {
        let mut stats = self.lock();
        *stats
            .endpoints
            .entry(endpoint.as_str().to_string())
            .or_default()
            .entry(outcome.to_string())
            .or_default() += 1;
    }

    pub fn write_applied(&self) {
        self.lock().writes_applied += 1;
    }

    pub fn snapshot(&self) -> Stats {
        self.lock().clone()
    }

    pub fn reset(&self) {
        *self.lock() = Stats::default();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        // Each update is a single increment, so a poisoned lock holds
        // consistent counts.
        self.stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
