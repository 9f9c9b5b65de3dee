//! Server memory while a live subscriber stops reading. In a test binary of its own, run one
//! mode after the other: resident memory is per process, and other tests would distort it.

mod common;

use std::time::Duration;

use common::read::*;
use common::*;
use proto::v1 as pb;
use proto::v1::read_journal_client::ReadJournalClient;

#[tokio::test]
async fn a_subscriber_that_stops_reading_does_not_make_memory_grow_in_either_mode() {
    stalled_subscriber_keeps_memory_flat(TestServer::start_with("mem_poll", fast).await, true)
        .await;
    // Commit order: the 40 writes of each request commit in any order.
    stalled_subscriber_keeps_memory_flat(
        TestServer::start_with("mem_cs", change_streams).await,
        false,
    )
    .await;
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

async fn stalled_subscriber_keeps_memory_flat(server: TestServer, in_position_order: bool) {
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    let mut stalled = queries
        .events_by_tag(pb::EventsByTagRequest {
            tag: "bulk".into(),
            offset: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Warm up allocations, then measure while 80 MiB of tagged events are written.
    let event_bytes = 20 * 1024;
    let bulk = |pid: &str, sequence_nr: i64| pb::PersistentEvent {
        payload: Some(pb::Payload {
            data: vec![(sequence_nr % 251) as u8; event_bytes],
            serializer_id: 1,
            manifest: String::new(),
        }),
        ..tagged(pid, sequence_nr, &["bulk"])
    };
    let batch = |from: i64| {
        (from..from + 40)
            .map(|n| atomic(vec![bulk("bulk", n)]))
            .collect::<Vec<_>>()
    };
    assert!(write(&mut journal, batch(1)).await.iter().all(is_written));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident_bytes();
    let mut next = 41;
    while next <= 4_000 {
        assert!(
            write(&mut journal, batch(next))
                .await
                .iter()
                .all(is_written)
        );
        next += 40;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let grown = resident_bytes().saturating_sub(before);
    let written = 4_000 * event_bytes as u64;
    eprintln!("resident memory grew by {grown} bytes while {written} bytes were written");
    assert!(
        grown < written / 2,
        "resident memory grew by {grown} bytes while {written} bytes were written"
    );
    // The stalled subscriber then reads everything, once (in order when polling).
    let envelopes = take(&mut stalled, 4_000, 120).await;
    let mut sequence_nrs: Vec<i64> = ids(&envelopes).into_iter().map(|(_, n)| n).collect();
    if !in_position_order {
        sequence_nrs.sort();
    }
    assert_eq!(sequence_nrs, (1..=4_000).collect::<Vec<_>>());
}
