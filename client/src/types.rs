//! The domain types of the client's API, and their conversions from and to the contract's
//! messages (which stay private to this crate).

use proto::v1 as pb;

/// Serialized bytes with what the application needs to deserialize them; the service stores
/// them byte for byte and never interprets them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    /// The serialized bytes.
    pub data: Vec<u8>,
    /// Which serializer wrote them (the application's numbering, as Akka's).
    pub serializer_id: i32,
    /// The serializer's type hint (e.g. a type name); may be empty.
    pub manifest: String,
}

impl Payload {
    /// A payload of `data` written by serializer `serializer_id` with type hint `manifest`.
    pub fn new(data: impl Into<Vec<u8>>, serializer_id: i32, manifest: impl Into<String>) -> Self {
        Self {
            data: data.into(),
            serializer_id,
            manifest: manifest.into(),
        }
    }
}

/// An event of a persistence id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The entity the event belongs to.
    pub persistence_id: String,
    /// Its position in the entity's history: 1, 2, 3, ... without gaps.
    pub sequence_nr: i64,
    /// The event itself.
    pub payload: Payload,
    /// Tags the read journal's by-tag queries find it by.
    pub tags: Vec<String>,
    /// The incarnation of the writer that wrote it; may be empty.
    pub writer_uuid: String,
    /// 0 on write: the service stamps the time it received the write.
    pub timestamp_millis: i64,
    /// Metadata stored beside the event (Akka's event metadata).
    pub metadata: Option<Payload>,
}

impl Event {
    /// Event `sequence_nr` of `persistence_id`, untagged.
    pub fn new(persistence_id: impl Into<String>, sequence_nr: i64, payload: Payload) -> Self {
        Self {
            persistence_id: persistence_id.into(),
            sequence_nr,
            payload,
            ..Self::default()
        }
    }

    /// The same event with these tags.
    pub fn tagged<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }
}

/// What the journal did with one atomic write: all of its events stored, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Every event of the write is stored.
    Written,
    /// Not stored, for a reason of the write itself (e.g. a serialization limit).
    Rejected(String),
    /// Not stored: a sequence number already taken (another writer of the persistence id).
    Conflict(String),
}

/// An opaque read-journal position: pass it back to resume after the envelope it came with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Offset(pub String);

impl Offset {
    /// The beginning.
    pub fn start() -> Self {
        Self::default()
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event from a read-journal query, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventEnvelope {
    /// Where the query is after this event.
    pub offset: Offset,
    /// The event.
    pub event: Event,
}

/// One item of a replay: the events, then the persistence id's highest sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// An event, in sequence-number order.
    Event(Event),
    /// The last item: the persistence id's highest sequence number (deleted events included).
    HighestSequenceNr(i64),
}

/// Which state a snapshot is of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotMetadata {
    /// The entity.
    pub persistence_id: String,
    /// The sequence number of the last event the snapshot includes.
    pub sequence_nr: i64,
    /// 0 on save: the service stamps it.
    pub timestamp_millis: i64,
    /// Metadata stored beside the snapshot.
    pub metadata: Option<Payload>,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// What it is of.
    pub metadata: SnapshotMetadata,
    /// The state.
    pub snapshot: Payload,
}

/// Which snapshots a load or delete considers. The default selects every snapshot (a load
/// takes the newest of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotCriteria {
    /// The highest sequence number selected; `None`: unbounded.
    pub max_sequence_nr: Option<i64>,
    /// The latest timestamp selected; `None`: unbounded.
    pub max_timestamp_millis: Option<i64>,
    /// The lowest sequence number selected.
    pub min_sequence_nr: i64,
    /// The earliest timestamp selected.
    pub min_timestamp_millis: i64,
}

impl SnapshotCriteria {
    /// Every snapshot.
    pub fn all() -> Self {
        Self::default()
    }

    /// Snapshots up to `sequence_nr`.
    pub fn up_to(sequence_nr: i64) -> Self {
        Self {
            max_sequence_nr: Some(sequence_nr),
            ..Self::default()
        }
    }
}

