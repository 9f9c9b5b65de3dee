//! The environment as a figment provider, read from a map so tests control it.

use std::collections::HashMap;

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

/// Prefix of the environment variables that set keys: `EVENTJOURNAL_MONGODB__URI` sets
/// `mongodb.uri`, `EVENTJOURNAL_MONGODB__RETRY__MAX_ATTEMPTS` sets `mongodb.retry.max-attempts`.
pub const ENV_PREFIX: &str = "EVENTJOURNAL_";

/// Sections are separated by a double underscore; single underscores stand for the dashes of
/// the TOML keys. Variables without a section separator (such as the test suite's
/// `EVENTJOURNAL_TEST_MONGODB_URI`) are not settings and are ignored.
const SEPARATOR: &str = "__";

pub(crate) struct EnvProvider {
    dict: Dict,
}

impl EnvProvider {
    pub(crate) fn new(env: &HashMap<String, String>) -> Self {
        let mut dict = Dict::new();
        let mut names: Vec<&String> = env.keys().collect();
        names.sort();
        for name in names {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if !key.contains(SEPARATOR) {
                continue;
            }
            let path: Vec<String> = key
                .split(SEPARATOR)
                .map(|part| part.to_lowercase().replace('_', "-"))
                .collect();
            insert(&mut dict, &path, parse_value(&env[name]));
        }
        Self { dict }
    }
}

/// `[a, b]` is a list; anything else stays a string, which the loader's lossy extraction turns
/// into a number or boolean where the key wants one. So `EVENTJOURNAL_MONGODB__DATABASE=2024`
/// still names a database and `..._RETRY__MAX_ATTEMPTS=5` is a number.
fn parse_value(raw: &str) -> Value {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        let Ok(list) = trimmed.parse::<Value>();
        return list;
    }
    Value::from(trimmed.to_owned())
}

fn insert(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            } else {
                let mut inner = Dict::new();
                insert(&mut inner, rest, value);
                *entry = Value::from(inner);
            }
        }
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variables {ENV_PREFIX}*"))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}
