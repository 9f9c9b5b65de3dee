//! End-to-end harness: a real eventjournal server on 127.0.0.1:0, in this process, against the
//! test mongod, each test in a database of its own so tests run in parallel.

#![allow(dead_code)]

pub mod certificates;
pub mod own_mongod;
pub mod process;
pub mod proxy;
pub mod read;
pub mod replica_set;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use config::{Overrides, Settings};
use proto::v1 as pb;
use proto::v1::journal_client::JournalClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const MONGODB_URI_VARIABLE: &str = "EVENTJOURNAL_TEST_MONGODB_URI";

/// The test mongod. Without one the suite fails, saying how to get one: it never skips.
pub fn mongodb_uri() -> String {
    std::env::var(MONGODB_URI_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{MONGODB_URI_VARIABLE} is not set. Run the suite with `make test`, which starts a \
             mongod for it, or start one with `cargo xtask mongod-start --instance test` and \
             export {MONGODB_URI_VARIABLE}=<the URI it prints>."
        )
    })
}

/// `host:port` of the test mongod.
pub fn mongodb_address() -> SocketAddr {
    let uri = mongodb_uri();
    let authority = uri
        .trim_start_matches("mongodb://")
        .split(['/', '?'])
        .next()
        .unwrap()
        .to_owned();
    authority.parse().unwrap_or_else(|_| {
        panic!("{MONGODB_URI_VARIABLE} must name one 127.0.0.1:port host, not {uri}")
    })
}

/// A database name no other test uses.
pub fn unique_database(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    let mut name = format!("t_{prefix}_{}_{n}_{}", std::process::id(), &random[..8]);
    name.truncate(60);
    name
}

pub fn test_settings(database: &str) -> Settings {
    let overrides = Overrides {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        mongodb_uri: Some(mongodb_uri()),
        database: Some(database.to_owned()),
    };
    let mut settings =
        Settings::load(None, &HashMap::new(), &overrides).expect("test settings are valid");
    // Many servers run at once; a test that wants metrics picks a port.
    settings.server.metrics_listen = None;
    // Knowledge of the highest sequence numbers trusted for a second, and inserted on for the
    // purge delay less that: 29 s, so inserts a test holds at MongoDB for seconds still count.
    // A test that purges sets a purge delay of seconds itself ([`quick_purge`]).
    settings.write_journal.sequence_nr_cache_validity = std::time::Duration::from_secs(1);
    settings.write_journal.purge_delay = std::time::Duration::from_secs(30);
    settings
}

/// Deleted events purgeable 2 s after their delete (the TTL monitor runs every second), for a
/// test that purges: knowledge is then inserted on for only a second after it was confirmed.
pub fn quick_purge(settings: &mut Settings) {
    settings.write_journal.purge_delay = std::time::Duration::from_secs(2);
}

