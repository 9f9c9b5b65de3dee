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
use mongo::{EncodeError, MAX_DOCUMENT_BYTES, PayloadDocument};
use mongodb::bson::oid::ObjectId;
use mongodb::bson::raw::{RawArrayBuf, RawBinaryRef, RawBsonRef};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{DateTime, RawDocumentBuf};
use serde::{Deserialize, Serialize};

pub const PERSISTENCE_ID: &str = "pid";
pub const SEQUENCE_NR: &str = "seqNr";
pub const TIMESTAMP: &str = "timestamp";
pub const WRITER_UUID: &str = "writerUuid";
pub const PAYLOAD: &str = "payload";
pub const METADATA: &str = "metadata";
pub const TAGS: &str = "tags";
pub const SLICE: &str = "slice";
pub const WRITTEN_AT: &str = "writtenAt";
pub const DELETED_AT: &str = "deletedAt";
pub const TTL: &str = "ttl";
/// In the metadata collection.
pub const HIGHEST_SEQUENCE_NR: &str = "highestSeqNr";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventDocument {
    /// First, so the writer can stamp an encoded document in place (see [`stamp`]).
    #[serde(rename = "writtenAt")]
    pub written_at: DateTime,
    pub pid: String,
    #[serde(rename = "seqNr")]
    pub seq_nr: i64,
    pub timestamp: i64,
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

/// An event encoded for insertion, its `writtenAt` still to be stamped. (Always `Some`: the
/// option lets [`EncodedEvent::stamp`] take the bytes out without allocating a placeholder.)
#[derive(Debug, Clone)]
pub struct EncodedEvent(Option<RawDocumentBuf>);

/// `_id` is the first element (type byte, `"_id\0"`, 12 bytes of ObjectId: 17 bytes after the
/// length), `writtenAt` the second: type byte 0x09 (UTC datetime) at offset 21, then the key,
/// then the 8 bytes of the value.
const WRITTEN_AT_VALUE: std::ops::Range<usize> = 32..40;

/// Bytes of an encoded event besides its strings and binary data (field names, types, lengths,
/// numbers; `metadata` and one tag's overhead included), so a document is allocated once.
const FIXED_BYTES: usize = 256;

/// `{ data: BinData, serializerId: int32, manifest: string }`, as [`PayloadDocument`].
fn payload_document(payload: &Payload) -> RawDocumentBuf {
    let mut document = with_capacity(64 + payload.data.len() + payload.manifest.len());
    document.append_ref(
        "data",
        RawBsonRef::Binary(RawBinaryRef {
            subtype: BinarySubtype::Generic,
            bytes: &payload.data,
        }),
    );
    document.append_ref("serializerId", payload.serializer_id);
    document.append_ref("manifest", payload.manifest.as_str());
    document
}

/// An empty document with room for `bytes`, so appending to it does not reallocate.
fn with_capacity(bytes: usize) -> RawDocumentBuf {
    let mut empty = Vec::with_capacity(bytes);
    empty.extend_from_slice(RawDocumentBuf::new().as_bytes());
    match RawDocumentBuf::from_bytes(empty) {
        Ok(document) => document,
        Err(error) => unreachable!("an empty document is valid: {error}"),
    }
}

impl EncodedEvent {
    /// Encodes `event`, refusing one that does not fit in a MongoDB document. The fields are
    /// those of [`EventDocument`], in its order, written straight from the event (no copy of
    /// the payload in between): this runs for every event received.
    pub fn new(event: &PersistentEvent) -> Result<Self, EncodeError> {
        let metadata_bytes = event
            .metadata
            .as_ref()
            .map_or(0, |metadata| metadata.data.len());
        let binary_bytes = event.payload.data.len() + metadata_bytes;
        if binary_bytes > MAX_DOCUMENT_BYTES {
            return Err(EncodeError::TooLarge {
                size: binary_bytes,
                at_least: true,
            });
        }
        let payloads = [Some(&event.payload), event.metadata.as_ref()]
            .into_iter()
            .flatten()
            .map(|payload| payload.data.len() + payload.manifest.len())
            .sum::<usize>();
        let strings = event.persistence_id.as_str().len()
            + event.writer_uuid.len()
            + event
                .tags
                .iter()
                .map(|tag| tag.as_str().len() + 8)
                .sum::<usize>();
        let mut document = with_capacity(FIXED_BYTES + payloads + strings);
        // The driver would otherwise give each document an `_id` by copying it behind one.
        document.append_ref("_id", ObjectId::new());
        document.append_ref(WRITTEN_AT, RawBsonRef::DateTime(DateTime::from_millis(0)));
        document.append_ref(PERSISTENCE_ID, event.persistence_id.as_str());
        document.append_ref(SEQUENCE_NR, event.sequence_nr.get());
        document.append_ref(TIMESTAMP, event.timestamp_millis);
        document.append_ref(WRITER_UUID, event.writer_uuid.as_str());
        document.append_ref(PAYLOAD, &payload_document(&event.payload));
        if let Some(metadata) = &event.metadata {
            document.append_ref(METADATA, &payload_document(metadata));
        }
        let mut tags = RawArrayBuf::new();
        for tag in &event.tags {
            tags.push(tag.as_str());
        }
        document.append_ref(TAGS, &tags);
        document.append_ref(SLICE, event.persistence_id.slice());
        let size = document.as_bytes().len();
        if size > MAX_DOCUMENT_BYTES {
            return Err(EncodeError::TooLarge {
                size,
                at_least: false,
            });
        }
        Ok(Self(Some(document)))
    }

    pub fn len(&self) -> usize {
        self.document().as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Sets `writtenAt` in place: the writer stamps each attempt as late as possible.
    pub fn stamp(&mut self, at: DateTime) {
        let Some(document) = self.0.take() else {
            unreachable!("an encoded event always holds its document");
        };
        let mut bytes = document.into_bytes();
        bytes[WRITTEN_AT_VALUE].copy_from_slice(&at.timestamp_millis().to_le_bytes());
        self.0 = match RawDocumentBuf::from_bytes(bytes) {
            Ok(document) => Some(document),
            // Length and terminator are untouched, and that is all `from_bytes` checks.
            Err(error) => unreachable!("stamping changed the document's frame: {error}"),
        };
    }

    pub fn document(&self) -> &RawDocumentBuf {
        match &self.0 {
            Some(document) => document,
            None => unreachable!("an encoded event always holds its document"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamping_changes_only_written_at() {
        let event = PersistentEvent {
            persistence_id: PersistenceId::parse("pid", "p-1".to_owned()).unwrap(),
            sequence_nr: SequenceNr::parse("seq", 7).unwrap(),
            payload: Payload {
                data: vec![1, 2, 3],
                serializer_id: 4,
                manifest: "m".to_owned(),
            },
            writer_uuid: "w".to_owned(),
            timestamp_millis: 99,
            tags: vec![
                Tag::parse("tag", "t".to_owned()).unwrap(),
                Tag::parse("tag", "$in.x".to_owned()).unwrap(),
            ],
            metadata: Some(Payload {
                data: vec![0, 255],
                serializer_id: -5,
                manifest: "meta".to_owned(),
            }),
        };
        let mut encoded = EncodedEvent::new(&event).unwrap();
        let at = DateTime::from_millis(1_795_000_000_123);
        encoded.stamp(at);
        // An `_id` first, then byte for byte what serializing the document type gives.
        let mut elements = encoded.document().iter();
        let (key, id) = elements.next().unwrap().unwrap();
        assert_eq!(key, "_id");
        assert!(id.as_object_id().is_some(), "{id:?}");
        let mut without_id = RawDocumentBuf::new();
        for element in elements {
            let (key, value) = element.unwrap();
            without_id.append_ref(key, value);
        }
        let serialized =
            mongodb::bson::to_raw_document_buf(&EventDocument::new(&event, at)).unwrap();
        assert_eq!(without_id.as_bytes(), serialized.as_bytes());
        let decoded: EventDocument =
            mongodb::bson::from_slice(encoded.document().as_bytes()).unwrap();
        assert_eq!(decoded.written_at, at);
        assert_eq!(decoded.into_event().unwrap(), event);
    }
}
