//! What reconcile found, and how it is shown: a table for people, JSON for
//! jobs that alert on it.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;

use crate::display::{self, Escaped};

/// The kinds of drift, as they appear in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Relationships in SpiceDB, no row: someone keeps access to a deleted key.
    Orphan,
    /// A row without its relationships (none, no owner edge, or no parent
    /// edge): the key fails closed.
    Missing,
    /// The parent edge points at another parent than the row's.
    ParentMismatch,
    /// A relationship whose subject the row names in a column (a document's
    /// `owner@user:{owner_id}`, SpiceDB target) points at another subject.
    SubjectMismatch,
    /// The owner edges SpiceDB holds are not those of the principals the
    /// resource was registered as: one was written behind the outbox, or a
    /// registered one is gone.
    OwnerMismatch,
    /// Missing or mismatched, and no creator is known to register it as.
    NeedsOwner,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Orphan => "orphan",
            FindingKind::Missing => "missing",
            FindingKind::ParentMismatch => "parent_mismatch",
            FindingKind::SubjectMismatch => "subject_mismatch",
            FindingKind::OwnerMismatch => "owner_mismatch",
            FindingKind::NeedsOwner => "needs_owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "orphan" => Some(FindingKind::Orphan),
            "missing" => Some(FindingKind::Missing),
            "parent_mismatch" => Some(FindingKind::ParentMismatch),
            "subject_mismatch" => Some(FindingKind::SubjectMismatch),
            "owner_mismatch" => Some(FindingKind::OwnerMismatch),
            "needs_owner" => Some(FindingKind::NeedsOwner),
            _ => None,
        }
    }
}

/// One drifted resource.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// `TYPE:SELECTOR`, e.g. `task:t1` or `schedule:run-schedule::a1::s1`.
    pub resource: String,
    pub reason: String,
    /// The parent the live row names (types with a parent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_parent: Option<String>,
    /// The parents SpiceDB holds for it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spicedb_parents: Vec<String>,
    /// The owner SpiceDB holds, as `user:U` or `service_account:S`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// What `--apply` enqueues (or enqueued) for it.
    pub fix: String,
    /// Whether this run enqueued the fix.
    pub enqueued: bool,
}

/// Counts by kind for one resource type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeCounts {
    pub consistent: u64,
    pub orphan: u64,
    pub missing: u64,
    pub parent_mismatch: u64,
    pub subject_mismatch: u64,
    pub owner_mismatch: u64,
    pub needs_owner: u64,
    pub in_flight: u64,
    pub young: u64,
    /// Resources of this type SpiceDB holds.
    pub spicedb_resources: u64,
    /// orphan + missing + parent_mismatch + subject_mismatch +
    /// owner_mismatch + needs_owner.
    pub drift: u64,
}

impl TypeCounts {
    pub fn drift(&self) -> u64 {
        self.orphan
            + self.missing
            + self.parent_mismatch
            + self.subject_mismatch
            + self.owner_mismatch
            + self.needs_owner
    }

    /// Deregisters `--apply` would enqueue: one per orphan and mismatch.
    pub fn deregisters(&self) -> u64 {
        self.orphan + self.parent_mismatch + self.subject_mismatch + self.owner_mismatch
    }
}

/// Counts by kind, in total and per resource type. `drift` is what the
/// metric and the exit code use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub consistent: u64,
    pub orphan: u64,
    pub missing: u64,
    pub parent_mismatch: u64,
    pub subject_mismatch: u64,
    pub owner_mismatch: u64,
    pub needs_owner: u64,
    /// Drifted, but an undelivered outbox row will change it: left alone.
    pub in_flight: u64,
    /// Drifted, but younger than the grace period: left alone.
    pub young: u64,
    /// Relationships read from SpiceDB, and the resources they describe.
    pub spicedb_relationships: u64,
    pub spicedb_resources: u64,
    /// Drifted resources: orphan + missing + parent_mismatch +
    /// subject_mismatch + owner_mismatch + needs_owner.
    pub drift: u64,
    /// The same counts for each resource type compared (every type the
    /// run covered is present, zero or not).
    pub by_type: BTreeMap<String, TypeCounts>,
}

impl Summary {
    /// A summary covering `types`, all counts zero.
    pub fn for_types<S: AsRef<str>>(types: &[S]) -> Self {
        Summary {
            by_type: types
                .iter()
                .map(|t| (t.as_ref().to_string(), TypeCounts::default()))
                .collect(),
            ..Summary::default()
        }
    }

