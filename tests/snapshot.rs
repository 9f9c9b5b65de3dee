//! The snapshot store end to end over gRPC, against the real mongod: Akka's snapshot-store TCK.

mod common;

use common::*;
use mongodb::bson::{Bson, doc};
use proto::v1 as pb;
use proto::v1::snapshot_store_client::SnapshotStoreClient;
use tonic::Code;
use tonic::transport::Channel;

const BASE_MILLIS: i64 = 1_700_000_000_000;

/// Timestamp of the snapshot at `sequence_nr` in the fixture: distinct and increasing.
fn ts(sequence_nr: i64) -> i64 {
    BASE_MILLIS + sequence_nr * 1000
}

fn metadata(pid: &str, sequence_nr: i64, timestamp_millis: i64) -> pb::SnapshotMetadata {
    pb::SnapshotMetadata {
        persistence_id: pid.into(),
        sequence_nr,
        timestamp_millis,
        metadata: None,
    }
}

async fn save(
    client: &mut SnapshotStoreClient<Channel>,
    metadata: pb::SnapshotMetadata,
    state: &str,
) -> pb::SnapshotMetadata {
    client
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(metadata),
            snapshot: Some(payload(state)),
        })
        .await
        .expect("SaveSnapshot failed")
        .into_inner()
        .metadata
        .expect("SaveSnapshot returned no metadata")
}

fn criteria(
    max_sequence_nr: Option<i64>,
    max_timestamp_millis: Option<i64>,
) -> pb::SnapshotSelectionCriteria {
    pb::SnapshotSelectionCriteria {
        max_sequence_nr,
        max_timestamp_millis,
        min_sequence_nr: 0,
        min_timestamp_millis: 0,
    }
}

async fn load(
    client: &mut SnapshotStoreClient<Channel>,
    pid: &str,
    criteria: Option<pb::SnapshotSelectionCriteria>,
    to_sequence_nr: Option<i64>,
) -> Option<pb::SelectedSnapshot> {
    client
        .load_snapshot(pb::LoadSnapshotRequest {
            persistence_id: pid.into(),
            criteria,
            to_sequence_nr,
        })
        .await
        .expect("LoadSnapshot failed")
        .into_inner()
        .snapshot
}

/// (sequence number, state) of a loaded snapshot.
fn found(snapshot: Option<pb::SelectedSnapshot>) -> Option<(i64, String)> {
    snapshot.map(|snapshot| {
        let state = String::from_utf8(snapshot.snapshot.unwrap().data).unwrap();
        (snapshot.metadata.unwrap().sequence_nr, state)
    })
}

/// s-1..s-5 at sequence numbers 11..15.
async fn fixture(client: &mut SnapshotStoreClient<Channel>, pid: &str) {
    for n in 1..=5 {
        let sequence_nr = 10 + n;
        save(
            client,
            metadata(pid, sequence_nr, ts(sequence_nr)),
            &format!("s-{n}"),
        )
        .await;
    }
}

async fn delete_matching(
    client: &mut SnapshotStoreClient<Channel>,
    pid: &str,
    criteria: pb::SnapshotSelectionCriteria,
) {
    client
        .delete_snapshots(pb::DeleteSnapshotsRequest {
            persistence_id: pid.into(),
            criteria: Some(criteria),
        })
        .await
        .expect("DeleteSnapshots failed");
}

