//! Fault injection: what can go wrong with a request, how likely, and a
//! seeded random source that decides it.
//!
//! Every authz request draws exactly one number from the RNG, whatever the
//! configured rates, so the same seed and the same sequence of requests give
//! the same sequence of faults, even when rates change between requests.
//! Setting a configuration that carries a `seed` reseeds the RNG.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The endpoints faults can be set for: the HTTP authz endpoints, and the
/// two gRPC calls that write (`WriteRelationships`, `DeleteRelationships`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Register,
    Deregister,
    Check,
    Search,
    Grant,
    Revoke,
    /// gRPC `PermissionsService/WriteRelationships`.
    WriteRelationships,
    /// gRPC `PermissionsService/DeleteRelationships`.
    DeleteRelationships,
}

impl Endpoint {
    pub const ALL: [Endpoint; 8] = [
        Endpoint::Register,
        Endpoint::Deregister,
        Endpoint::Check,
        Endpoint::Search,
        Endpoint::Grant,
        Endpoint::Revoke,
        Endpoint::WriteRelationships,
        Endpoint::DeleteRelationships,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Register => "register",
            Endpoint::Deregister => "deregister",
            Endpoint::Check => "check",
            Endpoint::Search => "search",
            Endpoint::Grant => "grant",
            Endpoint::Revoke => "revoke",
            Endpoint::WriteRelationships => "write_relationships",
            Endpoint::DeleteRelationships => "delete_relationships",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown endpoint {s:?}"))
    }
}

/// Probabilities (each in 0..=1, summing to at most 1) of each fault for one
/// endpoint, and latency added to every request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    /// Answer 500 without doing anything.
    pub status_500: f64,
    /// Answer 502 without doing anything.
    pub status_502: f64,
    /// Answer 503 without doing anything.
    pub status_503: f64,
    /// Answer 429 with `Retry-After`, without doing anything.
    pub status_429: f64,
    /// Sleep `hang_ms` (past the client's timeout), then answer 503 without
    /// doing anything.
    pub hang: f64,
    /// Do the operation (a write commits to SpiceDB), then answer 503: the
    /// caller cannot tell it from a 503 that did nothing.
    pub applied_then_503: f64,
    /// Milliseconds added before every request is handled.
    pub latency_ms: u64,
}

impl FaultRates {
    /// Every request fails the same way; handy in tests.
    pub fn always(fault: Fault) -> FaultRates {
        let mut rates = FaultRates::default();
        match fault {
            Fault::Status500 => rates.status_500 = 1.0,
            Fault::Status502 => rates.status_502 = 1.0,
            Fault::Status503 => rates.status_503 = 1.0,
            Fault::RateLimited => rates.status_429 = 1.0,
            Fault::Hang => rates.hang = 1.0,
            Fault::AppliedThen503 => rates.applied_then_503 = 1.0,
        }
        rates
    }

    /// The same probability spread over the plain server errors (500, 502,
    /// 503): what `--fault-rate` sets.
    pub fn server_errors(rate: f64) -> FaultRates {
        FaultRates {
            status_500: rate / 3.0,
            status_502: rate / 3.0,
            status_503: rate / 3.0,
            ..FaultRates::default()
        }
    }

    /// In draw order; the order fixes which fault a given draw selects.
    fn table(&self) -> [(Fault, f64); 6] {
        [
            (Fault::Status500, self.status_500),
            (Fault::Status502, self.status_502),
            (Fault::Status503, self.status_503),
            (Fault::RateLimited, self.status_429),
            (Fault::Hang, self.hang),
            (Fault::AppliedThen503, self.applied_then_503),
        ]
    }

    fn validate(&self) -> Result<(), String> {
        let mut total = 0.0;
        for (fault, p) in self.table() {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "probability of {fault} must be within 0..=1, got {p}"
                ));
            }
            total += p;
        }
        if total > 1.0 + 1e-9 {
            return Err(format!("fault probabilities sum to {total}, more than 1"));
        }
        Ok(())
    }

    /// The fault a uniform draw in `0..1` selects, if any.
    fn pick(&self, draw: f64) -> Option<Fault> {
        let mut upper = 0.0;
        for (fault, p) in self.table() {
            upper += p;
            if draw < upper {
                return Some(fault);
            }
        }
        None
    }
}

