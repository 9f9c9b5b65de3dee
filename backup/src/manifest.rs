//! The manifest: what a backup holds and how to read it back. Stored last, as
//! `<backup>/manifest.json`: a backup without one is not complete and is never listed.

use serde::{Deserialize, Serialize};

use crate::compress::Compression;
use crate::error::BackupError;

/// The format this version writes and the newest it reads. 2: one object per collection, parts
/// as byte ranges of it; incremental backups. (1, parts as files of their own, was a
/// development format never released.)
pub const FORMAT_VERSION: u32 = 2;
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    /// When the backup started (RFC 3339).
    pub created_at: String,
    pub source_database: String,
    /// The MongoDB cluster time every collection was read at (a snapshot read).
    pub cluster_time: ClusterTime,
    pub compression: Compression,
    /// The age X25519 recipients (public keys) the parts are encrypted to; empty: not encrypted.
    pub recipients: Vec<String>,
    pub selection: SelectionManifest,
    /// An incremental backup: the backup it builds on (full or incremental), whose cluster time
    /// is `since`. Restoring it restores that chain first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<ClusterTime>,
    pub collections: Vec<CollectionManifest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTime {
    pub seconds: u32,
    pub increment: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectionManifest {
    pub pid_prefix: Option<String>,
    pub tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionManifest {
    /// journal, journal_metadata, snapshots or durable_state.
    pub role: String,
    /// The collection's name in the source database.
    pub name: String,
    /// Records stored: documents, and in an incremental backup the tombstones
    /// (`{"$deleted": <_id>}`) of documents deleted since the base, `deleted` of them.
    pub documents: u64,
    #[serde(default)]
    pub deleted: u64,
    /// An incremental backup: the collection's documents (in the selection) at its cluster
    /// time, which a restored chain must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// BSON bytes of the documents, back to back, before compression.
    pub bytes: u64,
    /// SHA-256 (hex) of those bytes: what a restore must read back.
    pub sha256: String,
    /// The object holding the collection (`<role>.bson[.zst|.gz][.age]`): the parts back to
    /// back, one compressed (and encrypted) stream.
    pub object: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    /// Where the part starts in the object.
    pub offset: u64,
    pub bytes: u64,
    /// SHA-256 (hex) of the stored part: verify names a corrupted or truncated part by it.
    pub sha256: String,
}

impl Manifest {
    /// Parses a stored manifest; a newer format than this version reads is refused by name.
    pub fn parse(backup: &str, bytes: &[u8]) -> Result<Self, BackupError> {
        let invalid = |problem: String| BackupError::Invalid {
            backup: backup.to_owned(),
            problem,
        };
        let loose: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|error| invalid(format!("manifest is not JSON: {error}")))?;
        let version = loose
            .get("formatVersion")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| invalid("manifest has no formatVersion".to_owned()))?;
        if version < 2 {
            return Err(invalid(format!(
                "manifest format version {version} (parts as separate files) was a development \
                 format this eventjournal does not read"
            )));
        }
        if version > u64::from(FORMAT_VERSION) {
            return Err(invalid(format!(
                "manifest format version {version} is newer than this eventjournal reads \
                 ({FORMAT_VERSION}); restore it with a newer eventjournal"
            )));
        }
        serde_json::from_value(loose).map_err(|error| invalid(format!("manifest: {error}")))
    }
}
