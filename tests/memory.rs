//! Server memory under load, measured on the server alone: the `eventjournal` binary runs as a
//! child process, so the test's own clients and buffers do not count. A live subscriber that
//! stops reading (one mode after the other, on a server each), and a burst of large requests
//! against `server.max-request-memory`.

mod common;

use std::time::Duration;

use futures::StreamExt;

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

/// Concurrent requests and their size: 144 MiB offered at once, against a budget of 32 MiB.
const BURST: usize = 24;
const REQUEST_BYTES: usize = 6 << 20;
/// What the server may grow by meanwhile: the five requests that fit, each held up to about
/// four times over (tonic's buffer, the decoded request, its BSON document and the driver's
/// command), plus the HTTP/2 windows and the allocator's cache (measured: 70-100 MiB). A server
/// that took in the whole burst grew by 360 MiB.
const ALLOWED_BURST_GROWTH: u64 = 200 << 20;

#[tokio::test]
async fn a_burst_of_large_requests_is_held_to_the_server_budget() {
    const APP: &str = "mem_burst";
    let _failpoint = failpoint_turn().await;
    let (port, metrics_port) = (free_port(), free_port());
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let server = ServerProcess::spawn_on(
        &format!("{}&appName={APP}", mongodb_uri()),
        port,
        &unique_database(APP),
        &[
            ("EVENTJOURNAL_SERVER__MAX_MESSAGE_SIZE", "8 MiB"),
            ("EVENTJOURNAL_SERVER__MAX_REQUEST_MEMORY", "32 MiB"),
            ("EVENTJOURNAL_SERVER__METRICS_LISTEN", &metrics_listen),
        ],
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_until_serving(&url).await;
    let endpoint = Channel::from_shared(url).unwrap();
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(JournalClient::new(endpoint.connect().await.unwrap()));
    }
    let large = |pid: &str| {
        let mut event = event(pid, 1, "");
        event.payload = Some(pb::Payload {
            data: vec![3; REQUEST_BYTES],
            serializer_id: 1,
            manifest: String::new(),
        });
        vec![atomic(vec![event])]
    };
    // Warm up allocations with one such request, then measure the burst.
    assert!(
        write(&mut connections[0], large("warm-up"))
            .await
            .iter()
            .all(is_written)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.resident_bytes();
    // MongoDB holds this server's inserts for 8 s: what the server takes in stays held.
    fail_next(
        APP,
        100,
        "insert",
        mongodb::bson::doc! { "blockConnection": true, "blockTimeMS": 8_000 },
    )
    .await;
    let calls = futures::stream::FuturesUnordered::new();
    for n in 0..BURST {
        let mut client = connections[n % connections.len()].clone();
        let writes = large(&format!("burst-{n}"));
        calls.push(async move {
            let answer = client
                .write_events(pb::WriteEventsRequest {
                    writes,
                    ..Default::default()
                })
                .await;
            (n, answer)
        });
    }
    let mut calls = std::pin::pin!(calls);
    let mut peak = before;
    let (mut written, mut refused) = (Vec::new(), Vec::new());
    let mut unblocked = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while written.len() + refused.len() < BURST {
        assert!(
            tokio::time::Instant::now() < deadline,
            "answered within 60 s: {written:?} written, {refused:?} refused"
        );
        let answer = tokio::time::timeout(Duration::from_millis(50), calls.next()).await;
        peak = peak.max(server.resident_bytes());
        let Ok(Some((n, answer))) = answer else {
            continue;
        };
        match answer {
            Ok(response) => {
                let results = response.into_inner().results;
                assert!(
                    results
                        .iter()
                        .all(|result| is_written(result.outcome.as_ref().unwrap()))
                );
                written.push(n);
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("server.max-request-memory is 32.0 MiB"),
                    "{status:?}"
                );
                assert!(
                    written.is_empty(),
                    "refused only after a write was answered: {status:?}"
                );
                refused.push(n);
            }
        }
        if refused.len() == BURST - 5 && !unblocked {
            unblocked = true;
            failpoint_off().await;
        }
    }
    let grown = peak.saturating_sub(before);
    let offered = (BURST * REQUEST_BYTES) as u64;
    eprintln!(
        "mem_burst: server memory grew by {grown} bytes at most while {offered} bytes were sent"
    );
    // Five requests fit in 32 MiB; every other was refused at once, while they waited.
    assert_eq!((written.len(), refused.len()), (5, BURST - 5));
    assert!(
        grown < ALLOWED_BURST_GROWTH,
        "server memory grew by {grown} bytes while {offered} bytes were sent"
    );
    // Nothing held any more; the refused requests go through when sent again.
    let metrics = fetch_metrics(metrics_port).await;
    assert_eq!(
        metric(&metrics, "eventjournal_request_memory_bytes"),
        Some(0.0)
    );
    assert_eq!(
        metric(&metrics, "eventjournal_request_memory_refusals_total"),
        Some((BURST - 5) as f64)
    );
    for n in refused {
        let pid = format!("burst-{n}");
        assert!(
            write(&mut connections[0], large(&pid))
                .await
                .iter()
                .all(is_written)
        );
    }
    for n in 0..BURST {
        assert_eq!(highest(&mut connections[0], &format!("burst-{n}")).await, 1);
    }
}