/// A durable-state object: its value (absent when missing or deleted) and revision (0 when
/// it never existed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredObject {
    /// The value; `None` when missing or deleted.
    pub value: Option<Payload>,
    /// The stored revision; the next write is this + 1.
    pub revision: i64,
}

/// A change of a durable-state object, from a read-journal query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// Where the query is after this change.
    pub offset: Offset,
    /// The object.
    pub persistence_id: String,
    /// Its revision after the change.
    pub revision: i64,
    /// Absent: the object was deleted.
    pub value: Option<Payload>,
    /// When the change was written (the service's clock).
    pub timestamp_millis: i64,
}

impl From<Payload> for pb::Payload {
    fn from(payload: Payload) -> Self {
        Self {
            data: payload.data,
            serializer_id: payload.serializer_id,
            manifest: payload.manifest,
        }
    }
}

impl From<pb::Payload> for Payload {
    fn from(payload: pb::Payload) -> Self {
        Self {
            data: payload.data,
            serializer_id: payload.serializer_id,
            manifest: payload.manifest,
        }
    }
}

impl From<Event> for pb::PersistentEvent {
    fn from(event: Event) -> Self {
        Self {
            persistence_id: event.persistence_id,
            sequence_nr: event.sequence_nr,
            payload: Some(event.payload.into()),
            writer_uuid: event.writer_uuid,
            timestamp_millis: event.timestamp_millis,
            tags: event.tags,
            metadata: event.metadata.map(Into::into),
        }
    }
}

impl From<pb::PersistentEvent> for Event {
    fn from(event: pb::PersistentEvent) -> Self {
        Self {
            persistence_id: event.persistence_id,
            sequence_nr: event.sequence_nr,
            payload: event.payload.map(Into::into).unwrap_or_default(),
            tags: event.tags,
            writer_uuid: event.writer_uuid,
            timestamp_millis: event.timestamp_millis,
            metadata: event.metadata.map(Into::into),
        }
    }
}

impl From<pb::AtomicWriteResult> for WriteOutcome {
    fn from(result: pb::AtomicWriteResult) -> Self {
        use pb::atomic_write_result::Outcome;
        match result.outcome {
            Some(Outcome::Written(_)) => Self::Written,
            Some(Outcome::Rejected(rejected)) => Self::Rejected(rejected.reason),
            Some(Outcome::Conflict(conflict)) => Self::Conflict(conflict.reason),
            None => Self::Rejected("the service gave no outcome".to_owned()),
        }
    }
}

impl From<pb::EventEnvelope> for EventEnvelope {
    fn from(envelope: pb::EventEnvelope) -> Self {
        Self {
            offset: Offset(envelope.offset),
            event: envelope.event.map(Into::into).unwrap_or_default(),
        }
    }
}

impl From<SnapshotMetadata> for pb::SnapshotMetadata {
    fn from(metadata: SnapshotMetadata) -> Self {
        Self {
            persistence_id: metadata.persistence_id,
            sequence_nr: metadata.sequence_nr,
            timestamp_millis: metadata.timestamp_millis,
            metadata: metadata.metadata.map(Into::into),
        }
    }
}

impl From<pb::SnapshotMetadata> for SnapshotMetadata {
    fn from(metadata: pb::SnapshotMetadata) -> Self {
        Self {
            persistence_id: metadata.persistence_id,
            sequence_nr: metadata.sequence_nr,
            timestamp_millis: metadata.timestamp_millis,
            metadata: metadata.metadata.map(Into::into),
        }
    }
}

impl From<SnapshotCriteria> for pb::SnapshotSelectionCriteria {
    fn from(criteria: SnapshotCriteria) -> Self {
        Self {
            max_sequence_nr: criteria.max_sequence_nr,
            max_timestamp_millis: criteria.max_timestamp_millis,
            min_sequence_nr: criteria.min_sequence_nr,
            min_timestamp_millis: criteria.min_timestamp_millis,
        }
    }
}

impl From<pb::DurableStateChange> for StateChange {
    fn from(change: pb::DurableStateChange) -> Self {
        Self {
            offset: Offset(change.offset),
            persistence_id: change.persistence_id,
            revision: change.revision,
            value: change.value.map(Into::into),
            timestamp_millis: change.timestamp_millis,
        }
    }
}
