//! The Rust client crate (`client/`, `eventjournal-client`) against a real server and mongod:
//! every service through the typed API, errors by kind, bearer tokens, and retries through an
//! outage that are safe because writes are idempotent.

mod common;

use std::time::Duration;

use common::proxy::CuttableProxy;
use common::*;
use config::auth::{Role, Token};
use eventjournal_client::{
    Client, Error, Event, Offset, Payload, Replayed, RetryPolicy, SnapshotCriteria,
    SnapshotMetadata, WriteOutcome,
};
use futures::TryStreamExt as _;

/// The sequence numbers of `pid`'s stored events, in order.
async fn stored_sequence_nrs(client: &Client, pid: &str) -> Vec<i64> {
    client
        .replay(pid, 1, None, None)
        .await
        .unwrap()
        .try_filter_map(|item| async move {
            Ok(match item {
                Replayed::Event(event) => Some(event.sequence_nr),
                Replayed::HighestSequenceNr(_) => None,
            })
        })
        .try_collect()
        .await
        .unwrap()
}

/// Two attempts, 10 ms apart.
const TWO_QUICK_ATTEMPTS: RetryPolicy = RetryPolicy {
    max_attempts: 2,
    first_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(10),
};

fn event(pid: &str, sequence_nr: i64, text: &str) -> Event {
    Event::new(
        pid,
        sequence_nr,
        Payload::new(text.as_bytes().to_vec(), 1, "Text"),
    )
    .tagged(["t"])
}

#[tokio::test]
async fn every_service_through_the_typed_client() {
    let server = TestServer::start_with("client", common::read::fast).await;
    let client = Client::builder(server.url()).connect().await.unwrap();

    // Journal: writes, a conflict, replay, highest, delete.
    let outcomes = client
        .write_events(vec![
            vec![event("c1", 1, "one"), event("c1", 2, "two")],
            vec![event("c2", 1, "other")],
        ])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![WriteOutcome::Written, WriteOutcome::Written]);
    let outcomes = client
        .write_events(vec![vec![event("c1", 2, "not two")]])
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], WriteOutcome::Conflict(reason) if !reason.is_empty()),
        "{outcomes:?}"
    );
    let replayed: Vec<Replayed> = client
        .replay("c1", 1, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(replayed.len(), 3, "{replayed:?}");
    match (&replayed[0], &replayed[2]) {
        (Replayed::Event(first), Replayed::HighestSequenceNr(2)) => {
            assert_eq!(first.payload.data, b"one");
            assert_eq!(first.tags, vec!["t".to_owned()]);
            assert!(first.timestamp_millis > 0, "stamped by the service");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.highest_sequence_nr("c1").await.unwrap(), 2);
    client.delete_events_to("c1", 1).await.unwrap();
    let left: Vec<Replayed> = client
        .replay("c1", 1, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(matches!(&left[0], Replayed::Event(event) if event.sequence_nr == 2));

    // Read journal: current and live by tag, from an offset. A current query sees a write
    // once the allowed time drift has passed (issue 15 shortens that).
    tokio::time::sleep(
        server.settings.read_journal.allowed_time_drift + Duration::from_millis(200),
    )
    .await;
    let current: Vec<_> = client
        .current_events_by_tag("t", Offset::start())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut ids: Vec<_> = current
        .iter()
        .map(|envelope| {
            (
                envelope.event.persistence_id.clone(),
                envelope.event.sequence_nr,
            )
        })
        .collect();
    ids.sort();
    assert!(ids.contains(&("c2".to_owned(), 1)), "{ids:?}");
    let mut live = client
        .events_by_tag("t", current.last().unwrap().offset.clone())
        .await
        .unwrap();
    client
        .write_events(vec![vec![event("c3", 1, "live")]])
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), live.try_next())
        .await
        .expect("the live event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(next.event.persistence_id, "c3");

    // Snapshots.
    let stored = client
        .save_snapshot(
            SnapshotMetadata {
                persistence_id: "c1".into(),
                sequence_nr: 2,
                ..Default::default()
            },
            Payload::new(b"state at 2".to_vec(), 1, "Cart"),
        )
        .await
        .unwrap();
    assert!(stored.timestamp_millis > 0);
    let loaded = client
        .load_snapshot("c1", SnapshotCriteria::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.snapshot.data, b"state at 2");
    assert_eq!(
        client
            .load_snapshot("c1", SnapshotCriteria::up_to(1))
            .await
            .unwrap(),
        None
    );
    client
        .delete_snapshots("c1", SnapshotCriteria::all())
        .await
        .unwrap();
    assert_eq!(
        client
            .load_snapshot("c1", SnapshotCriteria::all())
            .await
            .unwrap(),
        None
    );

    // Durable state: revisions and a conflict by kind.
    assert_eq!(client.get_object("s1").await.unwrap().revision, 0);
    client
        .upsert_object("s1", 1, Payload::new(b"v1".to_vec(), 1, "V"), "")
        .await
        .unwrap();
    // The same change again (a retry whose first attempt was applied) gets the same answer.
    client
        .upsert_object("s1", 1, Payload::new(b"v1".to_vec(), 1, "V"), "")
        .await
        .unwrap();
    let conflict = client
        .upsert_object("s1", 1, Payload::new(b"other".to_vec(), 1, "V"), "")
        .await
        .unwrap_err();
    assert!(matches!(conflict, Error::Conflict(_)), "{conflict:?}");
    let object = client.get_object("s1").await.unwrap();
    assert_eq!(
        (object.revision, object.value.unwrap().data),
        (1, b"v1".to_vec())
    );
    client.delete_object("s1", 0).await.unwrap();
    assert_eq!(client.get_object("s1").await.unwrap().value, None);

    // Bad input: a write is rejected naming what was wrong; a bad call is an error by kind.
    let outcomes = client
        .write_events(vec![vec![event("", 1, "no id")]])
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], WriteOutcome::Rejected(reason) if reason.contains("persistence_id")),
        "{outcomes:?}"
    );
    let invalid = client
        .upsert_object("", 1, Payload::default(), "")
        .await
        .unwrap_err();
    assert!(matches!(invalid, Error::InvalidArgument(_)), "{invalid:?}");
}