pub struct TestServer {
    pub address: SocketAddr,
    pub database: String,
    pub settings: Settings,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, |_| {}).await
    }

    pub async fn start_with(prefix: &str, customize: impl FnOnce(&mut Settings)) -> Self {
        let database = unique_database(prefix);
        let mut settings = test_settings(&database);
        customize(&mut settings);
        Self::start_on_database(settings).await
    }

    /// A second server over the same database as `settings` names.
    pub async fn start_on_database(settings: Settings) -> Self {
        // Server logs, shown with a failing test's output; `RUST_LOG` sets the level.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind(settings.server.listen).await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let mut handle = tokio::spawn(eventjournal::run(
            settings.clone(),
            listener,
            shutdown.clone(),
        ));
        Self::wait_until_serving(&format!("http://{address}"), &mut handle).await;
        Self {
            address,
            database: settings.mongodb.database.clone(),
            settings,
            shutdown,
            handle,
        }
    }

    async fn wait_until_serving(url: &str, handle: &mut JoinHandle<anyhow::Result<()>>) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if answers_health(url).await {
                return;
            }
            if handle.is_finished() {
                let ended = handle.await;
                panic!("the server stopped while starting: {ended:?}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn journal(&self) -> JournalClient<Channel> {
        JournalClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A direct MongoDB handle on this server's database, to check what is stored.
    pub async fn mongodb(&self) -> mongodb::Database {
        mongodb::Client::with_uri_str(mongodb_uri())
            .await
            .unwrap()
            .database(&self.database)
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await.expect("server task panicked")
    }
}

/// Waits (polling) until `condition` holds, failing the test after `timeout` with `what`.
/// For effects with no completion signal, such as the TTL monitor's purges.
pub async fn wait_until<F, Fut>(what: &str, timeout: std::time::Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Purges `pid`'s deleted events as an operator would (a TTL index on `deletedAt`, expiring
/// at once) and waits until majority reads (the server's) no longer see any event of it.
pub async fn purge_deleted_events(
    database: &mongodb::Database,
    pid: &str,
    timeout: std::time::Duration,
) {
    use mongodb::bson::{Document, doc};
    let majority = mongodb::options::CollectionOptions::builder()
        .read_concern(mongodb::options::ReadConcern::majority())
        .build();
    let journal = database.collection_with_options::<Document>("journal", majority);
    let ttl = mongodb::options::IndexOptions::builder()
        .expire_after(std::time::Duration::ZERO)
        .build();
    journal
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "deletedAt": 1 })
                .options(ttl)
                .build(),
        )
        .await
        .unwrap();
    wait_until(
        "the TTL monitor purges the deleted events",
        timeout,
        || async { journal.count_documents(doc! { "pid": pid }).await.unwrap() == 0 },
    )
    .await;
}

/// The test mongod has one `failCommand` failpoint, and setting it replaces what another test
/// set: tests of one binary (run in parallel) that set it take turns by holding this.
pub async fn failpoint_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Makes the test mongod fail this server's next `times` `command`s (only connections with
/// `app_name`, so parallel tests are not affected), as CosmosDB does when over its throughput.
/// Returns how many commands the failpoint had failed before (for [`wait_for_failures`]).
pub async fn fail_next(
    app_name: &str,
    times: i32,
    command: &str,
    failure: mongodb::bson::Document,
) -> i64 {
    fail_command(
        app_name,
        mongodb::bson::doc! { "times": times },
        command,
        failure,
    )
    .await
}

/// Like [`fail_next`], but lets this server's first `skip` `command`s through and fails every
/// one after them, until [`failpoint_off`]. Returns how many commands the failpoint had failed
/// before (for [`wait_for_failures`]).
pub async fn fail_after(
    app_name: &str,
    skip: i32,
    command: &str,
    failure: mongodb::bson::Document,
) -> i64 {
    fail_command(
        app_name,
        mongodb::bson::doc! { "skip": skip },
        command,
        failure,
    )
    .await
}

/// The test mongod's `admin` database, for its failpoints.
async fn admin() -> mongodb::Database {
    mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .unwrap()
        .database("admin")
}

/// Sets the failpoint; returns how many commands it had failed before (`configureFailPoint`'s
/// `count`, which counts on across settings).
async fn fail_command(
    app_name: &str,
    mode: mongodb::bson::Document,
    command: &str,
    failure: mongodb::bson::Document,
) -> i64 {
    let mut data = mongodb::bson::doc! { "failCommands": [command], "appName": app_name };
    data.extend(failure);
    let reply = admin()
        .await
        .run_command(mongodb::bson::doc! {
            "configureFailPoint": "failCommand",
            "mode": mode,
            "data": data,
        })
        .await
        .expect("configureFailPoint (the test mongod runs with enableTestCommands=1)");
    reply
        .get("count")
        .and_then(mongodb::bson::Bson::as_i64)
        .or_else(|| reply.get_i32("count").ok().map(i64::from))
        .expect("configureFailPoint answers with its count")
}

