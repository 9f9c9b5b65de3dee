//! Server memory while a live subscriber stops reading, measured on the server alone: the
//! `eventjournal` binary runs as a child process, so the test's own clients and buffers do not
//! count. One mode after the other, on a server each.

mod common;

use std::time::Duration;

use common::process::{ServerProcess, wait_until_serving};
use common::read::*;
use common::*;
use proto::v1 as pb;
use proto::v1::journal_client::JournalClient;
use proto::v1::read_journal_client::ReadJournalClient;
use tonic::transport::Channel;

/// Events written while the subscriber does not read, and their payload size: 200 MiB.
const EVENTS: i64 = 10_000;
const EVENT_BYTES: usize = 20 * 1024;
/// What the server may keep meanwhile: its bounded buffers (polling: 16 batches of 50 events
/// per tag hub; change streams: the last 1,024 changes, shared by the broadcast, the recent
/// history and a catching-up subscriber, about 20 MiB of these events) and the stalled stream's
/// HTTP/2 window, plus the allocator's cache of freed pages (measured: 37 to 66 MiB here; 88 MiB
/// once on a loaded CI machine, where freed pages are returned later). A server that buffered
/// what the subscriber has not read would grow by the 200 MiB written.
const ALLOWED_GROWTH: u64 = 120 << 20;

#[tokio::test]
async fn a_subscriber_that_stops_reading_does_not_make_the_server_grow_in_either_mode() {
    stalled_subscriber_keeps_server_memory_flat(
        "mem_poll",
        &[("EVENTJOURNAL_READ_JOURNAL__BATCH_SIZE", "50")],
        true,
    )
    .await;
    // Commit order: the 40 writes of each request commit in any order.
    stalled_subscriber_keeps_server_memory_flat(
        "mem_cs",
        &[
            ("EVENTJOURNAL_READ_JOURNAL__BATCH_SIZE", "50"),
            ("EVENTJOURNAL_READ_JOURNAL__USE_CHANGE_STREAMS", "true"),
        ],
        false,
    )
    .await;
}

async fn stalled_subscriber_keeps_server_memory_flat(
    prefix: &str,
    env: &[(&str, &str)],
    in_position_order: bool,
) {
    let port = free_port();
    let server = ServerProcess::spawn(port, &unique_database(prefix), env);
    let url = format!("http://127.0.0.1:{port}");
    wait_until_serving(&url).await;
    let endpoint = Channel::from_shared(url.clone()).unwrap();
    let mut journal = JournalClient::new(endpoint.connect().await.unwrap());
    let mut queries = ReadJournalClient::new(endpoint.connect().await.unwrap());
    let mut stalled = queries
        .events_by_tag(pb::EventsByTagRequest {
            tag: "bulk".into(),
            offset: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bulk = |sequence_nr: i64| pb::PersistentEvent {
        payload: Some(pb::Payload {
            data: vec![(sequence_nr % 251) as u8; EVENT_BYTES],
            serializer_id: 1,
            manifest: String::new(),
        }),
        ..tagged("bulk", sequence_nr, &["bulk"])
    };
    let batch = |from: i64| {
        (from..from + 40)
            .map(|n| atomic(vec![bulk(n)]))
            .collect::<Vec<_>>()
    };
    // Warm up allocations, then measure while the events are written.
    assert!(write(&mut journal, batch(1)).await.iter().all(is_written));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.resident_bytes();
    let mut peak = before;
    let mut next = 41;
    while next <= EVENTS {
        assert!(
            write(&mut journal, batch(next))
                .await
                .iter()
                .all(is_written)
        );
        next += 40;
        peak = peak.max(server.resident_bytes());
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(server.resident_bytes());
    }
    let grown = peak.saturating_sub(before);
    let written = EVENTS as u64 * EVENT_BYTES as u64;
    eprintln!(
        "{prefix}: server memory grew by {grown} bytes at most while {written} bytes were written"
    );
    assert!(
        grown < ALLOWED_GROWTH,
        "{prefix}: server memory grew by {grown} bytes while {written} bytes were written"
    );
    // The stalled subscriber then reads everything, once (in order when polling).
    let mut sequence_nrs = Vec::new();
    while (sequence_nrs.len() as i64) < EVENTS {
        let envelope = tokio::time::timeout(Duration::from_secs(120), stalled.message())
            .await
            .expect("the stalled subscriber's stream stopped")
            .unwrap()
            .unwrap();
        sequence_nrs.push(envelope.event.unwrap().sequence_nr);
    }
    if !in_position_order {
        sequence_nrs.sort();
    }
    assert_eq!(sequence_nrs, (1..=EVENTS).collect::<Vec<_>>());
}
