use std::fmt;

use crate::{MAX_PERSISTENCE_ID_BYTES, ValidationError};

/// Akka's number of slices: `EventsBySlices` ranges are within 0..NUMBER_OF_SLICES.
pub const NUMBER_OF_SLICES: i32 = 1024;

/// A non-empty persistence id of at most [`MAX_PERSISTENCE_ID_BYTES`]. Any other content
/// (`$`, `.`, NUL, operator syntax) is stored and returned verbatim, never interpreted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PersistenceId(String);

impl PersistenceId {
    pub fn parse(field: &str, value: String) -> Result<Self, ValidationError> {
        if value.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if value.len() > MAX_PERSISTENCE_ID_BYTES {
            return Err(ValidationError::new(
                field,
                format!(
                    "is {} bytes long, more than the limit of {MAX_PERSISTENCE_ID_BYTES}",
                    value.len()
                ),
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The slice of this persistence id as Akka computes it: `|String.hashCode % 1024|`,
    /// with Java's hash over UTF-16 code units, so Akka projection slice ranges line up.
    pub fn slice(&self) -> i32 {
        (java_string_hash_code(&self.0) % NUMBER_OF_SLICES).abs()
    }
}

impl fmt::Display for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Java's `String.hashCode`: `s[0]*31^(n-1) + ... + s[n-1]` over UTF-16 code units, wrapping.
fn java_string_hash_code(value: &str) -> i32 {
    value.encode_utf16().fold(0i32, |hash, unit| {
        hash.wrapping_mul(31).wrapping_add(i32::from(unit))
    })
}

/// A sequence number of a stored event: 1 or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SequenceNr(i64);

impl SequenceNr {
    pub fn parse(field: &str, value: i64) -> Result<Self, ValidationError> {
        if value <= 0 {
            Err(ValidationError::new(
                field,
                format!("must be 1 or more, got {value}"),
            ))
        } else {
            Ok(Self(value))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for SequenceNr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pid(value: &str) -> PersistenceId {
        PersistenceId::parse("persistence_id", value.to_owned()).unwrap()
    }

    #[test]
    fn java_hash_code_matches_known_values() {
        // Values printed by java.lang.String#hashCode (OpenJDK 17).
        assert_eq!(java_string_hash_code(""), 0);
        assert_eq!(java_string_hash_code("a"), 97);
        assert_eq!(java_string_hash_code("hello"), 99_162_322);
        assert_eq!(java_string_hash_code("polygenelubricants"), i32::MIN);
        // A character outside the BMP counts as two UTF-16 code units.
        assert_eq!(java_string_hash_code("😀"), 1_772_899);
        assert_eq!(java_string_hash_code("customer-42"), -1_772_111_155);
    }

    #[test]
    fn slices_match_akka() {
        // Math.abs(persistenceId.hashCode() % 1024), printed by OpenJDK 17.
        assert_eq!(pid("a").slice(), 97);
        assert_eq!(pid("hello").slice(), 210);
        assert_eq!(pid("polygenelubricants").slice(), 0);
        assert_eq!(pid("😀").slice(), 355);
        assert_eq!(pid("ShoppingCart|cart-1").slice(), 392);
        assert_eq!(pid("customer-42").slice(), 307);
        assert_eq!(pid("pid-1").slice(), 111);
    }

    proptest! {
        #[test]
        fn slice_is_always_in_range(value in "\\PC{1,64}") {
            let slice = pid(&value).slice();
            prop_assert!((0..NUMBER_OF_SLICES).contains(&slice));
        }

        #[test]
        fn persistence_id_validation_never_panics(value in ".{0,600}") {
            let result = PersistenceId::parse("persistence_id", value.clone());
            prop_assert_eq!(result.is_ok(), !value.is_empty() && value.len() <= MAX_PERSISTENCE_ID_BYTES);
        }

        #[test]
        fn sequence_numbers_must_be_positive(value in any::<i64>()) {
            prop_assert_eq!(SequenceNr::parse("sequence_nr", value).is_ok(), value > 0);
        }
    }
}
