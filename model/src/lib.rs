//! Domain types of eventjournal, validated once when a request arrives.
//!
//! The gRPC handlers turn `proto` messages into these types with `TryFrom`; the storage crates
//! only ever see these types, so a persistence id in storage code is known to be non-empty and
//! a sequence number known to be positive.

mod convert;
mod event;
mod ids;

pub use event::{AtomicWrite, Payload, PersistentEvent, Tag};
pub use ids::{NUMBER_OF_SLICES, PersistenceId, SequenceNr};

/// Longest persistence id accepted, in bytes of UTF-8.
pub const MAX_PERSISTENCE_ID_BYTES: usize = 512;
/// Longest tag accepted, in bytes of UTF-8.
pub const MAX_TAG_BYTES: usize = 512;
/// Most tags one event may carry.
pub const MAX_TAGS_PER_EVENT: usize = 256;
/// Longest writer uuid accepted, in bytes of UTF-8.
pub const MAX_WRITER_UUID_BYTES: usize = 512;

/// Input that does not describe a valid request. `field` names where the problem is, in the
/// request's own terms (`events[2].sequence_nr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same problem, one level deeper in the request (`events[2]` + `sequence_nr`).
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}

/// A bound in a range of sequence numbers, where 0 is allowed ("from the start").
pub fn non_negative(field: &str, value: i64) -> Result<i64, ValidationError> {
    if value < 0 {
        Err(ValidationError::new(
            field,
            format!("must not be negative, got {value}"),
        ))
    } else {
        Ok(value)
    }
}

mod replay;
mod snapshot;
mod state;

pub use replay::ReplayRange;
pub use snapshot::{Snapshot, SnapshotMetadata, SnapshotQuery, SnapshotSelectionCriteria};
pub use state::{DeleteObject, Revision, StoredObject, UpsertObject};
