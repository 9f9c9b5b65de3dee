//! MongoDB unreachable after retries: calls fail with UNAVAILABLE, promptly, and the server
//! recovers by itself when MongoDB is back.

mod common;

use std::time::{Duration, Instant};

use common::proxy::CuttableProxy;
use common::*;
use proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn calls_fail_with_unavailable_while_mongodb_is_unreachable_and_work_again_after() {
    let proxy = CuttableProxy::start(mongodb_address()).await;
    let server = TestServer::start_with("unavailable", |settings| {
        settings.mongodb.uri = format!("mongodb://{}/?directConnection=true", proxy.address);
        settings.mongodb.server_selection_timeout = Duration::from_secs(1);
        settings.mongodb.retry.delay = Duration::from_millis(50);
    })
    .await;
    let mut client = server.journal().await;
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("u", 1, "before")])]).await[0]
    ));

    proxy.cut();
    let started = Instant::now();
    let status = client
        .write_events(pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("u", 2, "during")])],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("write events: "),
        "{}",
        status.message()
    );
    let status = client
        .read_highest_sequence_nr(pb::ReadHighestSequenceNrRequest {
            persistence_id: "u".into(),
            from_sequence_nr: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "read highest sequence number: MongoDB is unavailable"
    );
    // Bounded by the server-selection timeout and the retries, not a hang.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    proxy.restore();
    // The write whose outcome was unknown is retried as is: idempotent, so it succeeds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("u", 2, "during")])],
        };
        match client.write_events(request).await {
            Ok(response) => {
                let outcome = response.into_inner().results.remove(0).outcome.unwrap();
                assert!(is_written(&outcome), "{outcome:?}");
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "no recovery within 30 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let (events, highest) = replay(&mut client, "u", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
    assert_eq!(highest, 2);
}
