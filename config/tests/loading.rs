//! Loading order, the example file, and validation messages.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{ConfigError, DatabaseMode, Overrides, Settings};

fn example_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("eventjournal.example.toml")
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn temp_toml(contents: &str) -> tempfile_path::TempToml {
    tempfile_path::TempToml::new(contents)
}

/// A TOML file in the target directory, removed on drop.
mod tempfile_path {
    use super::*;

    pub struct TempToml(pub PathBuf);

    impl TempToml {
        pub fn new(contents: &str) -> Self {
            static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "eventjournal-config-test-{}-{n}.toml",
                std::process::id()
            ));
            std::fs::File::create(&path)
                .unwrap()
                .write_all(contents.as_bytes())
                .unwrap();
            Self(path)
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn invalid(result: Result<Settings, ConfigError>) -> String {
    match result {
        Err(error) => error.to_string(),
        Ok(settings) => panic!("expected an error, got {settings:?}"),
    }
}

#[test]
fn example_file_lists_exactly_the_defaults() {
    let from_file = Settings::load(
        Some(&example_file()),
        &HashMap::new(),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(from_file, Settings::default());
}

#[test]
fn example_file_mentions_every_key() {
    // Every leaf key of the defaults, serialized, appears in the example (commented or not).
    let text = std::fs::read_to_string(example_file()).unwrap();
    let defaults = toml::Value::try_from(Settings::default()).unwrap();
    let mut missing = Vec::new();
    fn walk(value: &toml::Value, path: String, text: &str, missing: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (key, value) in table {
                walk(value, format!("{path}{key}."), text, missing);
            }
        } else {
            let key = path
                .trim_end_matches('.')
                .rsplit('.')
                .next()
                .unwrap()
                .to_owned();
            if !text.contains(&format!("{key} =")) {
                missing.push(path);
            }
        }
    }
    walk(&defaults, String::new(), &text, &mut missing);
    for optional in ["ca-file", "certificate-key-file", "cosmos-ttl"] {
        assert!(
            text.contains(&format!("# {optional} =")),
            "{optional} is not documented"
        );
    }
    assert!(
        missing.is_empty(),
        "keys missing from the example file: {missing:?}"
    );
}

#[test]
fn sources_override_in_order_defaults_file_env_flags() {
    let file = temp_toml(
        r#"
        [server]
        listen = "127.0.0.1:7000"
        [mongodb]
        uri = "mongodb://from-file:27017"
        database = "from_file"
        database-mode = "cosmos"
        [mongodb.retry]
        max-attempts = 4
        delay = "1s"
        [write-journal]
        cosmos-ttl = "365d"
        "#,
    );
    let environment = env(&[
        ("EVENTJOURNAL_MONGODB__DATABASE", "2024"),
        ("EVENTJOURNAL_MONGODB__RETRY__MAX_ATTEMPTS", "5"),
        (
            "EVENTJOURNAL_MONGODB__RETRY__RETRYABLE_ERROR_CODES",
            "[91, 189]",
        ),
        ("EVENTJOURNAL_READ_JOURNAL__USE_CHANGE_STREAMS", "true"),
        // Not a setting (no section separator): ignored, not an unknown-key error.
        ("EVENTJOURNAL_TEST_MONGODB_URI", "mongodb://elsewhere"),
        ("PATH", "/usr/bin"),
    ]);
    let overrides = Overrides {
        mongodb_uri: Some("mongodb://from-flag:27017".into()),
        ..Overrides::default()
    };
    let settings = Settings::load(Some(&file.0), &environment, &overrides).unwrap();
    assert_eq!(settings.server.listen.to_string(), "127.0.0.1:7000"); // file
    assert_eq!(settings.mongodb.uri, "mongodb://from-flag:27017"); // flag beats file
    assert_eq!(settings.mongodb.database, "2024"); // env beats file, stays a string
    assert_eq!(settings.mongodb.database_mode, DatabaseMode::Cosmos);
    assert_eq!(settings.mongodb.retry.max_attempts, 5); // env beats file
    assert_eq!(settings.mongodb.retry.retryable_error_codes, vec![91, 189]);
    assert_eq!(settings.mongodb.retry.delay, Duration::from_secs(1));
    assert_eq!(
        settings.write_journal.cosmos_ttl,
        Some(Duration::from_secs(365 * 86_400))
    );
    assert!(settings.read_journal.use_change_streams);
    assert_eq!(settings.read_journal.batch_size, 500); // default
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    let file = temp_toml("[mongodb]\nurl = \"mongodb://typo\"\n");
    let message = invalid(Settings::load(
        Some(&file.0),
        &HashMap::new(),
        &Overrides::default(),
    ));
    assert!(message.contains("url"), "{message}");

    let message = invalid(Settings::load(
        None,
        &env(&[("EVENTJOURNAL_READ_JOURNAL__POLL_INTERVAL", "often")]),
        &Overrides::default(),
    ));
    assert!(message.contains("poll-interval"), "{message}");
    assert!(message.contains("often"), "{message}");
}

#[test]
fn validation_lists_every_bad_key_with_its_value() {
    let file = temp_toml(
        r#"
        [server]
        keep-alive-interval = "1ms"
        keep-alive-timeout = "1ms"
        max-request-memory = "16 MiB"
        message-idle-timeout = "1ms"
        http2-stream-window = "16 KiB"
        http2-connection-window = "8 KiB"
        [mongodb]
        uri = "http://localhost"
        database = "bad.name"
        read-concern = "snapshot"
        [mongodb.retry]
        max-attempts = 0
        [mongodb.collections]
        snapshots = "journal"
        [write-journal]
        cosmos-ttl = "100years"
        [read-journal]
        batch-size = 0
        [read-journal.change-stream-restart]
        min-backoff = "10s"
        max-backoff = "1s"
        random-factor = 1.5
        "#,
    );
    let message = invalid(Settings::load(
        Some(&file.0),
        &HashMap::new(),
        &Overrides::default(),
    ));
    for expected in [
        "server.keep-alive-interval = \"1ms\": must be \"0s\" (no pings) or at least 10ms",
        "server.keep-alive-timeout = \"1ms\": must be at least 10ms",
        "server.max-request-memory = \"16.0 MiB\": must be at least server.max-message-size (32.0 MiB)",
        "server.message-idle-timeout = \"1ms\": must be at least 10ms",
        "server.http2-stream-window = \"16.0 KiB\": must be between 64 KiB and 1 GiB",
        "server.http2-connection-window = \"8.0 KiB\": must be at least 64 KiB and server.http2-stream-window (16.0 KiB), at most 1 GiB",
        "mongodb.uri = \"http://localhost\": must start with mongodb://",
        "mongodb.database = \"bad.name\"",
        "mongodb.read-concern = \"snapshot\"",
        "mongodb.retry.max-attempts = 0",
        "mongodb.collections.snapshots = \"journal\": is also the name of mongodb.collections.journal",
        "write-journal.cosmos-ttl = \"100years",
        "read-journal.batch-size = 0",
        "read-journal.change-stream-restart.max-backoff = \"1s\": must not be below min-backoff",
        "read-journal.change-stream-restart.random-factor = 1.5",
    ] {
        assert!(
            message.contains(expected),
            "missing {expected:?} in:\n{message}"
        );
    }
}

#[test]
fn a_missing_config_file_is_an_error() {
    let message = invalid(Settings::load(
        Some(Path::new("/nonexistent/eventjournal.toml")),
        &HashMap::new(),
        &Overrides::default(),
    ));
    assert_eq!(
        message,
        "configuration file /nonexistent/eventjournal.toml does not exist"
    );
}

#[test]
fn tokens_come_from_the_file_and_the_environment_and_never_show() {
    let tokens = temp_toml("# name roles token\norders write,read file-secret-0123456789\n");
    let file = temp_toml(&format!(
        "[auth]\nenabled = true\ntokens-file = {:?}\n",
        tokens.0.display().to_string()
    ));
    let environment = env(&[(
        "EVENTJOURNAL_AUTH_TOKENS",
        "ops admin env-secret-0123456789; projector read env-secret-9876543210",
    )]);
    let settings = Settings::load(Some(&file.0), &environment, &Overrides::default()).unwrap();
    let names: Vec<&str> = settings
        .auth
        .tokens
        .iter()
        .map(|token| token.name.as_str())
        .collect();
    assert_eq!(names, ["orders", "ops", "projector"]);
    let shown = format!("{settings:?}");
    assert!(!shown.contains("secret-"), "{shown}");

    let message = invalid(Settings::load(
        None,
        &env(&[("EVENTJOURNAL_AUTH__ENABLED", "true")]),
        &Overrides::default(),
    ));
    assert!(
        message.contains("auth.enabled = true: no tokens configured"),
        "{message}"
    );
    let message = invalid(Settings::load(
        None,
        &env(&[
            ("EVENTJOURNAL_AUTH__ENABLED", "true"),
            (
                "EVENTJOURNAL_AUTH_TOKENS",
                "ops superuser env-secret-0123456789",
            ),
        ]),
        &Overrides::default(),
    ));
    assert!(
        message.contains("EVENTJOURNAL_AUTH_TOKENS, entry 1: unknown role \"superuser\""),
        "{message}"
    );
    assert!(!message.contains("env-secret"), "{message}");
}

#[test]
fn watermarks_need_majority_writes_and_reads() {
    let message = invalid(Settings::load(
        None,
        &env(&[
            ("EVENTJOURNAL_MONGODB__WRITE_CONCERN__W", "1"),
            ("EVENTJOURNAL_MONGODB__READ_CONCERN", "local"),
        ]),
        &Overrides::default(),
    ));
    assert!(
        message.contains("mongodb.write-concern.w = \"1\": must be \"majority\""),
        "{message}"
    );
    assert!(
        message.contains("mongodb.read-concern = \"local\": must be majority"),
        "{message}"
    );
    // With the fixed drift both are the operator's choice.
    Settings::load(
        None,
        &env(&[
            ("EVENTJOURNAL_MONGODB__WRITE_CONCERN__W", "1"),
            ("EVENTJOURNAL_MONGODB__READ_CONCERN", "local"),
            ("EVENTJOURNAL_READ_JOURNAL__HORIZON", "fixed-drift"),
        ]),
        &Overrides::default(),
    )
    .unwrap();
}