#[tokio::test]
async fn bearer_tokens_are_sent_and_roles_are_errors_by_kind() {
    const WRITER: &str = "writer-token-0123456789";
    const READER: &str = "reader-token-0123456789";
    let server = TestServer::start_with("client_auth", |settings| {
        settings.auth.enabled = true;
        settings.auth.tokens = vec![
            Token::new("app", &[Role::Write], WRITER),
            Token::new("projector", &[Role::Read], READER),
        ];
    })
    .await;
    let writer = Client::builder(server.url())
        .bearer_token(WRITER)
        .connect()
        .await
        .unwrap();
    assert_eq!(
        writer
            .write_events(vec![vec![event("a1", 1, "x")]])
            .await
            .unwrap(),
        vec![WriteOutcome::Written]
    );
    let reader = Client::builder(server.url())
        .bearer_token(READER)
        .connect()
        .await
        .unwrap();
    assert_eq!(reader.highest_sequence_nr("a1").await.unwrap(), 1);
    let denied = reader
        .write_events(vec![vec![event("a1", 2, "y")]])
        .await
        .unwrap_err();
    assert!(matches!(denied, Error::PermissionDenied(_)), "{denied:?}");
    let anonymous = Client::builder(server.url()).connect().await.unwrap();
    let error = anonymous.highest_sequence_nr("a1").await.unwrap_err();
    assert!(matches!(error, Error::Unauthenticated(_)), "{error:?}");
}

/// The service out of reach for a while: calls are retried with backoff and succeed once it is
/// back; a write retried after its first attempt was applied (the reply lost) gets the same
/// answer, and nothing is stored twice. With too few attempts, the error says unavailable.
#[tokio::test]
async fn calls_are_retried_through_an_outage_and_retried_writes_are_idempotent() {
    let server = TestServer::start("client_retry").await;
    let proxy = CuttableProxy::start(server.address).await;
    let client = Client::builder(format!("http://{}", proxy.address))
        .retry(RetryPolicy {
            max_attempts: 50,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        })
        .connect()
        .await
        .unwrap();
    assert_eq!(
        client
            .write_events(vec![vec![event("r1", 1, "before")]])
            .await
            .unwrap(),
        vec![WriteOutcome::Written]
    );
    proxy.cut();
    let restore = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        proxy.restore();
        proxy
    });
    let outcomes = client
        .write_events(vec![vec![event("r1", 2, "through the outage")]])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![WriteOutcome::Written]);
    let proxy = restore.await.unwrap();
    // A retry of a write that was applied (the same events again) is answered Written.
    assert_eq!(
        client
            .write_events(vec![vec![event("r1", 2, "through the outage")]])
            .await
            .unwrap(),
        vec![WriteOutcome::Written]
    );
    let events: Vec<Replayed> = client
        .replay("r1", 1, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len(), 3, "two events and the highest: {events:?}");

    let impatient = Client::builder(format!("http://{}", proxy.address))
        .retry(TWO_QUICK_ATTEMPTS)
        .connect()
        .await
        .unwrap();
    proxy.cut();
    let error = impatient.highest_sequence_nr("r1").await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 2, .. }) && error.is_retryable(),
        "{error:?}"
    );
}

