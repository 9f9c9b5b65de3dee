//! The write path's ordering guarantees, end to end over gRPC against the real mongod: per
//! persistence id, writes apply in order and never leave a gap; once a write fails, the later
//! writes of its id in the request (or stream) are not stored; a sequence number is never
//! written twice, also after its event was deleted and purged, also by a stale writer on
//! another server; read-journal order agrees with sequence-number order.

mod common;

use std::time::Duration;

use common::read::*;
use common::*;
use futures::StreamExt;
use mongodb::bson::{Document, doc};
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use tonic::Code;

/// Makes MongoDB refuse the document of `pid` at `sequence_nr` (a collection validator), so a
/// test fails one chosen write among others: `DocumentValidationFailure` on that document only.
async fn refuse(database: &mongodb::Database, pid: &str, sequence_nr: i64) {
    database
        .run_command(doc! {
            "collMod": "journal",
            "validator": { "$or": [ { "pid": { "$ne": pid } }, { "seqNr": { "$ne": sequence_nr } } ] },
            "validationLevel": "strict",
            "validationAction": "error",
        })
        .await
        .unwrap();
}

async fn accept_all(database: &mongodb::Database) {
    database
        .run_command(doc! { "collMod": "journal", "validator": {}, "validationLevel": "off" })
        .await
        .unwrap();
}

/// `written`, `rejected: <reason>` or `conflict: <reason>`.
fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Written(_) => "written".to_owned(),
        Outcome::Rejected(rejected) => format!("rejected: {}", rejected.reason),
        Outcome::Conflict(conflict) => format!("conflict: {}", conflict.reason),
    }
}

fn single(pid: &str, sequence_nr: i64) -> pb::AtomicWrite {
    atomic(vec![tagged(pid, sequence_nr, &["order"])])
}

/// A server whose connections carry the application name `app` (its database's prefix too),
/// so `hold_next` and `fail_next` reach it alone.
async fn held_server(app: &str, customize: impl FnOnce(&mut config::Settings)) -> TestServer {
    TestServer::start_with(app, |settings| {
        settings.mongodb.uri = format!("{}&appName={app}", mongodb_uri());
        customize(settings);
    })
    .await
}

/// Two servers on one database: the first's connections carry the application name `app`, so
/// `hold_next` and `fail_next` reach it alone; the second's do not.
async fn held_and_free(
    app: &str,
    customize: impl FnOnce(&mut config::Settings),
) -> (TestServer, TestServer) {
    let held = held_server(app, customize).await;
    let mut settings = held.settings.clone();
    settings.mongodb.uri = mongodb_uri();
    let free = TestServer::start_on_database(settings).await;
    (held, free)
}

async fn delete_all(client: &mut JournalClient, pid: &str) {
    client
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: pid.into(),
            to_sequence_nr: i64::MAX,
        })
        .await
        .unwrap();
}

type JournalClient = proto::v1::journal_client::JournalClient<tonic::transport::Channel>;

#[tokio::test]
async fn a_failed_write_stops_the_later_writes_of_its_pid_and_leaves_no_gap() {
    let server = TestServer::start_with("order_refused", fast).await;
    let database = server.mongodb().await;
    let mut client = server.journal().await;
    refuse(&database, "victim", 5).await;

    // Interleaved with another persistence id's writes, in one request.
    let writes = (1..=10)
        .flat_map(|n| [single("victim", n), single("bystander", n)])
        .collect();
    let outcomes: Vec<String> = write(&mut client, writes)
        .await
        .iter()
        .map(describe)
        .collect();
    let victim: Vec<&String> = outcomes.iter().step_by(2).collect();
    let bystander: Vec<&String> = outcomes.iter().skip(1).step_by(2).collect();
    assert!(victim[..4].iter().all(|o| *o == "written"), "{victim:?}");
    assert!(
        victim[4].starts_with(
            "rejected: MongoDB refused event 5 of persistence id \"victim\": Document failed \
             validation (code 121)"
        ),
        "{}",
        victim[4]
    );
    for later in &victim[5..] {
        assert!(
            later.starts_with(
                "conflict: not stored: the write of sequence number(s) 5 of persistence id \
                 \"victim\" before it in this request or stream failed: MongoDB refused event 5"
            ),
            "{later}"
        );
    }
    assert!(
        bystander.iter().all(|o| *o == "written"),
        "other persistence ids go on: {bystander:?}"
    );
    let (events, highest) = replay(&mut client, "victim", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2, 3, 4], "no gap");
    assert_eq!(highest, 4);

    // A later request that goes on past the failure would leave a gap: refused, naming it.
    let later = write(&mut client, vec![single("victim", 11)]).await;
    assert!(
        describe(&later[0]).starts_with(
            "conflict: sequence number 11 of persistence id \"victim\" does not follow its \
             highest stored sequence number 4, because the write of sequence number(s) 5..10 \
             before it failed: MongoDB refused event 5"
        ),
        "{}",
        describe(&later[0])
    );

    // Once the cause is gone, the history continues where it stopped, in order.
    accept_all(&database).await;
    let rest = write(&mut client, (5..=10).map(|n| single("victim", n)).collect()).await;
    assert!(rest.iter().all(is_written), "{rest:?}");
    let order = current_ids_once(&server.channel().await, "order", 20).await;
    assert_eq!(order.len(), 20, "{order:?}");
    assert_in_sequence_order(&order);
}

/// Failures are not found in request order: a write that would leave a gap behind writes still
/// being inserted fails at once, a refusal of one of those only when MongoDB answers. The
/// earliest failure still stops every later write of its id.
#[tokio::test]
async fn a_later_failure_found_first_does_not_let_writes_past_an_earlier_one() {
    let server = TestServer::start_with("order_found_late", fast).await;
    let database = server.mongodb().await;
    let mut client = server.journal().await;
    refuse(&database, "victim", 2).await;

    let refused = atomic((1..=3).map(|n| tagged("victim", n, &["order"])).collect());
    let outcomes: Vec<String> = write(
        &mut client,
        vec![refused, single("victim", 4), single("victim", 6)],
    )
    .await
    .iter()
    .map(describe)
    .collect();
    assert!(
        outcomes[0].starts_with("rejected: MongoDB refused event 2 of persistence id \"victim\""),
        "{outcomes:?}"
    );
    assert!(
        outcomes[1].starts_with(
            "conflict: not stored: the write of sequence number(s) 1..3 of persistence id \
             \"victim\" before it in this request or stream failed: MongoDB refused event 2"
        ),
        "{outcomes:?}"
    );
    assert!(outcomes[2].starts_with("conflict: "), "{outcomes:?}");
    let (events, highest) = replay(&mut client, "victim", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), Vec::<i64>::new(), "nothing stored");
    assert_eq!(highest, 0);
}