#[tokio::test]
async fn load_selects_the_youngest_matching_snapshot() {
    let server = TestServer::start("snap_load").await;
    let mut client = SnapshotStoreClient::new(server.channel().await);
    fixture(&mut client, "p").await;

    assert_eq!(found(load(&mut client, "unknown", None, None).await), None);
    assert_eq!(
        found(load(&mut client, "p", Some(criteria(None, Some(100))), None).await),
        None
    );
    assert_eq!(
        found(load(&mut client, "p", Some(criteria(Some(7), None)), None).await),
        None
    );
    assert_eq!(found(load(&mut client, "p", None, Some(7)).await), None);
    assert_eq!(
        found(load(&mut client, "p", None, None).await),
        Some((15, "s-5".into()))
    );
    assert_eq!(
        found(load(&mut client, "p", Some(criteria(Some(13), None)), None).await),
        Some((13, "s-3".into()))
    );
    assert_eq!(
        found(load(&mut client, "p", None, Some(13)).await),
        Some((13, "s-3".into()))
    );
    assert_eq!(
        found(
            load(
                &mut client,
                "p",
                Some(criteria(Some(13), Some(ts(13)))),
                None
            )
            .await
        ),
        Some((13, "s-3".into()))
    );
    // A timestamp bound below s-3's selects the one before it.
    assert_eq!(
        found(
            load(
                &mut client,
                "p",
                Some(criteria(Some(13), Some(ts(13) - 1))),
                None
            )
            .await
        ),
        Some((12, "s-2".into()))
    );
    let min_bounds = pb::SnapshotSelectionCriteria {
        min_sequence_nr: 12,
        max_sequence_nr: Some(14),
        min_timestamp_millis: ts(13),
        ..Default::default()
    };
    assert_eq!(
        found(load(&mut client, "p", Some(min_bounds), None).await),
        Some((14, "s-4".into()))
    );
    let loaded = load(&mut client, "p", None, None)
        .await
        .unwrap()
        .metadata
        .unwrap();
    assert_eq!(loaded, metadata("p", 15, ts(15)));
}

#[tokio::test]
async fn delete_one_and_delete_by_criteria() {
    let server = TestServer::start("snap_delete").await;
    let mut client = SnapshotStoreClient::new(server.channel().await);
    fixture(&mut client, "p").await;

    // Timestamp 0 matches any timestamp.
    client
        .delete_snapshot(pb::DeleteSnapshotRequest {
            metadata: Some(metadata("p", 13, 0)),
        })
        .await
        .unwrap();
    assert_eq!(
        found(load(&mut client, "p", Some(criteria(Some(13), None)), None).await),
        Some((12, "s-2".into()))
    );

    // Another timestamp than the stored one matches nothing.
    client
        .delete_snapshot(pb::DeleteSnapshotRequest {
            metadata: Some(metadata("p", 12, ts(12) + 1)),
        })
        .await
        .unwrap();
    assert_eq!(
        found(load(&mut client, "p", Some(criteria(Some(12), None)), None).await),
        Some((12, "s-2".into()))
    );
    client
        .delete_snapshot(pb::DeleteSnapshotRequest {
            metadata: Some(metadata("p", 12, ts(12))),
        })
        .await
        .unwrap();
    assert_eq!(
        found(load(&mut client, "p", Some(criteria(Some(12), None)), None).await),
        Some((11, "s-1".into()))
    );

    delete_matching(&mut client, "p", criteria(Some(13), Some(ts(13)))).await;
    assert_eq!(
        found(
            load(
                &mut client,
                "p",
                Some(criteria(Some(13), Some(ts(13)))),
                None
            )
            .await
        ),
        None
    );
    assert_eq!(
        found(
            load(
                &mut client,
                "p",
                Some(criteria(Some(14), Some(ts(14)))),
                None
            )
            .await
        ),
        Some((14, "s-4".into()))
    );

    delete_matching(&mut client, "p", criteria(Some(14), Some(ts(14) - 1))).await;
    assert_eq!(
        found(
            load(
                &mut client,
                "p",
                Some(criteria(Some(14), Some(ts(14)))),
                None
            )
            .await
        ),
        Some((14, "s-4".into()))
    );
    // Other persistence ids are untouched.
    fixture(&mut client, "q").await;
    delete_matching(&mut client, "p", criteria(None, None)).await;
    assert_eq!(found(load(&mut client, "p", None, None).await), None);
    assert_eq!(
        found(load(&mut client, "q", None, None).await),
        Some((15, "s-5".into()))
    );
}