/// A projection over a tag: handles every event once, commits its offset in the service's
/// durable-state store, resumes after a stop and after an abort (as a crash) with nothing
/// missed and nothing handled twice, and reports its lag.
#[tokio::test]
async fn a_projection_resumes_from_its_stored_offset_after_a_stop_and_a_crash() {
    use eventjournal_client::projection::{Projection, Source};
    use std::sync::{Arc, Mutex};
    let server = TestServer::start_with("client_projection", common::read::fast).await;
    let client = Client::builder(server.url()).connect().await.unwrap();
    let write_tagged = |from: i64, to: i64| {
        let client = client.clone();
        async move {
            let writes = (from..=to)
                .map(|n| {
                    vec![Event::new("sale", n, Payload::new(vec![1], 1, "E")).tagged(["sales"])]
                })
                .collect();
            assert!(
                client
                    .write_events(writes)
                    .await
                    .unwrap()
                    .iter()
                    .all(|outcome| *outcome == WriteOutcome::Written)
            );
        }
    };
    type Handled = Arc<Mutex<Vec<(String, i64, Offset)>>>;
    let handled: Handled = Arc::default();
    let start = || {
        let handled = handled.clone();
        let client = client.clone();
        async move {
            Projection::new("sales-total", Source::Tag("sales".into()))
                .commit_every(1)
                .run(
                    client,
                    move |envelope: eventjournal_client::EventEnvelope| {
                        handled.lock().unwrap().push((
                            envelope.event.persistence_id.clone(),
                            envelope.event.sequence_nr,
                            envelope.offset.clone(),
                        ));
                        async { Ok(()) }
                    },
                )
                .await
                .unwrap()
        }
    };
    let count = |handled: &Handled| handled.lock().unwrap().len();

    write_tagged(1, 30).await;
    let projection = start().await;
    wait_until("30 handled", Duration::from_secs(30), || async {
        count(&handled) == 30
    })
    .await;
    assert!(projection.lag() > Duration::ZERO);
    projection.stop().await.unwrap();

    write_tagged(31, 40).await;
    let projection = start().await;
    wait_until("40 handled", Duration::from_secs(30), || async {
        count(&handled) == 40
    })
    .await;
    // A crash: the task ends without a last commit, once the last event's offset was committed.
    let last = handled.lock().unwrap().last().unwrap().2.clone();
    wait_until(
        "the last offset committed",
        Duration::from_secs(10),
        || async { projection.committed() == last },
    )
    .await;
    projection.abort();

    write_tagged(41, 45).await;
    let projection = start().await;
    wait_until("45 handled", Duration::from_secs(30), || async {
        count(&handled) >= 45
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    projection.stop().await.unwrap();
    let mut keys: Vec<(String, i64)> = handled
        .lock()
        .unwrap()
        .iter()
        .map(|(pid, sequence_nr, _)| (pid.clone(), *sequence_nr))
        .collect();
    assert_eq!(keys.len(), 45, "each event handled once");
    keys.sort_by_key(|(_, sequence_nr)| *sequence_nr);
    assert_eq!(
        keys.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        (1..=45).collect::<Vec<_>>()
    );
    // The offset is an object in the service's durable-state store.
    let stored = client
        .get_object("projection-offset|sales-total")
        .await
        .unwrap();
    assert!(stored.revision >= 45, "{stored:?}");
}

/// The spool: a producer keeps sending while the service is down (stopped, then started again
/// on the same address), the spool is dropped with writes not yet sent (as a crash) and one
/// record torn, and reopened: every event is stored exactly once, in order. A full spool makes
/// `send` wait until the service takes some.
#[tokio::test]
async fn the_spool_loses_nothing_through_outages_and_crashes_and_pushes_back_when_full() {
    use eventjournal_client::spool::{Spool, SpoolOptions};
    let server = TestServer::start("client_spool").await;
    let address = server.address;
    let mut settings = server.settings.clone();
    settings.server.listen = address;
    let directory =
        std::env::temp_dir().join(format!("ej_spool_{}", uuid::Uuid::new_v4().simple()));
    let client = Client::builder(server.url())
        .retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .connect_lazy()
        .unwrap();
    let reading = |n: i64| {
        vec![Event::new(
            "sensor-1",
            n,
            Payload::new(n.to_string().into_bytes(), 1, "Reading"),
        )]
    };
    let spool = Spool::open(&directory, client.clone(), SpoolOptions::default())
        .await
        .unwrap();
    for n in 1..=100 {
        spool.send(reading(n)).await.unwrap();
    }
    // The service goes away; the producer goes on.
    server.stop().await.unwrap();
    for n in 101..=200 {
        spool.send(reading(n)).await.unwrap();
    }
    assert!(spool.pending_bytes() > 0);
    // The producer "crashes" with writes unsent, one torn half-way.
    drop(spool);
    let segment = std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
        .max()
        .unwrap();
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    std::io::Write::write_all(&mut torn, &[200, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(torn);
    // The service is back, the producer restarts on the same directory.
    let server = TestServer::start_on_database(settings).await;
    let spool = Spool::open(&directory, client.clone(), SpoolOptions::default())
        .await
        .unwrap();
    for n in 201..=250 {
        spool.send(reading(n)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), spool.drained())
        .await
        .expect("the spool drains");
    assert_eq!(spool.rejected(), 0);
    let stored = stored_sequence_nrs(&client, "sensor-1").await;
    assert_eq!(stored, (1..=250).collect::<Vec<_>>(), "each once, in order");
    drop(spool);

    // A full spool pushes back: with the service out of reach, `send` waits for room.
    let proxy = CuttableProxy::start(server.address).await;
    let cut_off = Client::builder(format!("http://{}", proxy.address))
        .retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .connect_lazy()
        .unwrap();
    proxy.cut();
    let small = std::env::temp_dir().join(format!("ej_spool_{}", uuid::Uuid::new_v4().simple()));
    let spool = Spool::open(
        &small,
        cut_off,
        SpoolOptions {
            max_bytes: 1_000,
            ..SpoolOptions::default()
        },
    )
    .await
    .unwrap();
    let mut n = 251;
    // Until full: then `send` waits (and, given up, appended nothing).
    while let Ok(sent) =
        tokio::time::timeout(Duration::from_millis(500), spool.send(reading(n))).await
    {
        sent.unwrap();
        n += 1;
        assert!(n < 400, "a spool of 1,000 bytes kept taking writes");
    }
    assert!(spool.pending_bytes() <= 1_000, "{}", spool.pending_bytes());
    proxy.restore();
    tokio::time::timeout(Duration::from_secs(30), spool.send(reading(n)))
        .await
        .expect("send goes on once the service takes some")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), spool.drained())
        .await
        .expect("the spool drains");
    assert_eq!(client.highest_sequence_nr("sensor-1").await.unwrap(), n);
    let _ = std::fs::remove_dir_all(directory);
    let _ = std::fs::remove_dir_all(small);
}

/// A shopping cart as a persistent actor (ractor): replies after its events are stored,
/// snapshots every 3 events (older snapshots and events deleted), recovers after a server
/// restart from the snapshot plus the events after it, and a second incarnation of the same
/// cart gets a conflict on its first write and stops.
#[tokio::test]
async fn a_persistent_actor_recovers_snapshots_and_stops_on_a_second_incarnation() {
    use eventjournal_client::actor::{PersistentActor, ask};
    use eventjournal_client::persistent::{Behaviour, Effect, PersistenceSettings};

    struct Cart;
    enum CartCommand {
        Add(String),
        Items,
    }
    impl Behaviour for Cart {
        type Command = CartCommand;
        type Event = String;
        type State = Vec<String>;
        type Reply = Vec<String>;

        fn command(
            &self,
            state: &Vec<String>,
            command: CartCommand,
        ) -> Effect<String, Vec<String>> {
            match command {
                CartCommand::Add(item) => {
                    let mut items = state.clone();
                    items.push(item.clone());
                    Effect::Persist(vec![item], items)
                }
                CartCommand::Items => Effect::Reply(state.clone()),
            }
        }
        fn apply(state: &mut Vec<String>, item: &String) {
            state.push(item.clone());
        }
        fn encode_event(item: &String) -> Payload {
            Payload::new(item.as_bytes().to_vec(), 1, "ItemAdded")
        }
        fn decode_event(payload: &Payload) -> eventjournal_client::Result<String> {
            Ok(String::from_utf8_lossy(&payload.data).into_owned())
        }
        fn encode_state(items: &Vec<String>) -> Payload {
            Payload::new(items.join("\n").into_bytes(), 1, "Cart")
        }
        fn decode_state(payload: &Payload) -> eventjournal_client::Result<Vec<String>> {
            let text = String::from_utf8_lossy(&payload.data).into_owned();
            Ok(text
                .split('\n')
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn tags(_item: &String) -> Vec<String> {
            vec!["cart".into()]
        }
    }
    let settings = PersistenceSettings {
        snapshot_every: 3,
        keep_snapshots: 1,
        delete_events: true,
    };
    let spawn = |client: Client| async move {
        ractor::Actor::spawn(
            None,
            PersistentActor::<Cart>::new(),
            (client, "cart-1".to_owned(), Cart, settings),
        )
        .await
        .unwrap()
        .0
    };

    let server = TestServer::start("client_actor").await;
    let client = Client::builder(server.url()).connect_lazy().unwrap();
    let cart = spawn(client.clone()).await;
    for item in ["apple", "pear", "plum", "fig", "kiwi"] {
        ask(&cart, CartCommand::Add(item.into())).await.unwrap();
    }
    let snapshot = client
        .load_snapshot("cart-1", SnapshotCriteria::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.metadata.sequence_nr, 3);
    let left: Vec<Replayed> = client
        .replay("cart-1", 1, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        matches!(&left[0], Replayed::Event(event) if event.sequence_nr == 4),
        "events up to the snapshot deleted: {left:?}"
    );
    cart.stop(None);

    // The server restarts; the cart recovers from the snapshot and the two events after it.
    let mut restarted = server.settings.clone();
    restarted.server.listen = server.address;
    server.stop().await.unwrap();
    let server = TestServer::start_on_database(restarted).await;
    let cart = spawn(client.clone()).await;
    assert_eq!(
        ask(&cart, CartCommand::Items).await.unwrap(),
        vec!["apple", "pear", "plum", "fig", "kiwi"]
    );

    // A second incarnation (recovered at the same point) loses the race and stops.
    let twin = spawn(client.clone()).await;
    ask(&cart, CartCommand::Add("lime".into())).await.unwrap();
    let conflict = ask(&twin, CartCommand::Add("date".into()))
        .await
        .unwrap_err();
    assert!(matches!(conflict, Error::Conflict(_)), "{conflict:?}");
    let stopped = ask(&twin, CartCommand::Items).await.unwrap_err();
    assert!(matches!(stopped, Error::Unavailable { .. }), "{stopped:?}");
    assert_eq!(ask(&cart, CartCommand::Items).await.unwrap().len(), 6);
    assert_eq!(client.highest_sequence_nr("cart-1").await.unwrap(), 6);
    drop(server);
}

/// A counter as a durable-state actor: gets its object on start, stores each change as the next
/// revision (reply after it is stored), and stops when another writer took the revision.
#[tokio::test]
async fn a_durable_state_actor_stores_revisions_and_stops_on_a_conflict() {
    use eventjournal_client::actor::{DurableStateActor, ask_state};
    use eventjournal_client::durable::{StateBehaviour, StateEffect};

    struct Counter;
    impl StateBehaviour for Counter {
        type Command = i64;
        type State = i64;
        type Reply = i64;
        fn command(&self, state: &i64, add: i64) -> StateEffect<i64, i64> {
            if add == 0 {
                StateEffect::Reply(*state)
            } else {
                StateEffect::Store(state + add, state + add)
            }
        }
        fn encode(state: &i64) -> Payload {
            Payload::new(state.to_string().into_bytes(), 1, "Count")
        }
        fn decode(payload: &Payload) -> eventjournal_client::Result<i64> {
            String::from_utf8_lossy(&payload.data)
                .parse()
                .map_err(|_| Error::InvalidArgument("not a count".into()))
        }
    }
    let server = TestServer::start("client_state_actor").await;
    let client = Client::builder(server.url()).connect_lazy().unwrap();
    let spawn = || {
        let client = client.clone();
        async move {
            ractor::Actor::spawn(
                None,
                DurableStateActor::<Counter>::new(),
                (client, "counter-1".to_owned(), Counter),
            )
            .await
            .unwrap()
            .0
        }
    };
    let counter = spawn().await;
    assert_eq!(ask_state(&counter, 5).await.unwrap(), 5);
    assert_eq!(ask_state(&counter, 2).await.unwrap(), 7);
    counter.stop(None);
    let counter = spawn().await;
    assert_eq!(ask_state(&counter, 0).await.unwrap(), 7, "got on start");
    let object = client.get_object("counter-1").await.unwrap();
    assert_eq!(object.revision, 2);
    // Another writer takes revision 3: the actor's next store conflicts and it stops.
    client
        .upsert_object("counter-1", 3, Counter::encode(&100), "")
        .await
        .unwrap();
    let conflict = ask_state(&counter, 1).await.unwrap_err();
    assert!(matches!(conflict, Error::Conflict(_)), "{conflict:?}");
    assert!(matches!(
        ask_state(&counter, 0).await.unwrap_err(),
        Error::Unavailable { .. }
    ));
}

/// The contract is language-neutral: `examples/python/follow_tag.py` (grpcio, code generated
/// from the `.proto` here) writes three events and follows their tag.
#[tokio::test]
async fn the_python_example_writes_and_follows_a_tag() {
    let packages = std::env::var("EVENTJOURNAL_TEST_PYTHONPATH").expect(
        "EVENTJOURNAL_TEST_PYTHONPATH is not set: run the suite with `cargo xtask test` (it \
         installs grpcio for the Python example)",
    );
    let server = TestServer::start_with("client_python", common::read::fast).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated =
        std::env::temp_dir().join(format!("ej_python_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&generated).unwrap();
    let protoc = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I", "proto/proto"])
        .arg(format!("--python_out={}", generated.display()))
        .arg(format!("--grpc_python_out={}", generated.display()))
        .arg("eventjournal/v1/eventjournal.proto")
        .current_dir(root)
        .env("PYTHONPATH", &packages)
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "{}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let mut child = std::process::Command::new("python3")
        .arg(root.join("examples/python/follow_tag.py"))
        .env("PYTHONPATH", format!("{packages}:{}", generated.display()))
        .env("EVENTJOURNAL_URL", server.address.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the Python example did not finish within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("written: ['written', 'written', 'written']")
            && stdout.contains("#3: reading 3"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(generated);
}

/// The sensor-ingest example as a real producer process, against a real server process: the
/// server is killed (-9) and started again while the producer writes, then the producer is
/// killed (-9) after it reported 200 readings accepted, and started again for 100 more. Every
/// reading it accepted is stored, each exactly once (a contiguous history of at least 300).
#[tokio::test]
async fn the_spool_survives_kill_9_of_the_service_and_of_the_producer() {
    use common::process::{ServerProcess, wait_until_serving};
    use std::io::BufRead as _;
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples");
    let producer_binary = examples.join("sensor-ingest");
    assert!(
        producer_binary.exists(),
        "{} (cargo test builds the examples)",
        producer_binary.display()
    );
    let port = free_port();
    let database = unique_database("client_spool_kill");
    let url = format!("http://127.0.0.1:{port}");
    let mut server = ServerProcess::spawn(port, &database, &[]);
    wait_until_serving(&url).await;
    let spool =
        std::env::temp_dir().join(format!("ej_spool_kill_{}", uuid::Uuid::new_v4().simple()));
    let producer = |readings: &str| {
        std::process::Command::new(&producer_binary)
            .args(["sensor-k", readings])
            .env("EVENTJOURNAL_URL", &url)
            .env("SENSOR_SPOOL_DIR", &spool)
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = producer("100000");
    let (lines, mut lines_in) = tokio::sync::mpsc::unbounded_channel();
    let stdout = first.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = lines.send(line.unwrap_or_default());
        }
    });
    async fn wait_for(lines_in: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = tokio::time::timeout_at(deadline, lines_in.recv())
                .await
                .unwrap_or_else(|_| panic!("the producer never printed {what:?}"))
                .unwrap_or_else(|| panic!("the producer ended before {what:?}"));
            if line.starts_with(what) {
                return;
            }
        }
    }
    wait_for(&mut lines_in, "100 readings taken").await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let server = ServerProcess::spawn(port, &database, &[]);
    wait_for(&mut lines_in, "200 readings taken").await;
    let _ = first.kill();
    let _ = first.wait();
    wait_until_serving(&url).await;
    let second = producer("100");
    let output = tokio::task::spawn_blocking(move || second.wait_with_output().unwrap())
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("(0 refused)"), "{out}");
    let client = Client::builder(&url).connect().await.unwrap();
    let stored = stored_sequence_nrs(&client, "sensor-k").await;
    assert!(stored.len() >= 300, "{} readings stored", stored.len());
    assert_eq!(stored, (1..=stored.len() as i64).collect::<Vec<_>>());
    drop(server);
    let _ = std::fs::remove_dir_all(spool);
}

/// A projection over all slices with a user-supplied offset store: it resumes from what that
/// store holds, and the events its dedup window names (handled before, in that store's record)
/// are skipped, not handed to the handler again.
#[tokio::test]
async fn a_projection_over_slices_uses_its_own_store_and_skips_what_its_window_holds() {
    use eventjournal_client::projection::{Committed, OffsetStore, Projection, Source};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Option<Committed>>>);
    impl OffsetStore for Memory {
        async fn load(&self, _: &str) -> eventjournal_client::Result<Option<Committed>> {
            Ok(self.0.lock().unwrap().clone())
        }
        async fn save(&self, _: &str, committed: &Committed) -> eventjournal_client::Result<()> {
            *self.0.lock().unwrap() = Some(committed.clone());
            Ok(())
        }
    }
    let server = TestServer::start_with("client_slices", common::read::fast).await;
    let client = Client::builder(server.url()).connect().await.unwrap();
    let writes = (1..=10)
        .map(|n| vec![Event::new("meter", n, Payload::new(vec![n as u8], 1, "M"))])
        .collect();
    client.write_events(writes).await.unwrap();
    // As if 1 to 4 were handled and remembered, but the offset not moved past them.
    let store = Memory::default();
    *store.0.lock().unwrap() = Some(Committed {
        offset: Offset::start(),
        recent: (1..=4).map(|n| ("meter".to_owned(), n)).collect(),
    });
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = handled.clone();
    let projection = Projection::new("meters", Source::Slices { min: 0, max: 1023 })
        .commit_every(3)
        .run_with(
            client.clone(),
            store.clone(),
            move |envelope: eventjournal_client::EventEnvelope| {
                seen.lock().unwrap().push(envelope.event.sequence_nr);
                async { Ok(()) }
            },
        )
        .await
        .unwrap();
    wait_until("5 to 10 handled", Duration::from_secs(30), || async {
        handled.lock().unwrap().len() >= 6
    })
    .await;
    assert_eq!(projection.skipped(), 4);
    assert_eq!(projection.handled(), 6);
    projection.stop().await.unwrap();
    assert_eq!(*handled.lock().unwrap(), (5..=10).collect::<Vec<i64>>());
    let committed = store.0.lock().unwrap().clone().unwrap();
    assert_ne!(committed.offset, Offset::start(), "the offset moved on");
    assert_eq!(
        committed.recent.len(),
        10,
        "the window holds the skipped and the handled"
    );
}

/// The cart-projector example as a process, killed (-9) in the middle of the events and started
/// again: its stored totals (kept with its offset in one object) end exactly right: nothing
/// missed, nothing counted twice.
#[tokio::test]
async fn the_cart_projector_survives_kill_9_counting_each_event_once() {
    use std::io::BufRead as _;
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/cart-projector");
    assert!(
        binary.exists(),
        "{} (cargo test builds the examples)",
        binary.display()
    );
    let server = TestServer::start_with("client_projector_kill", common::read::fast).await;
    let client = Client::builder(server.url()).connect().await.unwrap();
    let added = |cart: i64| {
        vec![
            Event::new(
                format!("cart|k{cart}"),
                1,
                Payload::new(b"apple".to_vec(), 1, "ItemAdded"),
            )
            .tagged(["cart"]),
        ]
    };
    client
        .write_events((1..=40).map(added).collect())
        .await
        .unwrap();
    let start = || {
        std::process::Command::new(&binary)
            .env("EVENTJOURNAL_URL", server.url())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = start();
    let stdout = first.stdout.take().unwrap();
    let counted = tokio::task::spawn_blocking(move || {
        // Until it has counted 25 of the 40.
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("\"apple\": 25"))
    });
    let seen = tokio::time::timeout(Duration::from_secs(60), counted)
        .await
        .expect("the projector counts")
        .unwrap();
    assert!(seen.is_some());
    first.kill().unwrap();
    first.wait().unwrap();
    client
        .write_events((41..=50).map(added).collect())
        .await
        .unwrap();
    let mut second = start();
    let total = |client: Client| async move {
        let stored = client.get_object("cart-projector|state").await.unwrap();
        let text = String::from_utf8_lossy(&stored.value.unwrap_or_default().data).into_owned();
        text.lines()
            .find_map(|line| line.strip_suffix("\tapple"))
            .and_then(|count| count.parse::<i64>().ok())
    };
    wait_until(
        "all 50 counted and committed",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move { total(client).await == Some(50) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        total(client.clone()).await,
        Some(50),
        "nothing counted twice"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

/// An event larger than gRPC's usual 4 MiB limit on received messages is written and read
/// back through the client (it receives messages up to the server's 32 MiB by default).
#[tokio::test]
async fn an_event_over_4_mib_is_written_and_replayed() {
    let server = TestServer::start("client_large").await;
    let client = Client::builder(server.url()).connect().await.unwrap();
    let data = vec![7_u8; 5 << 20];
    let large = Event::new("large", 1, Payload::new(data.clone(), 1, "Bytes"));
    assert_eq!(
        client.write_events(vec![vec![large]]).await.unwrap(),
        vec![WriteOutcome::Written]
    );
    let replayed: Vec<Replayed> = client
        .replay("large", 1, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    match &replayed[..] {
        [Replayed::Event(event), Replayed::HighestSequenceNr(1)] => {
            assert_eq!(event.payload.data, data)
        }
        other => panic!("{} items, not the event and the highest", other.len()),
    }
}

/// The spool sends large records in batches the server takes (capped in bytes: 100 records of
/// 400 KiB are 40 MiB, over the server's 32 MiB messages), and a record larger than any
/// message goes to `rejected.log` instead of holding up everything after it for ever.
#[tokio::test]
async fn the_spool_sends_large_records_and_refuses_one_too_large_for_any_message() {
    use eventjournal_client::spool::{Spool, SpoolOptions};
    let server = TestServer::start("client_spool_large").await;
    let directory =
        std::env::temp_dir().join(format!("ej_spool_{}", uuid::Uuid::new_v4().simple()));
    let client = Client::builder(server.url()).connect().await.unwrap();
    let spool = Spool::open(&directory, client.clone(), SpoolOptions::default())
        .await
        .unwrap();
    let sized = |pid: &str, n: i64, bytes: usize| {
        vec![Event::new(
            pid,
            n,
            Payload::new(vec![1_u8; bytes], 1, "Bytes"),
        )]
    };
    for n in 1..=100 {
        spool.send(sized("large", n, 400 << 10)).await.unwrap();
    }
    spool.send(sized("too-large", 1, 33 << 20)).await.unwrap();
    spool.send(sized("after", 1, 10)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), spool.drained())
        .await
        .expect("everything acknowledged within a minute");
    assert_eq!(spool.rejected(), 1);
    assert_eq!(client.highest_sequence_nr("large").await.unwrap(), 100);
    assert_eq!(client.highest_sequence_nr("too-large").await.unwrap(), 0);
    assert_eq!(client.highest_sequence_nr("after").await.unwrap(), 1);
    let rejected = std::fs::read_to_string(directory.join("rejected.log")).unwrap();
    assert!(rejected.starts_with("too-large 1..=1: "), "{rejected}");
    drop(spool);
    std::fs::remove_dir_all(&directory).unwrap();
}

#[tokio::test]
async fn a_call_without_an_answer_in_time_fails_with_deadline_exceeded_after_its_attempts() {
    const APP: &str = "client_call_timeout";
    const TIMEOUT: Duration = Duration::from_millis(500);
    let _failpoint = failpoint_turn().await;
    let server = TestServer::start_with(APP, |settings| {
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
    })
    .await;
    // MongoDB holds each of the server's inserts for 2 s: the call gets no answer in time.
    fail_next(
        APP,
        100,
        "insert",
        mongodb::bson::doc! { "blockConnection": true, "blockTimeMS": 2_000 },
    )
    .await;
    let client = Client::builder(server.url())
        .call_timeout(TIMEOUT)
        .retry(TWO_QUICK_ATTEMPTS)
        .connect()
        .await
        .unwrap();
    let write = || client.write_events(vec![vec![event("slow", 1, "one")]]);
    let started = std::time::Instant::now();
    let error = write().await.unwrap_err();
    let waited = started.elapsed();
    failpoint_off().await;
    assert!(
        matches!(&error, Error::DeadlineExceeded(message)
            if message.contains("WriteEvents: no answer within the call timeout (500ms) to the last of 2 attempt(s)")
                && message.contains("sending it again is safe")),
        "{error:?}"
    );
    assert!(error.is_retryable(), "{error:?}");
    assert!(waited >= TIMEOUT * 2, "both attempts ran: {waited:?}");
    // The write may have been stored meanwhile; sending it again is answered Written, and it
    // is stored once.
    let mut outcome = write().await;
    for _ in 0..50 {
        if !matches!(&outcome, Err(error) if error.is_retryable()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        outcome = write().await;
    }
    assert_eq!(outcome.unwrap(), vec![WriteOutcome::Written]);
    assert_eq!(stored_sequence_nrs(&client, "slow").await, vec![1]);
}
