//! `eventjournal-client`'s write coalescing against a real server and mongod: the writes of
//! concurrent `write_events` calls share `WriteEvents` calls, each caller gets the outcomes of
//! its own writes, a caller that stops waiting leaves the others answered, a combined call
//! failing for one caller's write fails only that caller, and a caller that waits for a call
//! longer than the call timeout gives up without its writes being sent. Counted with the
//! server's metrics, so in a test binary of its own with one test (the registry is global to
//! the process).

mod common;

use std::time::Duration;

use common::proxy::CuttableProxy;
use common::*;
use eventjournal_client::{
    Client, Error, Event, Payload, RetryPolicy, WriteCoalescing, WriteOutcome,
};

const APP: &str = "client_coalescing";
const WRITE_EVENTS_OK: &str = "eventjournal_grpc_calls_total{code=\"Ok\",method=\"WriteEvents\",service=\"eventjournal.v1.Journal\"}";

fn event(pid: &str, sequence_nr: i64) -> Event {
    event_with(pid, sequence_nr, "x")
}

fn event_with(pid: &str, sequence_nr: i64, text: &str) -> Event {
    Event::new(
        pid,
        sequence_nr,
        Payload::new(text.as_bytes().to_vec(), 1, "X"),
    )
}

/// MongoDB holds the server's next two inserts (a call on each of the client's two lanes) for
/// 500 ms.
async fn hold_both_lanes() {
    let hold = mongodb::bson::doc! { "blockConnection": true, "blockTimeMS": 500 };
    fail_next(APP, 2, "insert", hold).await;
}

