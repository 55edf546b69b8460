//! Function names. A name becomes a file name in the data directory, a path
//! segment in URLs and a label value in metrics, so it is validated once, here,
//! and everything else takes a [`FunctionName`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest name allowed: a DNS label, so a name can also be a host name.
const MAX_LEN: usize = 63;

/// A function name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FunctionName(String);

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid function name {0:?}: use 1 to 63 characters from a-z, 0-9 and '-', not starting with '-'"
)]
pub struct InvalidName(pub String);

impl FunctionName {
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && name.len() <= MAX_LEN {
            Ok(FunctionName(name.to_string()))
        } else {
            Err(InvalidName(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FunctionName {
    type Error = InvalidName;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        FunctionName::new(&value)
    }
}

impl From<FunctionName> for String {
    fn from(name: FunctionName) -> String {
        name.0
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "hello", "0", "fn-1", &"a".repeat(63)] {
            assert!(FunctionName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "-a",
            "Hello",
            "a_b",
            "a.b",
            "../x",
            "a/b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(FunctionName::new(bad).is_err(), "{bad}");
        }
    }
}
