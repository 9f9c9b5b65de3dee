//! Conversions between the gRPC contract and the domain types: validation happens here, once.

use proto::v1 as pb;

use crate::{
    AtomicWrite, Payload, PersistenceId, PersistentEvent, SequenceNr, Tag, ValidationError,
};

impl From<pb::Payload> for Payload {
    fn from(payload: pb::Payload) -> Self {
        Self {
            data: payload.data,
            serializer_id: payload.serializer_id,
            manifest: payload.manifest,
        }
    }
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

impl TryFrom<pb::PersistentEvent> for PersistentEvent {
    type Error = ValidationError;

    fn try_from(event: pb::PersistentEvent) -> Result<Self, ValidationError> {
        let persistence_id = PersistenceId::parse("persistence_id", event.persistence_id)?;
        let sequence_nr = SequenceNr::parse("sequence_nr", event.sequence_nr)?;
        let payload = event
            .payload
            .ok_or_else(|| ValidationError::new("payload", "is required"))?
            .into();
        PersistentEvent::check_writer_uuid("writer_uuid", &event.writer_uuid)?;
        if event.timestamp_millis < 0 {
            return Err(ValidationError::new(
                "timestamp_millis",
                format!("must not be negative, got {}", event.timestamp_millis),
            ));
        }
        PersistentEvent::check_tag_count("tags", event.tags.len())?;
        let tags = event
            .tags
            .into_iter()
            .enumerate()
            .map(|(index, tag)| Tag::parse(&format!("tags[{index}]"), tag))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            persistence_id,
            sequence_nr,
            payload,
            writer_uuid: event.writer_uuid,
            timestamp_millis: event.timestamp_millis,
            tags,
            metadata: event.metadata.map(Payload::from),
        })
    }
}

impl From<PersistentEvent> for pb::PersistentEvent {
    fn from(event: PersistentEvent) -> Self {
        Self {
            persistence_id: event.persistence_id.into_string(),
            sequence_nr: event.sequence_nr.get(),
            payload: Some(event.payload.into()),
            writer_uuid: event.writer_uuid,
            timestamp_millis: event.timestamp_millis,
            tags: event.tags.into_iter().map(Tag::into_string).collect(),
            metadata: event.metadata.map(pb::Payload::from),
        }
    }
}

impl TryFrom<pb::AtomicWrite> for AtomicWrite {
    type Error = ValidationError;

    fn try_from(write: pb::AtomicWrite) -> Result<Self, ValidationError> {
        let events = write
            .events
            .into_iter()
            .enumerate()
            .map(|(index, event)| {
                PersistentEvent::try_from(event)
                    .map_err(|error| error.within(&format!("events[{index}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AtomicWrite::new(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(pid: &str, seq_nr: i64) -> pb::PersistentEvent {
        pb::PersistentEvent {
            persistence_id: pid.to_owned(),
            sequence_nr: seq_nr,
            payload: Some(pb::Payload {
                data: vec![1, 2],
                serializer_id: 1,
                manifest: "m".into(),
            }),
            ..Default::default()
        }
    }

    fn reason(write: pb::AtomicWrite) -> String {
        AtomicWrite::try_from(write).unwrap_err().to_string()
    }

    #[test]
    fn rejects_invalid_atomic_writes_naming_the_field() {
        assert_eq!(
            reason(pb::AtomicWrite { events: vec![] }),
            "events: an atomic write needs at least one event"
        );
        assert_eq!(
            reason(pb::AtomicWrite {
                events: vec![event("", 1)]
            }),
            "events[0].persistence_id: must not be empty"
        );
        assert_eq!(
            reason(pb::AtomicWrite {
                events: vec![event("a", 0)]
            }),
            "events[0].sequence_nr: must be 1 or more, got 0"
        );
        assert!(
            reason(pb::AtomicWrite {
                events: vec![event("a", 1), event("b", 2)]
            })
            .starts_with("events[1].persistence_id: is \"b\" but events[0] has \"a\"")
        );
        assert!(
            reason(pb::AtomicWrite {
                events: vec![event("a", 1), event("a", 3)]
            })
            .starts_with("events[1].sequence_nr: is 3 but must be 1 + 1")
        );
        let mut no_payload = event("a", 1);
        no_payload.payload = None;
        assert_eq!(
            reason(pb::AtomicWrite {
                events: vec![no_payload]
            }),
            "events[0].payload: is required"
        );
        let mut empty_tag = event("a", 1);
        empty_tag.tags = vec!["ok".into(), String::new()];
        assert_eq!(
            reason(pb::AtomicWrite {
                events: vec![empty_tag]
            }),
            "events[0].tags[1]: must not be empty"
        );
    }

    #[test]
    fn round_trips_an_event_exactly() {
        let mut original = event("pid$.{\"$gt\":1}\0", 7);
        original.tags = vec!["t1".into(), "$where".into()];
        original.metadata = Some(pb::Payload {
            data: vec![9],
            serializer_id: -3,
            manifest: String::new(),
        });
        original.writer_uuid = "w".into();
        original.timestamp_millis = 1_700_000_000_000;
        let domain = PersistentEvent::try_from(original.clone()).unwrap();
        assert_eq!(pb::PersistentEvent::from(domain), original);
    }

    proptest! {
        #[test]
        fn atomic_write_validation_never_panics(
            pids in proptest::collection::vec("[ab]{0,2}", 0..5),
            seq_nrs in proptest::collection::vec(any::<i64>(), 0..5),
        ) {
            let events = pids.iter().zip(&seq_nrs).map(|(pid, seq_nr)| event(pid, *seq_nr)).collect();
            let _ = AtomicWrite::try_from(pb::AtomicWrite { events });
        }
    }
}
