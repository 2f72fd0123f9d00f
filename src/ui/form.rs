//! Form bodies and query strings as ordered, bounded name/value pairs.
//! Repeated names (`id=1&id=2`: the ticked rows) are kept, which a
//! struct-shaped parser would drop.

/// Pairs past this many are ignored: a form never has more.
const MAX_FIELDS: usize = 1000;

/// Values longer than this are cut: no filter or id needs more.
pub const MAX_VALUE: usize = 2048;

#[derive(Debug, Default, Clone)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(encoded: &[u8]) -> Self {
        Fields(
            url::form_urlencoded::parse(encoded)
                .take(MAX_FIELDS)
                .map(|(k, v)| {
                    let mut v = v.into_owned();
                    if v.len() > MAX_VALUE {
                        let mut cut = MAX_VALUE;
                        while !v.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        v.truncate(cut);
                    }
                    (k.into_owned(), v)
                })
                .collect(),
        )
    }

    pub fn from_query(query: Option<&str>) -> Self {
        Self::parse(query.unwrap_or("").as_bytes())
    }

    /// The first value of `name`, blank treated as absent.
    pub fn one(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_names_are_kept_and_values_bounded() {
        let f = Fields::parse(b"id=1&id=2&type=&error=a%20b");
        assert_eq!(f.all("id").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(f.one("type"), None);
        assert_eq!(f.one("error"), Some("a b"));
        let long = format!("x={}", "é".repeat(MAX_VALUE));
        assert!(Fields::parse(long.as_bytes()).one("x").expect("x").len() <= MAX_VALUE);
    }
}
