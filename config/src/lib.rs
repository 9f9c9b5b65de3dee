//! eventjournal settings.
//!
//! [`Settings::load`] is the one loader: defaults < TOML file < `EVENTJOURNAL_` environment
//! < command-line flags, then one validation pass ([`Settings::validate`]) whose errors name the
//! key and the bad value. `config/eventjournal.example.toml` documents every key; a test keeps
//! it in step with the defaults here.

pub mod auth;
mod env;
mod settings;
mod validate;

pub use env::ENV_PREFIX;
pub use settings::*;
pub use validate::{ConfigError, InvalidSetting, redact_uri};