/// Writes of one id from three requests in one batch: the middle one is refused, and the first
/// (in the same transaction, aborted with it) is stored when it goes round again. The third,
/// which would leave a gap where the refused one failed, names that failure, also though a write
/// before the failure was stored after it.
#[tokio::test]
async fn a_gap_names_the_failure_it_follows_though_an_earlier_write_was_stored_since() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_named";
    let server = held_server(APP, |settings| {
        settings.write_journal.max_batches_in_flight = 1;
    })
    .await;
    let database = server.mongodb().await;
    refuse(&database, "named", 3).await;
    let channel = server.channel().await;
    // A batch that waits at MongoDB, so that the three requests after it queue together.
    hold_next(APP, "insert", 800).await;
    let mut client = JournalClient::new(channel.clone());
    let blocker = tokio::spawn(async move { write(&mut client, vec![single("blocker", 1)]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut requests = Vec::new();
    for writes in [
        vec![atomic(
            (1..=2).map(|n| tagged("named", n, &["order"])).collect(),
        )],
        vec![single("named", 3)],
        vec![single("named", 4)],
    ] {
        let mut client = JournalClient::new(channel.clone());
        requests.push(tokio::spawn(
            async move { write(&mut client, writes).await },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(is_written(&blocker.await.unwrap()[0]));
    let mut outcomes = Vec::new();
    for request in requests {
        outcomes.push(describe(&request.await.unwrap()[0]));
    }
    assert_eq!(outcomes[0], "written", "{outcomes:?}");
    assert!(
        outcomes[1].starts_with("rejected: MongoDB refused event 3"),
        "{outcomes:?}"
    );
    assert!(
        outcomes[2].starts_with(
            "conflict: sequence number 4 of persistence id \"named\" does not follow its highest \
             stored sequence number 2, because the write of sequence number(s) 3 before it \
             failed: MongoDB refused event 3"
        ),
        "{outcomes:?}"
    );
}

/// A write refused on receipt (it fails validation) is a failed write of the persistence id
/// it names like any other.
#[tokio::test]
async fn an_invalid_write_stops_the_later_writes_of_its_pid() {
    let server = TestServer::start("order_invalid").await;
    let mut client = server.journal().await;
    let mut invalid = atomic(vec![tagged("p", 1, &["order"]), tagged("p", 2, &["order"])]);
    invalid.events[1].payload = None;
    let outcomes: Vec<String> = write(&mut client, vec![invalid, single("p", 1)])
        .await
        .iter()
        .map(describe)
        .collect();
    assert_eq!(
        outcomes,
        [
            "rejected: events[1].payload: is required",
            "conflict: not stored: the write of sequence number(s) 1..2 of persistence id \"p\" \
             before it in this request or stream failed: events[1].payload: is required",
        ]
    );
    assert_eq!(highest(&mut client, "p").await, 0);
}

/// A write that would leave a gap after another request's write going in in the same batch is
/// decided once that write's outcome is known: should it fail, the highest is not what it
/// assumed.
#[tokio::test]
async fn a_write_behind_a_failing_one_is_decided_on_the_real_highest() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_behind";
    let (first, second) = held_and_free(APP, |settings| {
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(60);
        settings.write_journal.purge_delay = Duration::from_secs(120);
    })
    .await;
    let channel = first.channel().await;
    let mut client = JournalClient::new(channel.clone());
    // The first server knows 4 as the highest; the second writes 5..8 meanwhile.
    let known = write(&mut client, (1..=4).map(|n| single("p", n)).collect()).await;
    assert!(known.iter().all(is_written), "{known:?}");
    let mut other = second.journal().await;
    let further = write(&mut other, (5..=8).map(|n| single("p", n)).collect()).await;
    assert!(further.iter().all(is_written), "{further:?}");
    // A batch in flight (held by MongoDB), so the next two calls go together in the next one.
    hold_next(APP, "insert", 500).await;
    let held = tokio::spawn(write_on(channel.clone(), vec![single("other", 1)]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut stale = single("p", 5);
    stale.events[0].payload = Some(payload("stale"));
    let stale = tokio::spawn(write_on(channel.clone(), vec![stale]));
    let next = tokio::spawn(write_on(channel.clone(), vec![single("p", 9)]));
    assert!(is_written(&held.await.unwrap()[0]));
    let stale = describe(&stale.await.unwrap()[0]);
    assert_eq!(
        stale,
        "conflict: sequence number(s) 5 of persistence id \"p\" are already taken by other events"
    );
    let next = next.await.unwrap();
    assert!(is_written(&next[0]), "{}", describe(&next[0]));
    assert_eq!(highest(&mut client, "p").await, 9);
}

async fn write_on(
    channel: tonic::transport::Channel,
    writes: Vec<pb::AtomicWrite>,
) -> Vec<Outcome> {
    write(&mut JournalClient::new(channel), writes).await
}

#[tokio::test]
async fn an_atomic_write_is_all_or_nothing_inside_a_batch() {
    let server = TestServer::start("order_atomic").await;
    let database = server.mongodb().await;
    let mut client = server.journal().await;
    refuse(&database, "p", 2).await;
    let outcomes = write(
        &mut client,
        vec![
            atomic(vec![tagged("p", 1, &["t"]), tagged("p", 2, &["t"])]),
            single("q", 1),
            atomic(vec![tagged("r", 1, &["t"]), tagged("r", 2, &["t"])]),
        ],
    )
    .await;
    assert!(
        describe(&outcomes[0])
            .starts_with("rejected: MongoDB refused event 2 of persistence id \"p\""),
        "{}",
        describe(&outcomes[0])
    );
    assert!(
        is_written(&outcomes[1]) && is_written(&outcomes[2]),
        "{outcomes:?}"
    );
    let (events, highest) = replay(&mut client, "p", 1, None, None).await;
    assert!(events.is_empty(), "event 1 of the refused write was stored");
    assert_eq!(highest, 0);
    let (events, _) = replay(&mut client, "r", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
}

#[tokio::test]
async fn duplicates_inside_a_batch_are_settled_per_write() {
    let server = TestServer::start("order_duplicates").await;
    let mut client = server.journal().await;
    let first = write(&mut client, vec![single("a", 1), single("b", 1)]).await;
    assert!(first.iter().all(is_written));
    let mut different = single("b", 1);
    different.events[0].payload = Some(payload("different"));
    let outcomes: Vec<String> = write(
        &mut client,
        vec![
            single("a", 1), // a retry of what is stored
            single("a", 2),
            different,
            single("c", 1),
            single("c", 1), // the same write twice in one request: the second is a retry
        ],
    )
    .await
    .iter()
    .map(describe)
    .collect();
    assert_eq!(outcomes[0], "written");
    assert_eq!(outcomes[1], "written");
    assert_eq!(
        outcomes[2],
        "conflict: sequence number(s) 1 of persistence id \"b\" are already taken by other events"
    );
    assert_eq!(outcomes[3], "written");
    assert_eq!(outcomes[4], "written");
    let (events, _) = replay(&mut client, "c", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1]);
}

#[tokio::test]
async fn a_storage_failure_on_a_stream_leaves_a_gapless_prefix() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_failpoint";
    const WRITES: i64 = 40;
    let server = TestServer::start_with("order_failpoint", |settings| {
        fast(settings);
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
    })
    .await;
    let mut client = server.journal().await;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    // Writes after the fifth wait for the fault to be in place, so they cannot all land
    // before it; from then on they are pipelined.
    let (armed, fault_armed) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut fault_armed = Some(fault_armed);
        for n in 1..=WRITES {
            if n == 6
                && let Some(fault_armed) = fault_armed.take()
                && fault_armed.await.is_err()
            {
                return;
            }
            let request = pb::WriteEventsRequest {
                writes: vec![single("s", n)],
                ..Default::default()
            };
            if sender.send(request).await.is_err() {
                return;
            }
        }
    });
    let mut armed = Some(armed);
    let mut responses = client
        .write_events_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let mut acknowledged = 0;
    let failure = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                assert!(is_written(response.results[0].outcome.as_ref().unwrap()));
                acknowledged += 1;
                if acknowledged == 5 {
                    // The next insert fails for good (BadValue is not retried).
                    fail_next(APP, 1, "insert", doc! { "errorCode": 2 }).await;
                    if let Some(armed) = armed.take() {
                        let _ = armed.send(());
                    }
                }
            }
            Ok(None) => panic!("the stream ended without the injected failure"),
            Err(status) => break status,
        }
    };
    assert_eq!(failure.code(), Code::Internal, "{failure:?}");
    // Whatever was in flight: the stored events are 1..m, no gap, every acknowledged one in.
    let (events, highest) = replay(&mut client, "s", 1, None, None).await;
    let stored = sequence_nrs(&events);
    assert!(stored.len() as i64 >= acknowledged, "{stored:?}");
    assert_eq!(stored, (1..=highest).collect::<Vec<_>>(), "a gap");
    assert!(highest < WRITES, "the failed writes were stored after all");

    // The producer resends from where the journal stands: everything lands, in order.
    let rest = write(
        &mut client,
        (highest + 1..=WRITES).map(|n| single("s", n)).collect(),
    )
    .await;
    assert!(rest.iter().all(is_written), "{rest:?}");
    let order = current_ids_once(&server.channel().await, "order", WRITES as usize).await;
    assert_eq!(order.len(), WRITES as usize);
    assert_in_sequence_order(&order);
}

