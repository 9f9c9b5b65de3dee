//! Request validation driven with random input: it never panics, and what it accepts is
//! within the documented limits (docs/BAD_INPUT.md).

use model::{AtomicWrite, DeleteObject, ReplayRange, Snapshot, SnapshotQuery, UpsertObject};
use proptest::option;
use proptest::prelude::*;
use proto::v1 as pb;

/// Any string, including `$`, `.`, NUL, long ones and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[$.a\\x00{}]{0,8}",
        "\\PC{0,40}",
        (500usize..530).prop_map(|length| "p".repeat(length)),
    ]
}

fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(-1),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>()
    ]
}

fn payload() -> impl Strategy<Value = Option<pb::Payload>> {
    option::of(
        (
            proptest::collection::vec(any::<u8>(), 0..16),
            any::<i32>(),
            text(),
        )
            .prop_map(|(data, serializer_id, manifest)| pb::Payload {
                data,
                serializer_id,
                manifest,
            }),
    )
}

fn event() -> impl Strategy<Value = pb::PersistentEvent> {
    (
        text(),
        number(),
        payload(),
        text(),
        number(),
        proptest::collection::vec(text(), 0..4),
        payload(),
    )
        .prop_map(
            |(
                persistence_id,
                sequence_nr,
                payload,
                writer_uuid,
                timestamp_millis,
                tags,
                metadata,
            )| {
                pb::PersistentEvent {
                    persistence_id,
                    sequence_nr,
                    payload,
                    writer_uuid,
                    timestamp_millis,
                    tags,
                    metadata,
                }
            },
        )
}

fn snapshot_metadata() -> impl Strategy<Value = Option<pb::SnapshotMetadata>> {
    option::of((text(), number(), number(), payload()).prop_map(
        |(persistence_id, sequence_nr, timestamp_millis, metadata)| pb::SnapshotMetadata {
            persistence_id,
            sequence_nr,
            timestamp_millis,
            metadata,
        },
    ))
}

fn criteria() -> impl Strategy<Value = Option<pb::SnapshotSelectionCriteria>> {
    option::of(
        (
            option::of(number()),
            option::of(number()),
            number(),
            number(),
        )
            .prop_map(
                |(max_sequence_nr, max_timestamp_millis, min_sequence_nr, min_timestamp_millis)| {
                    pb::SnapshotSelectionCriteria {
                        max_sequence_nr,
                        max_timestamp_millis,
                        min_sequence_nr,
                        min_timestamp_millis,
                    }
                },
            ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn atomic_writes(events in proptest::collection::vec(event(), 0..4)) {
        if let Ok(write) = AtomicWrite::try_from(pb::AtomicWrite { events }) {
            let first = write.first_sequence_nr().get();
            prop_assert!(first >= 1);
            for (offset, event) in write.events().iter().enumerate() {
                let pid = event.persistence_id.as_str();
                prop_assert!(!pid.is_empty() && pid.len() <= 512);
                prop_assert_eq!(event.sequence_nr.get(), first + offset as i64);
                prop_assert!(event.tags.len() <= 256);
            }
        }
    }

    #[test]
    fn replays(persistence_id in text(), from in number(), to in option::of(number()), max in option::of(number())) {
        let request = pb::ReplayEventsRequest { persistence_id, from_sequence_nr: from, to_sequence_nr: to, max };
        if let Ok(range) = ReplayRange::try_from(request) {
            prop_assert!(range.from_sequence_nr >= 0 && range.to_sequence_nr >= 0 && range.max >= 0);
        }
    }

    #[test]
    fn snapshots(metadata in snapshot_metadata(), snapshot in payload(), persistence_id in text(), criteria in criteria(), to in option::of(number())) {
        let _ = Snapshot::try_from(pb::SaveSnapshotRequest { metadata, snapshot });
        let _ = SnapshotQuery::try_from(pb::LoadSnapshotRequest { persistence_id: persistence_id.clone(), criteria, to_sequence_nr: to });
        let _ = SnapshotQuery::try_from(pb::DeleteSnapshotsRequest { persistence_id, criteria });
    }

    #[test]
    fn durable_state(persistence_id in text(), revision in number(), value in payload(), tag in text()) {
        if let Ok(upsert) = UpsertObject::try_from(pb::UpsertObjectRequest { persistence_id: persistence_id.clone(), revision, value, tag }) {
            prop_assert!(upsert.revision.get() >= 1);
        }
        let _ = DeleteObject::try_from(pb::DeleteObjectRequest { persistence_id, revision });
    }
}
