//! Secrets in configuration.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret token (a shared token between endpoints, a broker credential), never printed.
///
/// ```
/// let t = aqe_core::Token::new("s3cret");
/// assert_eq!(t.expose(), "s3cret");
/// assert_eq!(format!("{t:?}"), "Token(<redacted>)");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}