    /// Sets each type's drift, and the totals from the types.
    pub fn total(&mut self) {
        let relationships = self.spicedb_relationships;
        let by_type = std::mem::take(&mut self.by_type);
        *self = Summary {
            spicedb_relationships: relationships,
            ..Summary::default()
        };
        for (resource_type, mut c) in by_type {
            c.drift = c.drift();
            self.consistent += c.consistent;
            self.orphan += c.orphan;
            self.missing += c.missing;
            self.parent_mismatch += c.parent_mismatch;
            self.subject_mismatch += c.subject_mismatch;
            self.owner_mismatch += c.owner_mismatch;
            self.needs_owner += c.needs_owner;
            self.in_flight += c.in_flight;
            self.young += c.young;
            self.spicedb_resources += c.spicedb_resources;
            self.by_type.insert(resource_type, c);
        }
        self.drift = self.drift();
    }

    pub fn drift(&self) -> u64 {
        self.orphan
            + self.missing
            + self.parent_mismatch
            + self.subject_mismatch
            + self.owner_mismatch
            + self.needs_owner
    }

    /// Deregisters `--apply` would enqueue: one per orphan and mismatch.
    pub fn deregisters(&self) -> u64 {
        self.orphan + self.parent_mismatch + self.subject_mismatch + self.owner_mismatch
    }
}

