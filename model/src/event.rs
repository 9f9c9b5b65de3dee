use crate::{
    MAX_TAG_BYTES, MAX_TAGS_PER_EVENT, MAX_WRITER_UUID_BYTES, PersistenceId, SequenceNr,
    ValidationError,
};

/// A serialized user object: stored and returned byte for byte, never interpreted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    pub data: Vec<u8>,
    pub serializer_id: i32,
    pub manifest: String,
}

/// A non-empty tag of at most [`MAX_TAG_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(field: &str, value: String) -> Result<Self, ValidationError> {
        if value.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if value.len() > MAX_TAG_BYTES {
            return Err(ValidationError::new(
                field,
                format!(
                    "is {} bytes long, more than the limit of {MAX_TAG_BYTES}",
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
}

/// One event as written and as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentEvent {
    pub persistence_id: PersistenceId,
    pub sequence_nr: SequenceNr,
    pub payload: Payload,
    pub writer_uuid: String,
    /// Milliseconds since the epoch. 0 in a write means "stamp it on receipt".
    pub timestamp_millis: i64,
    pub tags: Vec<Tag>,
    pub metadata: Option<Payload>,
}

impl PersistentEvent {
    pub(crate) fn check_writer_uuid(field: &str, value: &str) -> Result<(), ValidationError> {
        if value.len() > MAX_WRITER_UUID_BYTES {
            return Err(ValidationError::new(
                field,
                format!(
                    "is {} bytes long, more than the limit of {MAX_WRITER_UUID_BYTES}",
                    value.len()
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn check_tag_count(field: &str, count: usize) -> Result<(), ValidationError> {
        if count > MAX_TAGS_PER_EVENT {
            return Err(ValidationError::new(
                field,
                format!("has {count} tags, more than the limit of {MAX_TAGS_PER_EVENT}"),
            ));
        }
        Ok(())
    }

    /// Same content as `other`, ignoring the timestamp the service stamped: what decides whether
    /// a re-sent write is a retry of the stored one.
    pub fn same_content_as(&self, other: &PersistentEvent) -> bool {
        self.persistence_id == other.persistence_id
            && self.sequence_nr == other.sequence_nr
            && self.payload == other.payload
            && self.writer_uuid == other.writer_uuid
            && self.tags == other.tags
            && self.metadata == other.metadata
    }
}

/// Events of one persistence id with consecutive sequence numbers, to be stored all-or-nothing.
/// Construction guarantees: at least one event, one persistence id, consecutive numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtomicWrite {
    events: Vec<PersistentEvent>,
}

impl AtomicWrite {
    pub fn new(events: Vec<PersistentEvent>) -> Result<Self, ValidationError> {
        let Some(first) = events.first() else {
            return Err(ValidationError::new(
                "events",
                "an atomic write needs at least one event",
            ));
        };
        for (index, pair) in events.windows(2).enumerate() {
            let (previous, event) = (&pair[0], &pair[1]);
            let field = format!("events[{}]", index + 1);
            if event.persistence_id != first.persistence_id {
                return Err(ValidationError::new(
                    format!("{field}.persistence_id"),
                    format!(
                        "is {:?} but events[0] has {:?}; an atomic write is for one persistence id",
                        event.persistence_id.as_str(),
                        first.persistence_id.as_str()
                    ),
                ));
            }
            if previous.sequence_nr.get().checked_add(1) != Some(event.sequence_nr.get()) {
                return Err(ValidationError::new(
                    format!("{field}.sequence_nr"),
                    format!(
                        "is {} but must be {} + 1; sequence numbers in an atomic write are consecutive",
                        event.sequence_nr, previous.sequence_nr
                    ),
                ));
            }
        }
        Ok(Self { events })
    }

    pub fn persistence_id(&self) -> &PersistenceId {
        &self.events[0].persistence_id
    }

    pub fn first_sequence_nr(&self) -> SequenceNr {
        self.events[0].sequence_nr
    }

    pub fn last_sequence_nr(&self) -> SequenceNr {
        self.events[self.events.len() - 1].sequence_nr
    }

    pub fn events(&self) -> &[PersistentEvent] {
        &self.events
    }

    pub fn into_events(self) -> Vec<PersistentEvent> {
        self.events
    }
}