#[tokio::test]
async fn writes_retried_through_transient_failures_land_once_in_order() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_transient";
    let server = TestServer::start_with("order_transient", |settings| {
        fast(settings);
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
        settings.mongodb.retry.delay = Duration::from_millis(5);
        settings.mongodb.retry.max_attempts = 5;
    })
    .await;
    let channel = server.channel().await;
    // Inserts fail with ShutdownInProgress (retryable) three times, and some connections are
    // cut mid-insert, while four producers write.
    fail_next(APP, 3, "insert", doc! { "errorCode": 91 }).await;
    let producers: Vec<_> = (0..4)
        .map(|producer| {
            let mut client = proto::v1::journal_client::JournalClient::new(channel.clone());
            tokio::spawn(async move {
                for n in 1..=25 {
                    let pid = format!("t{producer}");
                    let outcomes = write(&mut client, vec![single(&pid, n)]).await;
                    assert!(is_written(&outcomes[0]), "{pid} {n}: {outcomes:?}");
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    fail_next(APP, 2, "insert", doc! { "closeConnection": true }).await;
    for producer in producers {
        producer.await.unwrap();
    }
    let journal = server.mongodb().await.collection::<Document>("journal");
    assert_eq!(
        journal.count_documents(doc! {}).await.unwrap(),
        100,
        "each once"
    );
    let order = current_ids_once(&channel, "order", 100).await;
    assert_eq!(order.len(), 100);
    assert_in_sequence_order(&order);
}

/// A refused commit leaves no transaction open on the server: MongoDB can refuse the commit
/// without running it, and the transaction would then hold its events for a minute, failing
/// every other session's write of the id with a write conflict. (The next write of the
/// server usually reuses the same session, which ends the old transaction: a second session
/// shows it.)
#[tokio::test]
async fn a_refused_commit_leaves_no_transaction_holding_its_events() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_refused_commit";
    let server = held_server(APP, |_| {}).await;
    let mut client = server.journal().await;
    fail_next(APP, 1, "commitTransaction", doc! { "errorCode": 2 }).await;
    let refused = client
        .write_events(pb::WriteEventsRequest {
            writes: vec![atomic(vec![tagged("p", 1, &["t"]), tagged("p", 2, &["t"])])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");

    // Another session writes the same event in a transaction: it conflicts with a transaction
    // still holding the event, at once (and is aborted, either way).
    let database = server.mongodb().await;
    let mut session = database.client().start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    let other = database
        .collection::<Document>("journal")
        .insert_one(doc! { "pid": "p", "seqNr": 1_i64 })
        .session(&mut session)
        .await;
    session.abort_transaction().await.unwrap();
    assert!(
        other.is_ok(),
        "the refused transaction still holds its events: {other:?}"
    );

    let outcomes = write(
        &mut client,
        vec![atomic(vec![tagged("p", 1, &["t"]), tagged("p", 2, &["t"])])],
    )
    .await;
    assert!(is_written(&outcomes[0]), "{outcomes:?}");
}

#[tokio::test]
async fn a_purged_sequence_number_is_never_written_again() {
    let server = TestServer::start_with("order_purged", quick_purge).await;
    let database = server.mongodb().await;
    let mut client = server.journal().await;
    let written = write(&mut client, (1..=5).map(|n| single("p", n)).collect()).await;
    assert!(written.iter().all(is_written));
    let deleted_at = mongodb::bson::DateTime::now();
    delete_all(&mut client, "p").await;
    // Purgeable only after the purge delay (2 s here): deletedAt lies that far ahead.
    let marked = database
        .collection::<Document>("journal")
        .find_one(doc! { "pid": "p", "seqNr": 5_i64 })
        .await
        .unwrap()
        .unwrap();
    let purgeable_from = marked.get_datetime("deletedAt").unwrap();
    let ahead = purgeable_from.timestamp_millis() - deleted_at.timestamp_millis();
    assert!(
        (2_000..3_000).contains(&ahead),
        "deletedAt is {ahead} ms ahead"
    );

    purge_deleted_events(&database, "p", Duration::from_secs(60)).await;
    assert_eq!(highest(&mut client, "p").await, 5, "the highest survives");
    let conflicts = [
        (
            5,
            "sequence number(s) 5 of persistence id \"p\" are at or below its highest sequence number 5, whose events were deleted and purged; a sequence number is never written twice",
        ),
        (
            3,
            "sequence number(s) 3 of persistence id \"p\" are at or below its highest sequence number 5, whose events were deleted and purged; a sequence number is never written twice",
        ),
        (
            7,
            "sequence number 7 of persistence id \"p\" does not follow its highest stored sequence number 5: the next write must start at 6 (a persistence id's events have no gaps)",
        ),
    ];
    for (sequence_nr, reason) in conflicts {
        let outcome = write(&mut client, vec![single("p", sequence_nr)]).await;
        assert_eq!(describe(&outcome[0]), format!("conflict: {reason}"));
    }
    let next = write(&mut client, vec![single("p", 6)]).await;
    assert!(is_written(&next[0]), "{next:?}");
    assert_eq!(highest(&mut client, "p").await, 6);
}

#[tokio::test]
async fn a_stale_writer_on_another_server_cannot_resurrect_history() {
    // The stale server trusts what it knows for 5 s: longer than the TTL monitor takes to purge
    // once events are purgeable, so only the purge delay (10 s) keeps it from trusting it.
    let stale = TestServer::start_with("order_stale", |settings| {
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(5);
        settings.write_journal.purge_delay = Duration::from_secs(10);
    })
    .await;
    let current = TestServer::start_on_database(stale.settings.clone()).await;
    let database = stale.mongodb().await;
    let mut through_stale = stale.journal().await;
    let mut through_current = current.journal().await;
    // The old incarnation wrote 1..5 through one server, which remembers 5 as the highest.
    let first = write(
        &mut through_stale,
        (1..=5).map(|n| single("p", n)).collect(),
    )
    .await;
    assert!(first.iter().all(is_written));
    // The new incarnation goes on through another server, deletes everything, and it is purged.
    let next = write(
        &mut through_current,
        (6..=8).map(|n| single("p", n)).collect(),
    )
    .await;
    assert!(next.iter().all(is_written));
    delete_all(&mut through_current, "p").await;
    purge_deleted_events(&database, "p", Duration::from_secs(60)).await;
    // The old incarnation writes its next event through its server: 6 is history.
    let outcome = write(&mut through_stale, vec![single("p", 6)]).await;
    assert!(
        describe(&outcome[0]).starts_with(
            "conflict: sequence number(s) 6 of persistence id \"p\" are at or below its highest \
             sequence number 8"
        ),
        "{}",
        describe(&outcome[0])
    );
    let outcome = write(&mut through_stale, vec![single("p", 9)]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
}

/// A write decided on knowledge young enough, whose insert then waits for a connection (or a
/// server) until that knowledge is too old to insert on, is not sent: the sequence number it
/// continues to may have been written, deleted and purged by another server meanwhile. It is
/// decided again on a fresh read instead.
#[tokio::test]
async fn an_insert_that_waits_past_its_knowledge_is_not_sent() {
    const APP: &str = "order_insert_waits";
    let _failpoint = failpoint_turn().await;
    // Knowledge is decided on for 1.5 s (at most half the time it is inserted on) and inserted
    // on until 3 s after it was confirmed (the purge delay, 6 s, less the validity, 3 s); the
    // server has one connection to MongoDB.
    let (held, other) = held_and_free(APP, |settings| {
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(3);
        settings.write_journal.purge_delay = Duration::from_secs(6);
        settings.mongodb.max_pool_size = 1;
        settings.mongodb.min_pool_size = 0;
        settings.mongodb.server_selection_timeout = Duration::from_secs(30);
    })
    .await;
    let database = held.mongodb().await;
    let mut client = held.journal().await;
    let mut through_other = other.journal().await;
    // "p" goes on with single events (inserted with others), "m" with an atomic write of two
    // (inserted in a transaction of its own).
    let first = write(&mut client, vec![single("p", 1), single("m", 1)]).await;
    assert!(first.iter().all(is_written), "{first:?}");
    // The other server writes on and deletes everything: purgeable 6 s from now.
    let taken = write(
        &mut through_other,
        vec![
            atomic(vec![event("p", 2, "the other server's")]),
            atomic(vec![
                event("m", 2, "the other server's"),
                event("m", 3, "too"),
            ]),
        ],
    )
    .await;
    assert!(taken.iter().all(is_written), "{taken:?}");
    for pid in ["p", "m"] {
        delete_all(&mut through_other, pid).await;
    }
    // A read of the held server keeps its one connection for 10 s.
    let failing_before = fail_after(
        APP,
        0,
        "find",
        doc! { "blockConnection": true, "blockTimeMS": 10_000 },
    )
    .await;
    let mut reader = client.clone();
    let read = tokio::spawn(async move { highest(&mut reader, "q").await });
    wait_for_failures(failing_before + 1).await;
    // Later finds run at once (the failpoint is off once that hold ends).
    let off = tokio::spawn(failpoint_off());
    // Written 1 less than 1.5 s ago, the held server decides 2 without a read, and its insert
    // waits for the connection.
    let mut writer = client.clone();
    let stale = tokio::spawn(async move {
        let atomic_write = vec![tagged("m", 2, &["order"]), tagged("m", 3, &["order"])];
        write(&mut writer, vec![single("p", 2), atomic(atomic_write)]).await
    });
    // The events are purged while the inserts still wait.
    for pid in ["p", "m"] {
        purge_deleted_events(&database, pid, Duration::from_secs(9)).await;
    }
    assert!(
        !read.is_finished(),
        "the connection was free again before the purge"
    );
    assert_eq!(read.await.unwrap(), 0);
    off.await.unwrap();
    let outcomes: Vec<String> = stale.await.unwrap().iter().map(describe).collect();
    for (outcome, (pid, range, highest)) in outcomes.iter().zip([("p", "2", 2), ("m", "2..3", 3)]) {
        assert!(
            outcome.starts_with(&format!(
                "conflict: sequence number(s) {range} of persistence id \"{pid}\" are at or \
                 below its highest sequence number {highest}, whose events were deleted and purged"
            )),
            "{outcomes:?}"
        );
        let (events, stored_highest) = replay(&mut client, pid, 1, None, None).await;
        assert!(events.is_empty(), "history written again: {events:?}");
        assert_eq!(stored_highest, highest);
    }
}

/// Another server stores an event between this server's read of the highest and its insert:
/// the insert is refused as a duplicate although the highest was just read. The write is
/// decided again after another read (a `Conflict`, or `Written` for the same content), also
/// with `max-attempts = 1`, and the writes behind it in the ordered insert, which MongoDB never
/// refused, are stored.
#[tokio::test]
async fn a_write_racing_another_servers_fails_alone() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_race";
    let (racing, other) = held_and_free(APP, |settings| {
        settings.mongodb.retry.max_attempts = 1;
    })
    .await;
    let mut through_racing = racing.journal().await;
    let mut through_other = other.journal().await;
    // The racing server's next insert waits 2 s before it runs; it reads the highest of the
    // three ids first, and finds them empty.
    hold_next(APP, "insert", 2_000).await;
    let writes = vec![single("taken", 1), single("same", 1), single("free", 1)];
    let racing_write = tokio::spawn(async move {
        through_racing
            .write_events(pb::WriteEventsRequest {
                writes,
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile the other server stores event 1 of "taken" (other content) and of "same" (this
    // content, as a client retrying on another server would).
    let stored = write(
        &mut through_other,
        vec![
            atomic(vec![event("taken", 1, "the other writer's")]),
            single("same", 1),
        ],
    )
    .await;
    assert!(stored.iter().all(is_written), "{stored:?}");
    let response = racing_write
        .await
        .unwrap()
        .expect("the call succeeds: no write of it failed")
        .into_inner();
    let outcomes: Vec<String> = response
        .results
        .iter()
        .map(|result| describe(result.outcome.as_ref().unwrap()))
        .collect();
    assert!(
        outcomes[0].starts_with(
            "conflict: sequence number(s) 1 of persistence id \"taken\" are already taken"
        ),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1..], ["written", "written"], "{outcomes:?}");
    let mut client = other.journal().await;
    let (taken, _) = replay(&mut client, "taken", 1, None, None).await;
    assert_eq!(
        taken
            .iter()
            .map(|event| event.payload.as_ref().unwrap().data.clone())
            .collect::<Vec<_>>(),
        [b"the other writer's".to_vec()]
    );
    for pid in ["same", "free"] {
        assert_eq!(highest(&mut client, pid).await, 1, "{pid}");
    }
}

/// A write at the largest sequence number there is leaves a gap (a persistence id starts at
/// 1), and the writes of its id after it are answered like any other: no arithmetic past it,
/// which a debug build turned into a panic that failed every write of the batch.
#[tokio::test]
async fn writes_after_one_at_the_largest_sequence_number_are_answered() {
    let server = TestServer::start("order_largest").await;
    let mut client = server.journal().await;
    let outcomes = write(
        &mut client,
        vec![
            single("last", i64::MAX),
            single("last", 1),
            single("next", 1),
        ],
    )
    .await;
    let outcomes: Vec<String> = outcomes.iter().map(describe).collect();
    assert!(
        outcomes[0].starts_with(&format!("conflict: sequence number {} of", i64::MAX)),
        "{outcomes:?}"
    );
    assert!(outcomes[1].starts_with("conflict: "), "{outcomes:?}");
    assert_eq!(outcomes[2], "written", "{outcomes:?}");
    // A later gap of the id is a conflict too, and its first write goes in.
    let outcome = write(&mut client, vec![single("last", 3)]).await;
    assert!(
        describe(&outcome[0]).starts_with("conflict: "),
        "{outcome:?}"
    );
    let outcome = write(&mut client, vec![single("last", 1)]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
}

/// A server writing one batch at a time, whose first batch (a write of "held") waits at
/// MongoDB for 1.5 s, so writes sent meanwhile queue behind it; the held write's outcome comes
/// from the task returned.
async fn a_batch_held_at_mongodb(
    app: &str,
) -> (
    TestServer,
    JournalClient,
    tokio::task::JoinHandle<Vec<Outcome>>,
) {
    let server = held_server(app, |settings| {
        settings.write_journal.max_batches_in_flight = 1;
    })
    .await;
    let client = server.journal().await;
    hold_next(app, "insert", 1_500).await;
    let mut first_client = client.clone();
    let first =
        tokio::spawn(async move { write(&mut first_client, vec![single("held", 1)]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    (server, client, first)
}

/// A call that gives up (its deadline passes, or its client cancels it) while its writes wait
/// for a batch takes them with it: they are not sent to MongoDB afterwards, so a client that
/// retried or recovered meanwhile does not find them appearing later, and the server does not
/// hold the writes of calls nobody waits for. Another caller's next write of the id, decided
/// in the same batch, is a gap conflict naming them.
#[tokio::test]
async fn writes_of_a_call_that_gave_up_before_their_batch_are_not_stored() {
    let _failpoint = failpoint_turn().await;
    let (_server, mut client, first) = a_batch_held_at_mongodb("order_gave_up").await;
    let mut request = tonic::Request::new(pb::WriteEventsRequest {
        writes: vec![single("gave-up", 1), single("gave-up", 2)],
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(200));
    let mut gave_up = client.clone();
    let gave_up = tokio::spawn(async move { gave_up.write_events(request).await });
    // Another caller's next write of the id, queued behind them: the same batch decides it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut next = client.clone();
    let next = tokio::spawn(async move { write(&mut next, vec![single("gave-up", 3)]).await });
    let status = gave_up
        .await
        .unwrap()
        .expect_err("the call passes its deadline while its writes wait");
    // (Cancelled when the client's own timer ends the call first.)
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let first = first.await.unwrap();
    assert!(is_written(&first[0]), "{first:?}");
    a_gap_naming_the_call_that_gave_up(&next.await.unwrap()[0], "gave-up");
    // The queued writes' turn has come and gone.
    let outcome = write(&mut client, vec![single("after", 1)]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
    assert_eq!(highest(&mut client, "gave-up").await, 0);
    a_different_first_event_is_written(&mut client, "gave-up").await;
}

/// The same for a stream its client cancels while its requests' writes wait for a batch.
#[tokio::test]
async fn writes_of_a_stream_cancelled_before_their_batch_are_not_stored() {
    let _failpoint = failpoint_turn().await;
    let (_server, mut client, first) = a_batch_held_at_mongodb("order_stream_gone").await;
    let (requests, receiver) = tokio::sync::mpsc::channel(8);
    let mut responses = client
        .write_events_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    for sequence_nr in 1..=2 {
        requests
            .send(pb::WriteEventsRequest {
                writes: vec![single("stream-gone", sequence_nr)],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Read by the server (answers would come once the held batch is done), then cancelled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), responses.message())
            .await
            .is_err(),
        "no answer while the batch before is held"
    );
    drop(responses);
    drop(requests);
    let first = first.await.unwrap();
    assert!(is_written(&first[0]), "{first:?}");
    let outcome = write(&mut client, vec![single("after-stream", 1)]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
    assert_eq!(highest(&mut client, "stream-gone").await, 0);
}

/// A server that retries after a pause of 1.5 s, whose next `command` fails transiently
/// (WriteConflict), and a call of writes 1 and 2 of `pid` that gives up after 0.5 s: while
/// its batch waits to retry. Returns the server and a client.
async fn a_call_that_gives_up_while_its_batch_retries(
    app: &str,
    command: &str,
    pid: &str,
) -> (TestServer, JournalClient) {
    let server = held_server(app, |settings| {
        settings.mongodb.retry.max_attempts = 3;
        settings.mongodb.retry.delay = Duration::from_millis(1_500);
    })
    .await;
    let mut client = server.journal().await;
    // Connections made, so the batch reaches `command` well within the call's deadline.
    let warm = write(&mut client, vec![single(&format!("{pid}-warm-up"), 1)]).await;
    assert!(is_written(&warm[0]), "{warm:?}");
    let failed_before = fail_next(app, 1, command, doc! { "errorCode": 112 }).await;
    let mut request = tonic::Request::new(pb::WriteEventsRequest {
        writes: vec![single(pid, 1), single(pid, 2)],
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(500));
    let status = client
        .write_events(request)
        .await
        .expect_err("the call passes its deadline while its batch waits to retry");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The batch met the failure before the call gave up. (Had the call given up before its
    // batch reached `command`, nothing would have been sent, and this fails after 30 s.)
    wait_for_failures(failed_before + 1).await;
    (server, client)
}

/// A write of 3 after the given-up writes 1 and 2 of `pid`: a gap conflict that names them.
fn a_gap_naming_the_call_that_gave_up(outcome: &Outcome, pid: &str) {
    let gap = describe(outcome);
    assert!(
        gap.starts_with(&format!(
            "conflict: sequence number 3 of persistence id {pid:?} does not follow its highest \
             stored sequence number 0, because the write of sequence number(s) 1..2 before it \
             failed: its caller gave up on it"
        )),
        "{gap}"
    );
}

/// A first event of `pid` different from the given-up one is written (had the given-up event
/// been stored, this would be a conflict).
async fn a_different_first_event_is_written(client: &mut JournalClient, pid: &str) {
    let outcome = write(client, vec![atomic(vec![tagged(pid, 1, &["recovered"])])]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
    assert_eq!(highest(client, pid).await, 1);
}

/// What another caller finds of a pid whose writes 1 and 2 were given up with their caller:
/// a write of 3 is a gap naming them, and a first event different from the given-up one is
/// written. Both are queued behind the given-up writes' batch (one batch per id at a time),
/// so they are decided once it is done: had it stored the given-up writes, both would be
/// conflicts over taken numbers.
async fn nothing_of_the_call_that_gave_up_is_stored(client: &mut JournalClient, pid: &str) {
    let outcome = write(client, vec![single(pid, 3)]).await;
    a_gap_naming_the_call_that_gave_up(&outcome[0], pid);
    a_different_first_event_is_written(client, pid).await;
}

/// A call that gives up while its writes go round again in a batch (here, while the batch
/// waits out the pause before retrying an insert that failed transiently) takes them with it
/// too: they are not sent again, so they cannot appear after the client recovered.
#[tokio::test]
async fn writes_of_a_call_that_gave_up_while_their_batch_waited_to_retry_are_not_stored() {
    let _failpoint = failpoint_turn().await;
    let (_server, mut client) =
        a_call_that_gives_up_while_its_batch_retries("order_gave_up_insert", "insert", "retrying")
            .await;
    nothing_of_the_call_that_gave_up_is_stored(&mut client, "retrying").await;
}

/// The same when the caller gives up while its batch waits to retry a read of the highest
/// sequence number, before the insert: the round does not insert the writes of a caller that
/// has gone meanwhile.
#[tokio::test]
async fn writes_of_a_call_that_gave_up_while_their_batch_read_are_not_stored() {
    let _failpoint = failpoint_turn().await;
    let (_server, mut client) =
        a_call_that_gives_up_while_its_batch_retries("order_gave_up_read", "find", "reading").await;
    nothing_of_the_call_that_gave_up_is_stored(&mut client, "reading").await;
}

/// What a server knows of an id's highest is trusted to insert on for the purge delay less the
/// cache validity, also when the batch takes longer than that before its insert: here a read
/// for another write of the batch stalls while another server writes on, deletes and purges.
/// The stale server reads the highest again before it inserts, and finds the history.
#[tokio::test]
async fn knowledge_that_expires_while_a_batch_stalls_is_read_again_before_inserting() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_stall";
    let (stale, current) = held_and_free(APP, |settings| {
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(1);
        settings.write_journal.purge_delay = Duration::from_secs(2);
    })
    .await;
    let database = stale.mongodb().await;
    let mut through_stale = stale.journal().await;
    let mut through_current = current.journal().await;
    let first = write(&mut through_stale, vec![single("q", 1), single("r", 1)]).await;
    assert!(first.iter().all(is_written), "{first:?}");
    // The stale server's next batch: r's write again (a retry, which does not continue what
    // the server knows of r, so r's highest is read first: that read stalls for 12 s) and q's
    // next write, which its knowledge of q continues.
    hold_next(APP, "find", 12_000).await;
    let stalled = tokio::spawn(async move {
        write(&mut through_stale, vec![single("r", 1), single("q", 2)]).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile q goes on through the other server, is deleted, and purged.
    let next = write(&mut through_current, vec![single("q", 2), single("q", 3)]).await;
    assert!(next.iter().all(is_written), "{next:?}");
    delete_all(&mut through_current, "q").await;
    purge_deleted_events(&database, "q", Duration::from_secs(10)).await;
    assert!(!stalled.is_finished(), "the stale batch was still waiting");
    let outcomes: Vec<String> = stalled.await.unwrap().iter().map(describe).collect();
    assert_eq!(outcomes[0], "written", "{outcomes:?}");
    assert!(
        outcomes[1].starts_with(
            "conflict: sequence number(s) 2 of persistence id \"q\" are at or below its highest \
             sequence number 3"
        ),
        "{outcomes:?}"
    );
}

/// Reads of the highest so slow that the knowledge is too old to insert on (older than the
/// purge delay less the cache validity) by the time of the insert, round after round: the
/// write is given up with UNAVAILABLE naming why (nothing is stored, retrying is safe), rather
/// than tried forever; once reads are quick it goes in.
#[tokio::test]
async fn a_write_whose_reads_stay_too_slow_to_trust_is_given_up() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_slow_reads";
    let server = held_server(APP, |settings| {
        settings.mongodb.retry.max_attempts = 1;
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(1);
        settings.write_journal.purge_delay = Duration::from_secs(2);
    })
    .await;
    let mut client = server.journal().await;
    // Each read of the highest is two `find`s (the journal's top, then the recorded highest):
    // the next four take 0.6 s each, so two rounds each read for 1.2 s.
    fail_next(
        APP,
        4,
        "find",
        doc! { "blockConnection": true, "blockTimeMS": 600 },
    )
    .await;
    let status = client
        .write_events(pb::WriteEventsRequest {
            writes: vec![single("slow", 1)],
            ..Default::default()
        })
        .await
        .expect_err("the write is given up");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with(
            "sequence number(s) 1 of persistence id \"slow\": reading its highest sequence \
             number and deciding took longer than 1s (write-journal.purge-delay less \
             sequence-nr-cache-validity) 2 times"
        ),
        "{status:?}"
    );
    assert_eq!(highest(&mut client, "slow").await, 0);
    let outcome = write(&mut client, vec![single("slow", 1)]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
}

/// A write given up undecided after an insert of it failed in a way that may have applied it
/// (no answer, a transient error) must not be told it was not stored.
#[tokio::test]
async fn a_write_given_up_after_an_insert_that_may_have_applied_it_does_not_say_it_was_not_stored()
{
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_maybe_applied";
    let server = held_server(APP, |settings| {
        settings.mongodb.retry.max_attempts = 2;
        settings.mongodb.retry.delay = Duration::from_secs(2);
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(1);
        settings.write_journal.purge_delay = Duration::from_secs(2);
    })
    .await;
    let mut client = server.journal().await;
    // The insert fails with a transient error (WriteConflict); in the pause before the next
    // round, reads of the highest become slow (two `find`s of 0.6 s a read), so the next two
    // rounds each read longer than knowledge may be inserted on (1 s).
    let failed_before = fail_after(APP, 0, "insert", doc! { "errorCode": 112 }).await;
    let call = tokio::spawn(async move {
        client
            .write_events(pb::WriteEventsRequest {
                writes: vec![single("maybe", 1)],
                ..Default::default()
            })
            .await
    });
    wait_for_failures(failed_before + 1).await;
    fail_next(
        APP,
        4,
        "find",
        doc! { "blockConnection": true, "blockTimeMS": 600 },
    )
    .await;
    let status = call.await.unwrap().expect_err("the write is given up");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("took longer than 1s (write-journal.purge-delay less"),
        "{status:?}"
    );
    assert!(
        status
            .message()
            .ends_with("an earlier insert of it may have been applied (MongoDB did not answer it), and retrying it is safe"),
        "{status:?}"
    );
}

#[tokio::test]
async fn servers_notice_each_others_writes_at_once() {
    let first = TestServer::start("order_two_servers").await;
    let second = TestServer::start_on_database(first.settings.clone()).await;
    let mut one = first.journal().await;
    let mut other = second.journal().await;
    // Within the time the first server trusts its knowledge of the highest (3).
    assert!(
        write(&mut one, (1..=3).map(|n| single("q", n)).collect())
            .await
            .iter()
            .all(is_written)
    );
    assert!(
        write(&mut other, (4..=6).map(|n| single("q", n)).collect())
            .await
            .iter()
            .all(is_written)
    );
    // Continuing the real highest works through either server.
    let outcome = write(&mut one, vec![single("q", 7)]).await;
    assert!(is_written(&outcome[0]), "{outcome:?}");
    // Continuing the highest the first server had known is a conflict.
    let mut stale = single("q", 4);
    stale.events[0].payload = Some(payload("stale"));
    let outcome = write(&mut one, vec![stale]).await;
    assert_eq!(
        describe(&outcome[0]),
        "conflict: sequence number(s) 4 of persistence id \"q\" are already taken by other events"
    );
    let (events, highest) = replay(&mut one, "q", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), (1..=7).collect::<Vec<_>>());
    assert_eq!(highest, 7);
}

#[tokio::test]
async fn concurrent_requests_of_one_pid_never_leave_a_gap() {
    let server = TestServer::start("order_concurrent").await;
    let database = server.mongodb().await;
    refuse(&database, "p", 3).await;
    let channel = server.channel().await;
    // Two requests for one persistence id at once, as a client pipelining them would send.
    let requests = [
        (1..=5).map(|n| single("p", n)).collect::<Vec<_>>(),
        (6..=8).map(|n| single("p", n)).collect::<Vec<_>>(),
    ];
    let answers: Vec<Vec<String>> = futures::stream::iter(requests)
        .map(|writes| {
            let mut client = proto::v1::journal_client::JournalClient::new(channel.clone());
            async move {
                write(&mut client, writes)
                    .await
                    .iter()
                    .map(describe)
                    .collect()
            }
        })
        .buffer_unordered(2)
        .collect()
        .await;
    let (first, second) = if answers[0].len() == 5 {
        (&answers[0], &answers[1])
    } else {
        (&answers[1], &answers[0])
    };
    assert_eq!(first[..2], ["written", "written"], "{first:?}");
    assert!(
        first[2].starts_with("rejected: MongoDB refused event 3"),
        "{first:?}"
    );
    assert!(
        first[3..]
            .iter()
            .all(|o| o.starts_with("conflict: not stored")),
        "{first:?}"
    );
    assert!(
        second.iter().all(|o| o.starts_with("conflict: ")),
        "6..8 were stored although 3 failed: {second:?}"
    );
    let mut client = server.journal().await;
    let (events, highest) = replay(&mut client, "p", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
    assert_eq!(highest, 2);
}

/// Fixed drift (`read-journal.horizon = "fixed-drift"`), two servers on one database; the
/// first trusts what it knows of an id for the whole test. A 2 s drift: a write is late when
/// acknowledged more than 1 s after its stamp, which a slow machine does not reach by itself.
async fn fixed_drift_servers(app: &str) -> (TestServer, TestServer) {
    held_and_free(app, |settings| {
        fast(settings);
        settings.read_journal.horizon = Some(config::HorizonMode::FixedDrift);
        settings.read_journal.allowed_time_drift = Duration::from_secs(2);
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(10);
        settings.write_journal.purge_delay = Duration::from_secs(30);
    })
    .await
}

/// Checks that `pid`'s two events are placed in sequence-number order, in the journal and in
/// a current query of `tag`.
async fn in_order(server: &TestServer, pid: &str, tag: &str) {
    let stamps = stamps_of(server, pid).await;
    assert_eq!(stamps.len(), 2, "{stamps:?}");
    assert!(
        stamps[1].1 >= stamps[0].1,
        "event 2 is placed before event 1 (seqNr, writtenAt): {stamps:?}"
    );
    assert_eq!(
        current_ids_once(&server.channel().await, tag, 2).await,
        [(pid.to_owned(), 1), (pid.to_owned(), 2)]
    );
}

/// Fixed drift: server A stores event 1 of an id, but its answer is lost, and the client
/// retries on server B, which finds it stored more than half the drift ago and moves it
/// forward (queries may have passed over it). The client's next write goes to A again, which
/// still knows the id's highest from its own insert, with the old position: event 2 must still
/// come after event 1 in read-journal order. (B used to move event 1 ahead of now, by the time
/// since it was written, and A placed event 2 before it.)
#[tokio::test]
async fn a_write_after_another_server_moved_the_events_before_it_forward_follows_them() {
    let (a, b) = fixed_drift_servers("order_moved_ahead").await;
    let mut through_a = a.journal().await;
    let mut through_b = b.journal().await;
    let event = |n| atomic(vec![tagged("moved", n, &["moved-ahead"])]);
    assert!(is_written(&write(&mut through_a, vec![event(1)]).await[0]));
    let written = stamps_of(&a, "moved").await;
    // More than half the drift later, the client's retry of the same write, on B.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(is_written(&write(&mut through_b, vec![event(1)]).await[0]));
    let moved = stamps_of(&a, "moved").await;
    assert!(
        moved[0].1 >= written[0].1 + 1_200,
        "B moved event 1: {written:?} -> {moved:?}"
    );
    assert!(is_written(&write(&mut through_a, vec![event(2)]).await[0]));

    in_order(&a, "moved", "moved-ahead").await;
}

/// Fixed drift: a retry long after its write was stored moves it forward to now, not ahead of
/// now by the time since it was written (which would keep it from live queries for that much
/// longer).
#[tokio::test]
async fn a_retry_long_after_its_write_moves_it_to_now_not_ahead() {
    let (server, _) = fixed_drift_servers("order_retried_late").await;
    let mut journal = server.journal().await;
    let event = atomic(vec![tagged("late-retry", 1, &["late-retry"])]);
    assert!(is_written(
        &write(&mut journal, vec![event.clone()]).await[0]
    ));
    let written = stamps_of(&server, "late-retry").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(is_written(&write(&mut journal, vec![event]).await[0]));
    let answered = mongodb::bson::DateTime::now().timestamp_millis();
    let moved = stamps_of(&server, "late-retry").await;
    assert!(
        moved[0].1 >= written[0].1 + 3_000 && moved[0].1 <= answered,
        "moved to the retry's time, at most {answered}: {written:?} -> {moved:?}"
    );
}

/// The same when server B's move of event 1 is itself acknowledged late (held 1.5 s inside
/// MongoDB, over half the 2 s drift): B moves it again, to now again, not ahead of now by the
/// move's lateness, so A's next write still comes after it.
#[tokio::test]
async fn a_write_after_another_servers_late_move_of_the_events_before_it_follows_them() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "order_moved_late";
    // The held server is B here: its move is what MongoDB holds.
    let (b, a) = fixed_drift_servers(APP).await;
    let mut through_a = a.journal().await;
    let mut through_b = b.journal().await;
    let event = |n| atomic(vec![tagged("late-move", n, &["late-move"])]);
    assert!(is_written(&write(&mut through_a, vec![event(1)]).await[0]));
    let written = stamps_of(&a, "late-move").await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    hold_next(APP, "update", 1_500).await;
    assert!(is_written(&write(&mut through_b, vec![event(1)]).await[0]));
    let moved = stamps_of(&a, "late-move").await;
    assert!(
        moved[0].1 >= written[0].1 + 2_700,
        "B moved event 1 twice: {written:?} -> {moved:?}"
    );
    assert!(is_written(&write(&mut through_a, vec![event(2)]).await[0]));
    in_order(&a, "late-move", "late-move").await;
}

#[tokio::test]
async fn a_batch_acknowledged_after_the_lease_lapsed_waits_for_the_lease_once_not_once_per_id() {
    const APP: &str = "order_late_batch";
    const IDS: usize = 10;
    let lease = Duration::from_secs(1);
    let interval = Duration::from_millis(50);
    let _failpoint = failpoint_turn().await;
    let server = held_server(APP, |settings| {
        settings.read_journal.watermark_lease = lease;
        settings.read_journal.watermark_interval = interval;
    })
    .await;
    let mut client = server.journal().await;
    let warm = write(&mut client, vec![single("warm", 1)]).await;
    assert_eq!(describe(&warm[0]), "written");
    // MongoDB holds this server's inserts and its lease renewals (`findAndModify`) for 2 s
    // each: a renewal answered 2 s after it was sent does not hold a 1 s lease, so none holds.
    fail_next(
        APP,
        1_000,
        "insert",
        doc! {
            "failCommands": ["insert", "findAndModify"],
            "blockConnection": true,
            "blockTimeMS": 2_000,
        },
    )
    .await;
    // One insert of ten ids' writes, acknowledged after the lease lapsed: each id's events
    // must move forward under a holding lease before they are answered, and none comes.
    let writes: Vec<_> = (0..IDS)
        .map(|id| single(&format!("late-{id}"), 1))
        .collect();
    let took = failing_call(&mut client, &writes, "could not renew its watermark lease").await;
    // The insert's hold, then one wait for the lease (1 s + 4 intervals), not one per id
    // (12 s more).
    let one_wait = lease + 4 * interval;
    assert!(
        took < Duration::from_secs(2) + one_wait + Duration::from_secs(2),
        "the call took {took:?}"
    );
    // Stored, so retrying is safe: once the lease holds again the retry is answered Written.
    assert!(all_written_when_retried(&mut client, &writes).await);
    let stored = server
        .mongodb()
        .await
        .collection::<Document>("journal")
        .count_documents(doc! { "pid": { "$regex": "^late-" } })
        .await
        .unwrap();
    assert_eq!(stored, IDS as u64, "each stored once");
}

/// Sends `writes` in one call, turns the failpoint off once it is answered, checks that it
/// failed with `UNAVAILABLE` naming `naming`, and says how long it took.
async fn failing_call(
    client: &mut proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    writes: &[pb::AtomicWrite],
    naming: &str,
) -> Duration {
    let started = std::time::Instant::now();
    let call = client
        .write_events(pb::WriteEventsRequest {
            writes: writes.to_vec(),
            ..Default::default()
        })
        .await;
    let took = started.elapsed();
    failpoint_off().await;
    let status = call.expect_err("the call fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(naming), "{status:?}");
    took
}

/// Sends `writes` until the call is answered (retrying `UNAVAILABLE` for up to 10 s) and says
/// whether every one was `Written`.
async fn all_written_when_retried(
    client: &mut proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    writes: &[pb::AtomicWrite],
) -> bool {
    for _ in 0..50 {
        let request = pb::WriteEventsRequest {
            writes: writes.to_vec(),
            ..Default::default()
        };
        match client.write_events(request).await {
            Ok(response) => {
                let results = response.into_inner().results;
                return results
                    .iter()
                    .all(|result| matches!(result.outcome, Some(Outcome::Written(_))));
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("not answered within 10 s");
}

#[tokio::test]
async fn a_batch_of_retries_finds_mongodb_unavailable_once_not_once_per_id() {
    const APP: &str = "order_compare_batch";
    const IDS: usize = 10;
    let _failpoint = failpoint_turn().await;
    let server = held_server(APP, |_| {}).await;
    let mut client = server.journal().await;
    let writes: Vec<_> = (0..IDS)
        .map(|id| single(&format!("retried-{id}"), 1))
        .collect();
    let first = write(&mut client, writes.clone()).await;
    assert!(first.iter().all(|outcome| describe(outcome) == "written"));
    // The same writes again, as clients retrying after an unknown outcome: the batch reads the
    // ten ids' highest (ten `find`s and one of their records), then compares each write with
    // what is stored (a `find` each). Those reads fail (`WriteConflict`, which is retried),
    // each after 3 attempts of 300 ms.
    fail_after(
        APP,
        IDS as i32 + 1,
        "find",
        doc! { "errorCode": 112, "blockConnection": true, "blockTimeMS": 300 },
    )
    .await;
    let took = failing_call(&mut client, &writes, "check stored events").await;
    // One compare's attempts (about 1.3 s), not ten (13 s).
    assert!(took < Duration::from_secs(5), "the call took {took:?}");
    assert!(all_written_when_retried(&mut client, &writes).await);
}

/// The short cut above lasts one round: a batch whose compare found MongoDB unavailable goes on
/// deciding its other writes, and a write that has to be compared in a later round (after its
/// insert collided) is compared then, not failed with the earlier round's error. Two requests
/// in one batch: a retry of a stored write, whose compare fails, and a write on knowledge that
/// another server has since made stale, whose insert collides.
#[tokio::test]
async fn a_compare_that_found_mongodb_unavailable_does_not_fail_the_compares_of_later_rounds() {
    const APP: &str = "order_compare_rounds";
    let _failpoint = failpoint_turn().await;
    let (held, free) = held_and_free(APP, |settings| {
        settings.write_journal.max_batches_in_flight = 1;
        // Knowledge outlasts the test's waits, so the stale write is inserted without a read.
        settings.write_journal.sequence_nr_cache_validity = Duration::from_secs(20);
        settings.write_journal.purge_delay = Duration::from_secs(60);
        settings.mongodb.retry.max_attempts = 2;
    })
    .await;
    let mut client = held.journal().await;
    let stored = write(&mut client, vec![single("retried", 1), single("stale", 1)]).await;
    assert!(stored.iter().all(is_written), "{stored:?}");
    // Another server continues "stale": the held server's knowledge (highest 1) is now stale.
    let mut taken = atomic(vec![event("stale", 2, "the other server's")]);
    taken.events[0].tags = vec!["order".into()];
    let other = write(&mut free.journal().await, vec![taken]).await;
    assert!(is_written(&other[0]), "{other:?}");

    // A batch kept at MongoDB, so the two requests below queue into the next one: a
    // transaction holds the index key of its insert (a failpoint's hold would also hold up
    // setting the failpoint below until it ends).
    let database = held.mongodb().await;
    let mut blocker = database.client().start_session().await.unwrap();
    blocker.start_transaction().await.unwrap();
    database
        .collection::<Document>("journal")
        .insert_one(doc! { "pid": "held", "seqNr": 1_i64 })
        .session(&mut blocker)
        .await
        .unwrap();
    let mut first_client = client.clone();
    let first =
        tokio::spawn(async move { write(&mut first_client, vec![single("held", 1)]).await });
    wait_until(
        "the first batch's insert waits for the transaction",
        Duration::from_secs(10),
        || inserting(&database, APP),
    )
    .await;
    let call = |writes: Vec<pb::AtomicWrite>| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .write_events(pb::WriteEventsRequest {
                    writes,
                    ..Default::default()
                })
                .await
        })
    };
    let retry = call(vec![single("retried", 1)]);
    let stale = call(vec![single("stale", 2)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The next batch reads the highest of "retried" (its write does not continue it: a find on
    // the journal, let through), then compares it with what is stored: those finds fail, each
    // after 1 s. "stale" continues what the server knows, so it is inserted without a read, and
    // collides with the other server's event 2: it is compared in the next round, whose finds
    // go through (the failpoint is off by then).
    let failed_before = fail_after(
        APP,
        1,
        "find",
        doc! {
            "namespace": format!("{}.journal", held.database),
            "errorCode": 112,
            "blockConnection": true,
            "blockTimeMS": 1_000,
        },
    )
    .await;
    blocker.abort_transaction().await.unwrap();
    // Both attempts of the compare have begun to fail: no later find is failed.
    wait_for_failures(failed_before + 2).await;
    failpoint_off().await;
    assert!(is_written(&first.await.unwrap()[0]));
    let status = retry
        .await
        .unwrap()
        .expect_err("the retried write's compare found MongoDB unavailable");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("check stored events"),
        "{status:?}"
    );
    let response = stale
        .await
        .unwrap()
        .expect("the stale write is compared in the next round, not failed with the first's error")
        .into_inner();
    assert_eq!(
        describe(response.results[0].outcome.as_ref().unwrap()),
        "conflict: sequence number(s) 2 of persistence id \"stale\" are already taken by other \
         events"
    );
    let (events, highest) = replay(&mut client, "stale", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
    assert_eq!(highest, 2);
    assert_eq!(
        events[1].payload.as_ref().unwrap().data,
        b"the other server's".to_vec()
    );
}

/// Whether a server with the application name `app` has an insert into the journal running.
async fn inserting(database: &mongodb::Database, app: &str) -> bool {
    let mut operations = database
        .client()
        .database("admin")
        .aggregate(vec![
            doc! { "$currentOp": {} },
            doc! { "$match": { "appName": app, "command.insert": "journal" } },
        ])
        .await
        .unwrap();
    operations.next().await.is_some()
}