/// Writes event 1 of each of `pids`, each from a task of its own, at once.
fn first_events(
    client: &Client,
    pids: [&'static str; 2],
) -> Vec<tokio::task::JoinHandle<eventjournal_client::Result<Vec<WriteOutcome>>>> {
    pids.into_iter()
        .map(|pid| {
            let client = client.clone();
            tokio::spawn(async move { client.write_events(vec![vec![event(pid, 1)]]).await })
        })
        .collect()
}

async fn calls(port: u16) -> f64 {
    metric(&fetch_metrics(port).await, WRITE_EVENTS_OK).unwrap_or(0.0)
}

/// `TASKS` tasks sharing `client`, each writing `EVENTS` events of its own id one at a time.
async fn actors(client: &Client, prefix: &str) {
    const TASKS: usize = 100;
    const EVENTS: i64 = 10;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let client = client.clone();
            let pid = format!("{prefix}-{task}");
            tokio::spawn(async move {
                for sequence_nr in 1..=EVENTS {
                    let outcomes = client
                        .write_events(vec![vec![event(&pid, sequence_nr)]])
                        .await
                        .unwrap();
                    assert_eq!(outcomes, vec![WriteOutcome::Written], "{pid} {sequence_nr}");
                }
                assert_eq!(client.highest_sequence_nr(&pid).await.unwrap(), EVENTS);
            })
        })
        .collect();
    let all = futures::future::join_all(tasks);
    for task in tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every write answered within a minute")
    {
        task.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_a_client_share_calls_and_keep_their_own_outcomes() {
    let port = free_port();
    let server = TestServer::start_with(APP, |settings| {
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
        settings.server.metrics_listen = Some(([127, 0, 0, 1], port).into());
    })
    .await;
    let coalescing = Client::builder(server.url()).connect().await.unwrap();
    let separate = Client::builder(server.url())
        .write_coalescing(WriteCoalescing::off())
        .connect()
        .await
        .unwrap();

    // 1. A hundred tasks writing one event at a time: 1,000 writes in far fewer calls.
    let before = calls(port).await;
    actors(&coalescing, "shared").await;
    let shared = calls(port).await - before;
    assert!(
        shared <= 250.0,
        "1,000 writes of 100 tasks took {shared} calls"
    );
    // Without coalescing the same load is a call per write: the bound above can fail.
    let before = calls(port).await;
    actors(&separate, "separate").await;
    assert_eq!(calls(port).await - before, 1_000.0);

    // 2. Writes that go in one call are answered each on their own. Both lanes' calls are
    // held by MongoDB, so the callers below wait; the first three then go together in one
    // call, and the fourth, which writes an id the first one writes too, in a call of its own
    // (in one request, a failed write would stop the later writes of its id).
    coalescing
        .write_events(vec![vec![event("taken", 1)]])
        .await
        .unwrap();
    let before = calls(port).await;
    hold_both_lanes().await;
    let holders = first_events(&coalescing, ["held-a", "held-b"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let conflict_and_written = {
        let client = coalescing.clone();
        tokio::spawn(async move {
            client
                .write_events(vec![
                    vec![event_with("taken", 1, "other")],
                    vec![event("other", 1)],
                ])
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rejected = {
        let client = coalescing.clone();
        tokio::spawn(async move { client.write_events(vec![vec![event("bad", 0)]]).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let written = {
        let client = coalescing.clone();
        tokio::spawn(async move {
            client
                .write_events(vec![vec![event("fresh", 1), event("fresh", 2)]])
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let same_id = {
        let client = coalescing.clone();
        tokio::spawn(async move { client.write_events(vec![vec![event("taken", 2)]]).await })
    };
    for holder in holders {
        assert_eq!(holder.await.unwrap().unwrap(), vec![WriteOutcome::Written]);
    }
    let outcomes = conflict_and_written.await.unwrap().unwrap();
    assert!(
        matches!(
            &outcomes[..],
            [WriteOutcome::Conflict(_), WriteOutcome::Written]
        ),
        "{outcomes:?}"
    );
    let outcomes = rejected.await.unwrap().unwrap();
    assert!(
        matches!(&outcomes[..], [WriteOutcome::Rejected(reason)] if reason.contains("sequence_nr")),
        "{outcomes:?}"
    );
    assert_eq!(written.await.unwrap().unwrap(), vec![WriteOutcome::Written]);
    assert_eq!(
        same_id.await.unwrap().unwrap(),
        vec![WriteOutcome::Written],
        "not stopped by another caller's failed write of its id"
    );
    assert_eq!(
        calls(port).await - before,
        4.0,
        "two held calls, the three first waiting callers' writes in one, the fourth alone"
    );
    assert_eq!(coalescing.highest_sequence_nr("taken").await.unwrap(), 2);
    assert_eq!(coalescing.highest_sequence_nr("fresh").await.unwrap(), 2);

    // 3. Callers that stop waiting while their own calls are held give their lanes back:
    // the writes waiting behind them are sent and answered.
    hold_both_lanes().await;
    let impatient: Vec<_> = ["gone-a", "gone-b"]
        .into_iter()
        .map(|pid| {
            let client = coalescing.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_millis(100),
                    client.write_events(vec![vec![event(pid, 1)]]),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let waiting = {
        let client = coalescing.clone();
        tokio::spawn(async move { client.write_events(vec![vec![event("behind", 1)]]).await })
    };
    for caller in impatient {
        assert!(
            caller.await.unwrap().is_err(),
            "stopped waiting after 100 ms"
        );
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the write behind the dropped callers is answered")
        .unwrap()
        .unwrap();
    assert_eq!(outcomes, vec![WriteOutcome::Written]);

    // 4. A combined call that fails as a whole (MongoDB refuses one caller's transaction
    // commit, so the service fails the request) fails only that caller: the other caller's
    // write, in the same call, is sent again alone and answered `Written`. Both lanes are
    // taken by multi-event writes whose commits MongoDB holds for 500 ms and then refuses, as
    // it does the failing caller's (mongod has one `failCommand`, and setting it again waits
    // for the commands it holds: one setting for all).
    let before = calls(port).await;
    let hold_and_refuse =
        mongodb::bson::doc! { "blockConnection": true, "blockTimeMS": 500, "errorCode": 2 };
    fail_next(APP, 4, "commitTransaction", hold_and_refuse).await;
    let two_events = |pid: &'static str| {
        let client = coalescing.clone();
        tokio::spawn(async move {
            client
                .write_events(vec![vec![event(pid, 1), event(pid, 2)]])
                .await
        })
    };
    let holders = [two_events("held-c"), two_events("held-d")];
    tokio::time::sleep(Duration::from_millis(150)).await;
    let failing = two_events("refused");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let bystander = {
        let client = coalescing.clone();
        tokio::spawn(async move { client.write_events(vec![vec![event("bystander", 1)]]).await })
    };
    for caller in holders.into_iter().chain([failing]) {
        let error = caller.await.unwrap().unwrap_err();
        assert!(
            matches!(
                &error,
                Error::Other {
                    code: tonic::Code::Internal,
                    ..
                }
            ),
            "{error:?}"
        );
    }
    assert_eq!(
        bystander.await.unwrap().unwrap(),
        vec![WriteOutcome::Written],
        "not failed by the other caller's refused write"
    );
    assert_eq!(
        calls(port).await - before,
        1.0,
        "the bystander's own call, after the combined one failed"
    );
    assert_eq!(
        coalescing.highest_sequence_nr("bystander").await.unwrap(),
        1
    );
    assert_eq!(coalescing.highest_sequence_nr("refused").await.unwrap(), 0);

    // 5. While both lanes retry through an outage, a caller that waits for one longer than
    // the call timeout gives up, and its write is never sent, not even after the outage.
    let proxy = CuttableProxy::start(server.address).await;
    let client = Client::builder(format!("http://{}", proxy.address))
        .call_timeout(Duration::from_millis(500))
        .retry(RetryPolicy {
            max_attempts: 100,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
        })
        .connect()
        .await
        .unwrap();
    proxy.cut();
    let retrying = first_events(&client, ["retrying-a", "retrying-b"]);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let started = std::time::Instant::now();
    let error = client
        .write_events(vec![vec![event("late", 1)]])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::DeadlineExceeded(message) if message.contains("nothing was sent")),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    proxy.restore();
    for caller in retrying {
        assert_eq!(caller.await.unwrap().unwrap(), vec![WriteOutcome::Written]);
    }
    assert_eq!(client.highest_sequence_nr("late").await.unwrap(), 0);
}
