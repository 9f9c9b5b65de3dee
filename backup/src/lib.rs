//! Backups of eventjournal's collections, streamed through a pipeline of stages:
//!
//! source (a MongoDB cursor at one cluster time, `source.rs`) -> encode (BSON documents back to
//! back, `backup.rs`) -> compress (`compress.rs`: zstd, gzip, none) -> encrypt (`encrypt.rs`:
//! age X25519 recipients, or none) -> store (`store.rs`: a local directory).
//!
//! The stages run at once over bounded channels: the cursor on the async runtime, compression
//! and encryption on a blocking thread, the store on the runtime again. Memory holds a few chunks
//! and parts whatever the size of the data; nothing goes through a temporary file. Restore and
//! verify run the same stages backwards (`restore.rs`). A backup is complete when its manifest
//! (`manifest.rs`) is stored, which happens last.

mod backup;
pub mod compress;
pub mod encrypt;
mod error;
mod incremental;
pub mod manifest;
mod restore;
mod source;
pub mod store;

pub use backup::{BackupOptions, Progress, Selection, backup};
pub use error::BackupError;
pub use manifest::Manifest;
pub use restore::{RestoreOptions, chain, read_manifest, restore, verify};

/// The collections a backup holds, by the role they play (their names come from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collections {
    pub journal: String,
    pub journal_metadata: String,
    pub snapshots: String,
    pub durable_state: String,
}

impl Collections {
    /// `(role, collection name)` in backup order.
    pub fn all(&self) -> [(&'static str, &str); 4] {
        [
            ("journal", &self.journal),
            ("journal_metadata", &self.journal_metadata),
            ("snapshots", &self.snapshots),
            ("durable_state", &self.durable_state),
        ]
    }
}
