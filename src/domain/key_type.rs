use std::fmt;
use std::str::FromStr;

/// The host's `agentapikeytype` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKeyType {
    Internal,
    External,
    Github,
    Slack,
}

impl ApiKeyType {
    /// The value stored in PostgreSQL.
    pub fn as_db(self) -> &'static str {
        match self {
            ApiKeyType::Internal => "INTERNAL",
            ApiKeyType::External => "EXTERNAL",
            ApiKeyType::Github => "GITHUB",
            ApiKeyType::Slack => "SLACK",
        }
    }
}

impl fmt::Display for ApiKeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_db().to_ascii_lowercase())
    }
}

impl FromStr for ApiKeyType {
    type Err = String;

    /// Case-insensitive, so both the CLI's `external` and the database's
    /// `EXTERNAL` parse.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "internal" => Ok(ApiKeyType::Internal),
            "external" => Ok(ApiKeyType::External),
            "github" => Ok(ApiKeyType::Github),
            "slack" => Ok(ApiKeyType::Slack),
            _ => Err(format!(
                "unknown key type {s:?} (expected internal, external, github or slack)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_case_and_rejects_unknown() {
        assert_eq!("EXTERNAL".parse::<ApiKeyType>(), Ok(ApiKeyType::External));
        assert_eq!("github".parse::<ApiKeyType>(), Ok(ApiKeyType::Github));
        assert!("oauth".parse::<ApiKeyType>().is_err());
    }
}
