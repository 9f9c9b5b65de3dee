//! The journal's documents in MongoDB. One document per event:
//!
//! ```text
//! { _id: ObjectId,
//!   pid: string, seqNr: int64,              unique together
//!   timestamp: int64,                        event time, ms since the epoch
//!   writtenAt: Date,                         when this server sent the write (read-journal order)
//!   writerUuid: string,
//!   payload: { data: BinData, serializerId: int32, manifest: string },
//!   metadata: { data, serializerId, manifest },   only when the event has metadata
//!   tags: [string],
//!   slice: int32,                            Akka slice of pid, 0..1023
//!   deletedAt: Date,                         only on logically deleted events (TTL purging)
//!   ttl: int32 }                             only in cosmos mode with write-journal.cosmos-ttl
//! ```
//!
//! The metadata collection has one document per persistence id that had events deleted:
//! `{ _id: pid, highestSeqNr: int64 }`.

use model::{Payload, PersistenceId, PersistentEvent, SequenceNr, Tag};
use mongo::PayloadDocument;
use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};

pub const PERSISTENCE_ID: &str = "pid";
pub const SEQUENCE_NR: &str = "seqNr";
pub const TAGS: &str = "tags";
pub const SLICE: &str = "slice";
pub const WRITTEN_AT: &str = "writtenAt";
pub const DELETED_AT: &str = "deletedAt";
pub const TTL: &str = "ttl";
/// In the metadata collection.
pub const HIGHEST_SEQUENCE_NR: &str = "highestSeqNr";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventDocument {
    pub pid: String,
    #[serde(rename = "seqNr")]
    pub seq_nr: i64,
    pub timestamp: i64,
    #[serde(rename = "writtenAt")]
    pub written_at: DateTime,
    #[serde(rename = "writerUuid")]
    pub writer_uuid: String,
    pub payload: PayloadDocument,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<PayloadDocument>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub slice: i32,
    #[serde(rename = "deletedAt", default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i32>,
}

impl EventDocument {
    pub fn new(event: &PersistentEvent, written_at: DateTime) -> Self {
        Self {
            pid: event.persistence_id.as_str().to_owned(),
            seq_nr: event.sequence_nr.get(),
            timestamp: event.timestamp_millis,
            written_at,
            writer_uuid: event.writer_uuid.clone(),
            payload: PayloadDocument::from(&event.payload),
            metadata: event.metadata.as_ref().map(PayloadDocument::from),
            tags: event
                .tags
                .iter()
                .map(|tag| tag.as_str().to_owned())
                .collect(),
            slice: event.persistence_id.slice(),
            deleted_at: None,
            ttl: None,
        }
    }

    /// Back to the domain type. Stored documents were validated when written; one that no
    /// longer validates was changed outside eventjournal and is reported as corrupt.
    pub fn into_event(self) -> Result<PersistentEvent, String> {
        let describe = |error: model::ValidationError| {
            format!(
                "event document (pid {:?}, seqNr {}) is invalid: {error}",
                self.pid, self.seq_nr
            )
        };
        let persistence_id =
            PersistenceId::parse(PERSISTENCE_ID, self.pid.clone()).map_err(describe)?;
        let sequence_nr = SequenceNr::parse(SEQUENCE_NR, self.seq_nr).map_err(describe)?;
        let tags = self
            .tags
            .iter()
            .map(|tag| Tag::parse(TAGS, tag.clone()))
            .collect::<Result<_, _>>()
            .map_err(describe)?;
        Ok(PersistentEvent {
            persistence_id,
            sequence_nr,
            payload: self.payload.into(),
            writer_uuid: self.writer_uuid,
            timestamp_millis: self.timestamp,
            tags,
            metadata: self.metadata.map(Payload::from),
        })
    }
}
