use std::fmt;
use std::str::FromStr;

/// What a row asks agentex-auth to do with its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Touch the owner edge (and the parent edge, if any).
    Register,
    /// Delete every relationship of the resource.
    Deregister,
}

impl Operation {
    /// The name stored in `authz_outbox.operation` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Register => "register",
            Operation::Deregister => "deregister",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "register" => Ok(Operation::Register),
            "deregister" => Ok(Operation::Deregister),
            other => Err(format!("unknown operation {other:?}")),
        }
    }
}