/// Prints findings as they stream out, then the summary.
pub struct Printer<W: Write> {
    out: W,
    json: bool,
    first: bool,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, json: bool) -> Self {
        Printer {
            out,
            json,
            first: true,
        }
    }

    pub fn finding(&mut self, f: &Finding) -> io::Result<()> {
        if self.json {
            if self.first {
                writeln!(self.out, "{{\"findings\": [")?;
            } else {
                writeln!(self.out, ",")?;
            }
            write!(self.out, "  {}", serde_json::to_string(f)?)?;
        } else {
            if self.first {
                writeln!(
                    self.out,
                    "{:<16} {:<48} {:<28} REASON",
                    "KIND", "RESOURCE", "FIX"
                )?;
            }
            let fix = if f.enqueued {
                format!("{} (enqueued)", f.fix)
            } else {
                f.fix.clone()
            };
            // The resource and the reason quote rows any writer wrote and
            // what SpiceDB holds: one escaped line per finding.
            writeln!(
                self.out,
                "{:<16} {:<48} {:<28} {}",
                f.kind.as_str(),
                Escaped(&f.resource),
                Escaped(&fix),
                display::error_line(&f.reason)
            )?;
        }
        self.first = false;
        Ok(())
    }

    /// Ends the report; `extra` is added to the JSON object (applied, run id).
    pub fn finish(
        &mut self,
        summary: &Summary,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> io::Result<()> {
        if self.json {
            if self.first {
                write!(self.out, "{{\"findings\": [")?;
            } else {
                writeln!(self.out)?;
            }
            write!(
                self.out,
                "],\n\"summary\": {}",
                serde_json::to_string(summary)?
            )?;
            for (k, v) in extra {
                write!(self.out, ",\n{}: {}", serde_json::to_string(&k)?, v)?;
            }
            writeln!(self.out, "}}")?;
        } else {
            if !self.first {
                writeln!(self.out)?;
            }
            let rows: [(&str, u64); 11] = [
                ("consistent", summary.consistent),
                ("orphan", summary.orphan),
                ("missing", summary.missing),
                ("parent_mismatch", summary.parent_mismatch),
                ("subject_mismatch", summary.subject_mismatch),
                ("owner_mismatch", summary.owner_mismatch),
                ("needs_owner", summary.needs_owner),
                ("in_flight", summary.in_flight),
                ("young", summary.young),
                ("drift", summary.drift),
                ("spicedb_resources", summary.spicedb_resources),
            ];
            writeln!(self.out, "{:<18} {:>10}", "SUMMARY", "COUNT")?;
            for (name, n) in rows {
                writeln!(self.out, "{name:<18} {n:>10}")?;
            }
            if !summary.by_type.is_empty() {
                writeln!(self.out)?;
                writeln!(
                    self.out,
                    "{:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}",
                    "TYPE",
                    "CONSISTENT",
                    "ORPHAN",
                    "MISSING",
                    "PARENT",
                    "SUBJECT",
                    "OWNER",
                    "NO_OWNER",
                    "IN_FLIGHT",
                    "YOUNG",
                    "IN_SPICEDB"
                )?;
                for (t, c) in &summary.by_type {
                    let t = Escaped(t);
                    writeln!(
                        self.out,
                        "{t:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}",
                        c.consistent,
                        c.orphan,
                        c.missing,
                        c.parent_mismatch,
                        c.subject_mismatch,
                        c.owner_mismatch,
                        c.needs_owner,
                        c.in_flight,
                        c.young,
                        c.spicedb_resources
                    )?;
                }
            }
            for (k, v) in extra {
                writeln!(self.out, "{k}: {}", display::error_line(&v.to_string()))?;
            }
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding() -> Finding {
        Finding {
            kind: FindingKind::ParentMismatch,
            resource: "api_key:k1".into(),
            reason: "parent edge points at another agent".into(),
            row_parent: Some("a1".into()),
            spicedb_parents: vec!["a2".into()],
            owner: Some("user:u1".into()),
            fix: "deregister + register".into(),
            enqueued: false,
        }
    }

    #[test]
    fn json_report_is_one_valid_document() {
        let mut out = Vec::new();
        let mut p = Printer::new(&mut out, true);
        p.finding(&finding()).expect("write");
        p.finding(&finding()).expect("write");
        let summary = Summary {
            parent_mismatch: 2,
            drift: 2,
            ..Summary::default()
        };
        p.finish(&summary, Default::default()).expect("write");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["summary"]["parent_mismatch"], 2);
        assert_eq!(v["findings"][1]["kind"], "parent_mismatch");
        assert_eq!(v["findings"][0]["resource"], "api_key:k1");
    }

    #[test]
    fn empty_json_report_is_valid() {
        let mut out = Vec::new();
        Printer::new(&mut out, true)
            .finish(&Summary::default(), Default::default())
            .expect("write");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["findings"], serde_json::json!([]));
    }

    #[test]
    fn the_table_shows_outside_text_escaped_one_line_per_finding() {
        let hostile = Finding {
            resource: "task:t1\u{1b}[2J\nforged".into(),
            reason: "owner user:u\u{202e}1 differs\r\n".into(),
            ..finding()
        };
        let mut out = Vec::new();
        let mut p = Printer::new(&mut out, false);
        p.finding(&hostile).expect("write");
        let mut summary = Summary::for_types(&["doc\u{1b}[31m"]);
        summary.total();
        let mut extra = serde_json::Map::new();
        extra.insert("refused".into(), "too many\u{202e}deregisters".into());
        extra.insert("applied".into(), false.into());
        p.finish(&summary, extra).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            !text.chars().any(|c| c != '\n' && display::needs_escape(c)),
            "{text:?}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("task:t1\\u{1b}[2J\\nforged")
                && lines[1].contains("owner user:u\\u{202e}1 differs"),
            "{text}"
        );
        assert!(text.contains("doc\\u{1b}[31m"), "{text}");
        assert!(
            text.contains("refused: \"too many\\u{202e}deregisters\""),
            "{text}"
        );
        assert!(text.contains("applied: false"), "{text}");
    }

    #[test]
    fn deregisters_count_orphans_and_mismatches() {
        let s = Summary {
            orphan: 3,
            parent_mismatch: 2,
            missing: 7,
            owner_mismatch: 4,
            ..Summary::default()
        };
        assert_eq!(s.deregisters(), 9);
        assert_eq!(s.drift(), 16);
    }

    #[test]
    fn owner_mismatch_is_counted_shown_and_named_in_json() {
        let mut summary = Summary::for_types(&["agent", "task"]);
        if let Some(t) = summary.by_type.get_mut("task") {
            t.owner_mismatch = 2;
        }
        summary.total();
        assert_eq!((summary.owner_mismatch, summary.drift), (2, 2));
        assert_eq!(summary.by_type["task"].drift, 2);
        assert_eq!(
            FindingKind::parse("owner_mismatch"),
            Some(FindingKind::OwnerMismatch)
        );
        let mut out = Vec::new();
        Printer::new(&mut out, true)
            .finish(&summary, Default::default())
            .expect("write");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["summary"]["owner_mismatch"], 2);
        assert_eq!(v["summary"]["by_type"]["task"]["owner_mismatch"], 2);
        let mut out = Vec::new();
        Printer::new(&mut out, false)
            .finish(&summary, Default::default())
            .expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains(&format!("{:<18} {:>10}", "owner_mismatch", 2)),
            "{text}"
        );
        assert!(text.contains(" OWNER "), "{text}");
    }
}