/// Waits (up to 30 s) until the failpoint has failed `count` commands in all (the count
/// [`fail_after`] returned, plus the failures awaited): a command counted has begun to fail,
/// and a held one (`blockConnection`) still fails after its hold when the failpoint is turned
/// off meanwhile. (Setting the failpoint, or turning it off, waits for the holds under way to
/// end; the commands that come meanwhile are not failed.)
pub async fn wait_for_failures(count: i64) {
    admin()
        .await
        .run_command(mongodb::bson::doc! {
            "waitForFailPoint": "failCommand",
            "timesEntered": count,
            "maxTimeMS": 30_000,
        })
        .await
        .expect("waitForFailPoint: the failures awaited came within 30 s");
}

/// Turns the test mongod's `failCommand` failpoint off: commands already held finish their
/// hold.
pub async fn failpoint_off() {
    admin()
        .await
        .run_command(mongodb::bson::doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .unwrap();
}

/// Makes the test mongod hold `app_name`'s next `command` for `millis` before running it, as a
/// lock wait or a stall would.
pub async fn hold_next(app_name: &str, command: &str, millis: i32) {
    fail_next(
        app_name,
        1,
        command,
        mongodb::bson::doc! { "blockConnection": true, "blockTimeMS": millis },
    )
    .await;
}

/// Whether a server at `url` answers a health check.
pub async fn answers_health(url: &str) -> bool {
    let Ok(channel) = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(request)
        .await
        .is_ok()
}

/// A free local port, for listeners a test configures (metrics, a server it restarts).
/// A port nothing listens on now, for a server a test starts later. It lies below the kernel's
/// ephemeral range when there is room there, so that no outgoing connection (a MongoDB
/// driver's, of this test or another running beside it) takes it before the server binds it,
/// and this process never hands it out twice.
pub fn free_port() -> u16 {
    const LOWEST: u16 = 10_000;
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > LOWEST + 1_000);
    let Some(ephemeral_from) = ephemeral_from else {
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    };
    let mut next = NEXT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Each test process starts at a point of its own, so ports a process before it left in
    // TIME_WAIT or to a lingering child are unlikely to come round again.
    let span = ephemeral_from - LOWEST;
    let mut port = next.unwrap_or_else(|| LOWEST + (std::process::id() % u32::from(span)) as u16);
    for _ in 0..span {
        let candidate = port;
        port = if port + 1 >= ephemeral_from {
            LOWEST
        } else {
            port + 1
        };
        if std::net::TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            *next = Some(port);
            return candidate;
        }
    }
    panic!("no free port between {LOWEST} and {ephemeral_from}");
}

/// `GET /metrics` from the metrics listener on `port`: the Prometheus text.
pub async fn fetch_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    connection
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    connection.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample `name{labels}` (exactly as Prometheus prints it), if present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

pub fn payload(text: &str) -> pb::Payload {
    pb::Payload {
        data: text.as_bytes().to_vec(),
        serializer_id: 1,
        manifest: "text".into(),
    }
}

pub fn event(pid: &str, sequence_nr: i64, text: &str) -> pb::PersistentEvent {
    pb::PersistentEvent {
        persistence_id: pid.to_owned(),
        sequence_nr,
        payload: Some(payload(text)),
        writer_uuid: "writer-1".into(),
        ..Default::default()
    }
}

pub fn atomic(events: Vec<pb::PersistentEvent>) -> pb::AtomicWrite {
    pb::AtomicWrite { events }
}

/// Writes and returns one outcome per write.
pub async fn write(
    client: &mut JournalClient<Channel>,
    writes: Vec<pb::AtomicWrite>,
) -> Vec<pb::atomic_write_result::Outcome> {
    client
        .write_events(pb::WriteEventsRequest {
            writes,
            ..Default::default()
        })
        .await
        .expect("WriteEvents call failed")
        .into_inner()
        .results
        .into_iter()
        .map(|result| result.outcome.expect("result without outcome"))
        .collect()
}

pub fn is_written(outcome: &pb::atomic_write_result::Outcome) -> bool {
    matches!(outcome, pb::atomic_write_result::Outcome::Written(_))
}