#[tokio::test]
async fn saving_again_replaces_and_snapshots_round_trip_exactly() {
    let server = TestServer::start("snap_save").await;
    let mut client = SnapshotStoreClient::new(server.channel().await);
    fixture(&mut client, "p").await;

    save(&mut client, metadata("p", 15, ts(15) + 500), "s-5 again").await;
    let loaded = load(&mut client, "p", None, None).await.unwrap();
    assert_eq!(found(Some(loaded.clone())), Some((15, "s-5 again".into())));
    assert_eq!(loaded.metadata.unwrap().timestamp_millis, ts(15) + 500);
    let snapshots = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("snapshots");
    assert_eq!(
        snapshots
            .count_documents(doc! { "pid": "p", "seqNr": 15_i64 })
            .await
            .unwrap(),
        1
    );

    // 10 kB of every byte value, with metadata, at sequence number 0, stamped by the service.
    let before = now_millis();
    let big = pb::Payload {
        data: (0..10_240).map(|n| (n % 256) as u8).collect(),
        serializer_id: 42,
        manifest: "State".into(),
    };
    let with_metadata = pb::SnapshotMetadata {
        metadata: Some(pb::Payload {
            data: vec![0, 1, 255],
            serializer_id: -7,
            manifest: "Meta".into(),
        }),
        ..metadata("big", 0, 0)
    };
    let stored = client
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(with_metadata.clone()),
            snapshot: Some(big.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert!(
        (before..=now_millis()).contains(&stored.timestamp_millis),
        "stamped {}",
        stored.timestamp_millis
    );
    let loaded = load(&mut client, "big", None, None).await.unwrap();
    assert_eq!(loaded.snapshot.unwrap(), big);
    assert_eq!(
        loaded.metadata.unwrap(),
        pb::SnapshotMetadata {
            timestamp_millis: stored.timestamp_millis,
            ..with_metadata
        }
    );

    let document = snapshots
        .find_one(doc! { "pid": "big" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(document.get("insertedAt"), Some(Bson::DateTime(_))),
        "{document:?}"
    );
}

#[tokio::test]
async fn an_oversized_snapshot_is_refused_and_nothing_changes() {
    let server = TestServer::start("snap_large").await;
    let mut client = SnapshotStoreClient::new(server.channel().await);
    fixture(&mut client, "p").await;
    let huge = pb::Payload {
        data: vec![1; 17 << 20],
        serializer_id: 1,
        manifest: String::new(),
    };
    let status = client
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(metadata("p", 15, ts(15) + 1)),
            snapshot: Some(huge),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "the snapshot of persistence id \"p\" at sequence number 15 is at least 17825792 bytes as a \
         MongoDB document, above the limit of 16777216 bytes (16 MiB)"
    );
    let loaded = load(&mut client, "p", None, None).await.unwrap();
    assert_eq!(found(Some(loaded.clone())), Some((15, "s-5".into())));
    assert_eq!(loaded.metadata.unwrap().timestamp_millis, ts(15));
}

#[tokio::test]
async fn bad_snapshot_requests_name_the_field() {
    let server = TestServer::start("snap_invalid").await;
    let mut client = SnapshotStoreClient::new(server.channel().await);
    let status = client
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(metadata("", 1, 0)),
            snapshot: Some(payload("x")),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "metadata.persistence_id: must not be empty"
        )
    );
    let status = client
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(metadata("p", 1, 0)),
            snapshot: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "snapshot: is required")
    );
    let status = client
        .load_snapshot(pb::LoadSnapshotRequest {
            persistence_id: "p".into(),
            criteria: Some(criteria(Some(-1), None)),
            to_sequence_nr: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "criteria.max_sequence_nr: must not be negative, got -1"
        )
    );
    let status = client
        .delete_snapshot(pb::DeleteSnapshotRequest { metadata: None })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "metadata: is required")
    );
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