/// The fault configuration: the JSON body of `GET`/`POST /_dev/faults`.
///
/// ```json
/// {
///   "seed": 42,
///   "unauthorized": false,
///   "retry_after_secs": 1,
///   "hang_ms": 30000,
///   "all": {"status_500": 0.0, "status_502": 0.0, "status_503": 0.1,
///           "status_429": 0.0, "hang": 0.0, "applied_then_503": 0.0, "latency_ms": 0},
///   "endpoints": {"register": {"applied_then_503": 0.5}}
/// }
/// ```
///
/// Every field may be left out. An endpoint listed under `endpoints` uses
/// those rates instead of `all` (no field-by-field merge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Seeds the fault RNG; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Answer 401 to every authz request.
    pub unauthorized: bool,
    /// The `Retry-After` header of a 429, in seconds.
    pub retry_after_secs: u64,
    /// How long a hang lasts before it answers 503.
    pub hang_ms: u64,
    /// Rates for endpoints not listed in `endpoints`.
    pub all: FaultRates,
    pub endpoints: BTreeMap<Endpoint, FaultRates>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            seed: None,
            unauthorized: false,
            retry_after_secs: 1,
            hang_ms: 30_000,
            all: FaultRates::default(),
            endpoints: BTreeMap::new(),
        }
    }
}

impl Faults {
    /// No faults: every request is served.
    pub fn none() -> Faults {
        Faults::default()
    }

    pub fn rates(&self, endpoint: Endpoint) -> &FaultRates {
        self.endpoints.get(&endpoint).unwrap_or(&self.all)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.all.validate().map_err(|e| format!("all: {e}"))?;
        for (endpoint, rates) in &self.endpoints {
            rates.validate().map_err(|e| format!("{endpoint}: {e}"))?;
        }
        Ok(())
    }
}

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    Status502,
    Status503,
    RateLimited,
    Hang,
    AppliedThen503,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::Status500 => "status_500",
            Fault::Status502 => "status_502",
            Fault::Status503 => "status_503",
            Fault::RateLimited => "status_429",
            Fault::Hang => "hang",
            Fault::AppliedThen503 => "applied_then_503",
        })
    }
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub unauthorized: bool,
    pub latency: Duration,
    pub fault: Option<Fault>,
    pub retry_after_secs: u64,
    pub hang: Duration,
}

/// The live configuration and its RNG, shared by all requests.
pub struct FaultInjector {
    state: Mutex<(Faults, StdRng)>,
}

impl FaultInjector {
    pub fn new(faults: Faults) -> FaultInjector {
        let rng = rng_for(&faults);
        FaultInjector {
            state: Mutex::new((faults, rng)),
        }
    }

    pub fn get(&self) -> Faults {
        self.lock().0.clone()
    }

    /// Replaces the configuration; reseeds when it carries a seed.
    pub fn set(&self, faults: Faults) {
        let mut state = self.lock();
        if faults.seed.is_some() {
            state.1 = rng_for(&faults);
        }
        state.0 = faults;
    }