/// Replays and returns the events' sequence numbers and the final highest sequence number.
pub async fn replay(
    client: &mut JournalClient<Channel>,
    pid: &str,
    from: i64,
    to: Option<i64>,
    max: Option<i64>,
) -> (Vec<pb::PersistentEvent>, i64) {
    use pb::replay_events_response::Item;
    let request = pb::ReplayEventsRequest {
        persistence_id: pid.into(),
        from_sequence_nr: from,
        to_sequence_nr: to,
        max,
    };
    let mut stream = client
        .replay_events(request)
        .await
        .expect("ReplayEvents failed")
        .into_inner();
    let mut events = Vec::new();
    let mut highest = None;
    while let Some(message) = stream.message().await.expect("replay stream failed") {
        assert!(
            highest.is_none(),
            "a message came after the highest sequence number"
        );
        match message.item.expect("empty replay message") {
            Item::Event(event) => events.push(event),
            Item::HighestSequenceNr(value) => highest = Some(value),
        }
    }
    (
        events,
        highest.expect("replay ended without the highest sequence number"),
    )
}

pub fn sequence_nrs(events: &[pb::PersistentEvent]) -> Vec<i64> {
    events.iter().map(|event| event.sequence_nr).collect()
}

pub async fn highest(client: &mut JournalClient<Channel>, pid: &str) -> i64 {
    client
        .read_highest_sequence_nr(pb::ReadHighestSequenceNrRequest {
            persistence_id: pid.into(),
            from_sequence_nr: 0,
        })
        .await
        .expect("ReadHighestSequenceNr failed")
        .into_inner()
        .highest_sequence_nr
}

/// The HTTP/2 request of a gRPC call to `method` (`package.Service/Method`), for a test that
/// speaks HTTP/2 itself to control what the server receives and when.
pub fn raw_grpc_request(address: SocketAddr, method: &str) -> http::Request<()> {
    http::Request::post(format!("http://{address}/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// `Journal/WriteEvents`, for [`stalled_request`].
pub const WRITE_EVENTS: &str = "eventjournal.v1.Journal/WriteEvents";

/// A call of `method` on a connection of its own, speaking HTTP/2 directly: `bytes` are its
/// request body so far (the whole of it when `end`). Returns the response to come, the body's
/// sender and the connection's task.
pub async fn raw_send(
    server: &TestServer,
    method: &str,
    bytes: Vec<u8>,
    end: bool,
) -> (
    h2::client::ResponseFuture,
    h2::SendStream<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let io = tokio::net::TcpStream::connect(server.address)
        .await
        .unwrap();
    let (mut h2, connection) = h2::client::handshake(io).await.unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = raw_grpc_request(server.address, method);
    let (response, mut send) = h2.send_request(request, false).unwrap();
    send.send_data(bytes.into(), end).unwrap();
    (response, send, connection)
}

/// Sends the start of a request of `method` with a message of `length` bytes on a connection
/// of its own, then nothing more: the message's prefix and `sent` bytes of it.
pub async fn stalled_request(
    server: &TestServer,
    method: &str,
    length: u32,
    sent: usize,
) -> (
    h2::client::ResponseFuture,
    h2::SendStream<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let mut start = vec![0u8];
    start.extend(length.to_be_bytes());
    start.extend(vec![0u8; sent]);
    raw_send(server, method, start, false).await
}

/// The `grpc-status` (as sent) and `grpc-message` (decoded) of a raw HTTP/2 gRPC response: in
/// its headers when it is trailers-only, else in its trailers (after its messages, which are
/// read and dropped).
pub async fn grpc_status(response: http::Response<h2::RecvStream>) -> (String, String) {
    let (parts, mut body) = response.into_parts();
    let metadata = match parts.headers.contains_key("grpc-status") {
        true => parts.headers,
        false => {
            while let Some(data) = body.data().await {
                let _ = body.flow_control().release_capacity(data.unwrap().len());
            }
            body.trailers().await.unwrap().expect("trailers")
        }
    };
    let code = metadata
        .get("grpc-status")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let message = tonic::Status::from_header_map(&metadata)
        .map(|status| status.message().to_owned())
        .unwrap_or_default();
    (code, message)
}
