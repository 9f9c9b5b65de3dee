//! Bearer tokens and their roles. Tokens come from `auth.tokens-file` and the environment
//! variable `EVENTJOURNAL_AUTH_TOKENS`, one per line (or `;`-separated in the variable):
//!
//! ```text
//! # name     roles         token
//! orders     write,read    3f1c…
//! projector  read          9ad2…
//! ops        admin         77be…
//! ```
//!
//! Secrets never appear in `Debug` output, logs or error messages: errors name the source and
//! line only.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The environment variable holding tokens (it is read as a whole, not as a setting key).
pub const TOKENS_ENV: &str = "EVENTJOURNAL_AUTH_TOKENS";

/// What a token may do. `admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Replay, highest sequence number, snapshot loads, object gets, read-journal queries.
    Read,
    /// Journal writes and deletes, snapshot saves and deletes, durable-state changes.
    Write,
    /// Everything, including operator calls.
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Role> {
        match text {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// One configured token. `Debug` shows its name and roles, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub roles: Vec<Role>,
    secret: String,
}

impl Token {
    pub fn new(name: &str, roles: &[Role], secret: &str) -> Self {
        Self {
            name: name.to_owned(),
            roles: roles.to_vec(),
            secret: secret.to_owned(),
        }
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether this token may act in `role`.
    pub fn allows(&self, role: Role) -> bool {
        self.roles.contains(&Role::Admin) || self.roles.contains(&role)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Parses token lines; `source` names where they came from in errors.
pub fn parse_tokens(text: &str, source: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    for (number, line) in text.split(['\n', ';']).enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{source}, entry {}", number + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, roles, secret] = fields[..] else {
            return Err(format!(
                "{}: expected `<name> <roles> <token>`, got {} field(s)",
                at(),
                fields.len()
            ));
        };
        let roles = roles
            .split(',')
            .map(|role| {
                Role::parse(role).ok_or_else(|| {
                    format!(
                        "{}: unknown role {role:?} for {name:?} (read, write or admin)",
                        at()
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if secret.len() < 16 {
            return Err(format!(
                "{}: the token of {name:?} is shorter than 16 characters",
                at()
            ));
        }
        if tokens.iter().any(|token: &Token| token.name == name) {
            return Err(format!("{}: {name:?} is configured twice", at()));
        }
        tokens.push(Token::new(name, &roles, secret));
    }
    Ok(tokens)
}

/// Tokens from the file, if any, and the environment variable, if set.
pub fn load_tokens(
    file: Option<&Path>,
    environment_value: Option<&str>,
) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        tokens.extend(parse_tokens(&text, &file.display().to_string())?);
    }
    if let Some(value) = environment_value {
        for token in parse_tokens(value, TOKENS_ENV)? {
            if tokens.iter().any(|existing| existing.name == token.name) {
                return Err(format!(
                    "{TOKENS_ENV}: {:?} is also in auth.tokens-file",
                    token.name
                ));
            }
            tokens.push(token);
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_named_tokens_with_roles() {
        let tokens = parse_tokens(
            "# comment\norders write,read 0123456789abcdef\n\nops admin fedcba9876543210",
            "f",
        )
        .unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens[0].allows(Role::Write) && tokens[0].allows(Role::Read));
        assert!(!tokens[0].allows(Role::Admin));
        assert!(tokens[1].allows(Role::Read), "admin may do everything");
        assert_eq!(tokens[1].secret(), "fedcba9876543210");
    }

    #[test]
    fn errors_name_the_entry_but_never_the_secret() {
        for (text, expected) in [
            (
                "orders reed 0123456789abcdef",
                "f, entry 1: unknown role \"reed\"",
            ),
            (
                "orders read",
                "f, entry 1: expected `<name> <roles> <token>`",
            ),
            ("orders read short-secret", "shorter than 16 characters"),
            (
                "a read 0123456789abcdef;a write 0123456789abcdeg",
                "f, entry 2: \"a\" is configured twice",
            ),
        ] {
            let error = parse_tokens(text, "f").unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("0123456789abcde"), "{error}");
            assert!(!error.contains("short-secret"), "{error}");
        }
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let token = Token::new("orders", &[Role::Read], "0123456789abcdef");
        let shown = format!("{token:?}");
        assert!(shown.contains("orders") && !shown.contains("0123456789abcdef"));
    }
}