    /// Decides the fate of one request to `endpoint`, drawing once.
    pub fn decide(&self, endpoint: Endpoint) -> Decision {
        let mut state = self.lock();
        let draw: f64 = state.1.random();
        let faults = &state.0;
        let rates = faults.rates(endpoint);
        Decision {
            unauthorized: faults.unauthorized,
            latency: Duration::from_millis(rates.latency_ms),
            fault: rates.pick(draw),
            retry_after_secs: faults.retry_after_secs,
            hang: Duration::from_millis(faults.hang_ms),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Faults, StdRng)> {
        // The state is replaced whole under the lock, so a panic elsewhere
        // cannot leave it half-written: recovering a poisoned lock is safe.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn rng_for(faults: &Faults) -> StdRng {
    match faults.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(faults: &Faults, n: usize) -> Vec<Option<Fault>> {
        let injector = FaultInjector::new(faults.clone());
        (0..n)
            .map(|_| injector.decide(Endpoint::Register).fault)
            .collect()
    }

    #[test]
    fn same_seed_gives_same_sequence() {
        let faults = Faults {
            seed: Some(7),
            all: FaultRates {
                status_503: 0.3,
                status_429: 0.2,
                ..FaultRates::default()
            },
            ..Faults::default()
        };
        let a = outcomes(&faults, 200);
        assert_eq!(a, outcomes(&faults, 200));
        let other = Faults {
            seed: Some(8),
            ..faults.clone()
        };
        assert_ne!(a, outcomes(&other, 200));
        let failures = a.iter().filter(|f| f.is_some()).count();
        assert!(
            (60..140).contains(&failures),
            "about half fail, got {failures}"
        );
    }

    #[test]
    fn no_rates_means_no_faults() {
        assert!(outcomes(&Faults::none(), 100).iter().all(Option::is_none));
    }

    #[test]
    fn certain_fault_always_fires() {
        let faults = Faults {
            all: FaultRates::always(Fault::AppliedThen503),
            ..Faults::default()
        };
        assert!(
            outcomes(&faults, 50)
                .iter()
                .all(|f| *f == Some(Fault::AppliedThen503))
        );
    }

    #[test]
    fn endpoint_rates_override_all() {
        let mut faults = Faults {
            all: FaultRates::always(Fault::Status500),
            ..Faults::default()
        };
        faults
            .endpoints
            .insert(Endpoint::Check, FaultRates::default());
        let injector = FaultInjector::new(faults);
        assert_eq!(injector.decide(Endpoint::Check).fault, None);
        assert_eq!(
            injector.decide(Endpoint::Register).fault,
            Some(Fault::Status500)
        );
    }

    #[test]
    fn reseeding_restarts_the_sequence() {
        let faults = Faults {
            seed: Some(1),
            all: FaultRates::server_errors(0.5),
            ..Faults::default()
        };
        let injector = FaultInjector::new(faults.clone());
        let first: Vec<_> = (0..20)
            .map(|_| injector.decide(Endpoint::Grant).fault)
            .collect();
        injector.set(faults);
        let second: Vec<_> = (0..20)
            .map(|_| injector.decide(Endpoint::Grant).fault)
            .collect();
        assert_eq!(first, second);
    }

    #[test]
    fn validation_rejects_bad_probabilities() {
        let too_much = Faults {
            all: FaultRates {
                status_500: 0.6,
                status_503: 0.6,
                ..FaultRates::default()
            },
            ..Faults::default()
        };
        assert!(too_much.validate().is_err());
        let negative = Faults {
            all: FaultRates {
                hang: -0.1,
                ..FaultRates::default()
            },
            ..Faults::default()
        };
        assert!(negative.validate().is_err());
        assert!(Faults::none().validate().is_ok());
    }

    #[test]
    fn json_shape_round_trips_and_defaults() {
        let faults: Faults = serde_json::from_str(
            r#"{"seed":3,"endpoints":{"register":{"applied_then_503":0.5}},"all":{"latency_ms":5}}"#,
        )
        .expect("parses");
        assert_eq!(faults.hang_ms, 30_000);
        assert_eq!(faults.retry_after_secs, 1);
        assert_eq!(faults.rates(Endpoint::Register).applied_then_503, 0.5);
        assert_eq!(faults.rates(Endpoint::Check).latency_ms, 5);
        let json = serde_json::to_string(&faults).expect("serialises");
        assert_eq!(
            serde_json::from_str::<Faults>(&json).expect("re-parses"),
            faults
        );
        assert!(serde_json::from_str::<Faults>(r#"{"endpoints":{"bogus":{}}}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"typo":1}"#).is_err());
    }
}
