//! A typed client for the [eventjournal](https://github.com/) service: the journal, the
//! snapshot store, the durable-state store and the read journal, over gRPC.
//!
//! * Domain types ([`Event`], [`Snapshot`], [`StoredObject`], ...), never the generated
//!   messages.
//! * TLS (rustls, with the CA that signed the server's certificate), bearer tokens, a timeout
//!   per call.
//! * Retries of calls that failed with `UNAVAILABLE` (the service unreachable, or MongoDB), a
//!   broken connection or no answer within the call timeout, with exponential backoff: safe
//!   for writes too, because every write of the contract is idempotent (a retried write that
//!   was in fact applied gets the same answer).
//! * Replays and queries are [`futures::Stream`]s with backpressure: the service sends no
//!   faster than the stream is read.
//! * Concurrent [`Client::write_events`] calls share `WriteEvents` calls (see
//!   [`WriteCoalescing`]): many actors on one client cost the service a call per batch of
//!   writes, not per write.
//!
//! # The journal
//!
//! ```no_run
//! use eventjournal_client::{Client, Event, Payload, Replayed, WriteOutcome};
//! use futures::TryStreamExt as _;
//!
//! # async fn example() -> eventjournal_client::Result<()> {
//! let client = Client::builder("http://127.0.0.1:50051").connect().await?;
//! let event = Event::new("cart-1", 1, Payload::new(b"item added".to_vec(), 1, "ItemAdded"))
//!     .tagged(["cart"]);
//! let outcomes = client.write_events(vec![vec![event]]).await?;
//! assert_eq!(outcomes, vec![WriteOutcome::Written]);
//! let mut replay = client.replay("cart-1", 1, None, None).await?;
//! while let Some(item) = replay.try_next().await? {
//!     match item {
//!         Replayed::Event(event) => println!("{}: {}", event.sequence_nr, event.payload.manifest),
//!         Replayed::HighestSequenceNr(highest) => println!("highest {highest}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Snapshots
//!
//! ```no_run
//! use eventjournal_client::{Client, Payload, SnapshotCriteria, SnapshotMetadata};
//!
//! # async fn example(client: Client) -> eventjournal_client::Result<()> {
//! let metadata = SnapshotMetadata { persistence_id: "cart-1".into(), sequence_nr: 10, ..Default::default() };
//! client.save_snapshot(metadata, Payload::new(b"state".to_vec(), 1, "Cart")).await?;
//! let latest = client.load_snapshot("cart-1", SnapshotCriteria::all()).await?;
//! assert_eq!(latest.map(|snapshot| snapshot.metadata.sequence_nr), Some(10));
//! # Ok(())
//! # }
//! ```
//!
//! # Durable state
//!
//! ```no_run
//! use eventjournal_client::{Client, Error, Payload};
//!
//! # async fn example(client: Client) -> eventjournal_client::Result<()> {
//! let stored = client.get_object("counter-1").await?;
//! let next = stored.revision + 1;
//! match client.upsert_object("counter-1", next, Payload::new(b"42".to_vec(), 1, "Count"), "").await {
//!     Ok(()) => {}
//!     Err(Error::Conflict(why)) => println!("someone else wrote revision {next}: {why}"),
//!     Err(other) => return Err(other),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # The read journal
//!
//! ```no_run
//! use eventjournal_client::{Client, Offset};
//! use futures::TryStreamExt as _;
//!
//! # async fn example(client: Client) -> eventjournal_client::Result<()> {
//! // Live: never ends; resume from the last offset handled after a restart.
//! let mut events = client.events_by_tag("cart", Offset::start()).await?;
//! while let Some(envelope) = events.try_next().await? {
//!     println!("{} {} at {}", envelope.event.persistence_id, envelope.event.sequence_nr, envelope.offset);
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod actor;
mod coalesce;
pub mod durable;
mod error;
pub mod persistent;
pub mod projection;
pub mod spool;
mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use proto::v1 as pb;
use proto::v1::durable_state_store_client::DurableStateStoreClient;
use proto::v1::journal_client::JournalClient;
use proto::v1::read_journal_client::ReadJournalClient;
use proto::v1::snapshot_store_client::SnapshotStoreClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use coalesce::WriteCoalescing;
pub use error::{Error, Result};
pub use types::*;

/// How calls that failed with `UNAVAILABLE`, a broken connection or no answer within the call
/// timeout are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1: no retries.
    pub max_attempts: u32,
    /// The pause before the first retry; it doubles with each.
    pub first_backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Where the service is and how to talk to it; [`Client::builder`] starts one.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    tls_domain: Option<String>,
    connect_timeout: Duration,
    call_timeout: Duration,
    keep_alive: (Duration, Duration),
    retry: RetryPolicy,
    write_coalescing: WriteCoalescing,
    max_message_size: usize,
}

/// The largest message a client receives by default: the server's default
/// `server.max-message-size`, above MongoDB's 16 MiB document limit, so an event or snapshot
/// as large as MongoDB stores can be read back.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 32 << 20;

impl ClientBuilder {
    /// Sends `authorization: Bearer <token>` with every call.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// TLS with the server's certificate checked against this CA (PEM); the URL is then
    /// `https://...`.
    pub fn tls_ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// The name the server's certificate must carry, when not the URL's host.
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls_domain = Some(domain.into());
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a unary call (and opening a stream) may take, per attempt (default 30 s). An
    /// attempt without an answer by then is sent again, as after a broken connection (see
    /// [`ClientBuilder::retry`]); when the last one runs out too, the call fails with
    /// [`Error::DeadlineExceeded`]. Streams themselves have no deadline: a live query runs
    /// until dropped.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// HTTP/2 pings on each connection every `interval`, idle connections too; a connection
    /// whose ping goes unanswered for `timeout` is closed: its calls and streams fail with
    /// `UNAVAILABLE` (a live stream ends with it) and the next call connects again. Default:
    /// every 30 s, 10 s to answer; an `interval` of zero: no pings. Without them a connection
    /// whose peer vanished (the service's host gone, a NAT or load balancer that dropped it
    /// silently) stays open until TCP gives up, a quarter of an hour or so, and a live stream
    /// on it waits that long for events that never come.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = (interval, timeout);
        self
    }

    /// How calls failing with `UNAVAILABLE`, a broken connection or no answer within the call
    /// timeout are retried (default: 5 attempts, 100 ms to 2 s).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How the writes of concurrent [`Client::write_events`] calls share `WriteEvents` calls
    /// (default: up to 2 calls open, each on a connection of its own; further writes wait and
    /// go together in the next, up to 1,000 writes and 512 KiB per call;
    /// [`WriteCoalescing::off`]: a call per `write_events`).
    pub fn write_coalescing(mut self, coalescing: WriteCoalescing) -> Self {
        self.write_coalescing = coalescing;
        self
    }

    /// The largest message the client receives (default [`DEFAULT_MAX_MESSAGE_SIZE`], 32 MiB).
    /// Keep it at the server's `server.max-message-size`: a replayed event, a snapshot or a
    /// state larger than it cannot be read.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// A client that connects lazily, at its first call (and reconnects by itself).
    pub fn connect_lazy(self) -> Result<Client> {
        let channel = self.endpoint()?.connect_lazy();
        self.client(channel)
    }

    /// Connects now; fails with [`Error::Unavailable`] when the service cannot be reached.
    pub async fn connect(self) -> Result<Client> {
        let channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(|error| Error::Unavailable {
                attempts: 1,
                message: format!("cannot connect to {}: {error}", self.url),
            })?;
        self.client(channel)
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|error| Error::Configuration(format!("url {:?}: {error}", self.url)))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let (interval, timeout) = self.keep_alive;
        if !interval.is_zero() {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        if let Some(pem) = &self.ca_pem {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| Error::Configuration(format!("TLS: {error}")))?;
        }
        Ok(endpoint)
    }

    fn client(self, channel: Channel) -> Result<Client> {
        // The write lanes after the first (which is `channel`): connections of their own.
        let lanes = match self.write_coalescing.max_calls_in_flight {
            0 | 1 => Vec::new(),
            lanes => {
                let endpoint = self.endpoint()?;
                (1..lanes).map(|_| endpoint.connect_lazy()).collect()
            }
        };
        let authorization = match &self.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<AsciiMetadataValue>()
                    .map_err(|_| {
                        Error::Configuration("the bearer token is not printable ASCII".into())
                    })?,
            ),
            None => None,
        };
        let authorize = Authorize(authorization);
        let intercepted = InterceptedService::new(channel, authorize.clone());
        let limit = self.max_message_size;
        let journal = |service| {
            JournalClient::new(service)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit)
        };
        let write_lanes = std::iter::once(journal(intercepted.clone()))
            .chain(
                lanes
                    .into_iter()
                    .map(|lane| journal(InterceptedService::new(lane, authorize.clone()))),
            )
            .collect();
        Ok(Client {
            write_lanes,
            journal: journal(intercepted.clone()),
            snapshots: SnapshotStoreClient::new(intercepted.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            state: DurableStateStoreClient::new(intercepted.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            queries: ReadJournalClient::new(intercepted)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            call_timeout: self.call_timeout,
            retry: self.retry,
            coalescer: coalesce::Coalescer::new(self.write_coalescing),
            producer_group: producer_group(),
            max_message_size: limit,
        })
    }
}

/// A random name for one client's connections (see `Client::producer_group`).
fn producer_group() -> AsciiMetadataValue {
    use std::hash::{BuildHasher as _, Hasher as _};
    // Each `RandomState` has keys of its own, random per process.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    AsciiMetadataValue::try_from(format!("{random:x}")).expect("hex digits are ASCII")
}

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Authorize(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Transport = InterceptedService<Channel, Authorize>;

/// A connection to the service (one HTTP/2 connection, multiplexed). Cheap to clone: clones
/// share it.
#[derive(Clone)]
pub struct Client {
    journal: JournalClient<Transport>,
    /// The connections coalesced writes go on (see [`WriteCoalescing`]); the first is
    /// `journal`'s.
    write_lanes: Arc<[JournalClient<Transport>]>,
    snapshots: SnapshotStoreClient<Transport>,
    state: DurableStateStoreClient<Transport>,
    queries: ReadJournalClient<Transport>,
    call_timeout: Duration,
    retry: RetryPolicy,
    /// Shared by clones, so their concurrent writes share calls too.
    coalescer: Arc<coalesce::Coalescer>,
    /// Sent with every `WriteEvents` call as `eventjournal-producer-group`: the server then
    /// knows the write lanes for one client and does not pace one lane for another's writes.
    producer_group: AsciiMetadataValue,
    /// [`ClientBuilder::max_message_size`].
    max_message_size: usize,
}

/// A stream of results from the service.
pub type ResultStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T>> + Send>>;

impl Client {
    /// Starts configuring a client of the service at `url` (`http://host:port`, or
    /// `https://...` with TLS).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            token: None,
            ca_pem: None,
            tls_domain: None,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            keep_alive: (Duration::from_secs(30), Duration::from_secs(10)),
            retry: RetryPolicy::default(),
            write_coalescing: WriteCoalescing::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Sends `call` until it succeeds, fails with something other than `UNAVAILABLE` (or a
    /// broken connection, or the call timeout running out), or the attempts run out.
    async fn retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        self.retrying_up_to(what, self.retry.max_attempts, call)
            .await
    }

    /// [`Client::retrying`] with at most `max_attempts` attempts.
    async fn retrying_up_to<T, F, Fut>(
        &self,
        what: &str,
        max_attempts: u32,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 1;
        loop {
            match call(self.call_timeout).await {
                Ok(value) => return Ok(value),
                Err(status) if Error::unreachable(&status) && attempt < max_attempts => {
                    tracing::debug!(what, attempt, message = status.message(), "retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                Err(status) if Error::timed_out(&status) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "{what}: no answer within the call timeout ({:?}) to the last of \
                         {attempt} attempt(s); it may have been applied, and sending it again \
                         is safe",
                        self.call_timeout
                    )));
                }
                Err(status) => return Err(Error::from_status(status, attempt)),
            }
        }
    }

    fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        request
    }

    /// A server stream as domain items.
    fn items<M, T>(stream: tonic::Streaming<M>) -> ResultStream<T>
    where
        M: Send + 'static,
        T: From<M> + Send + 'static,
    {
        stream
            .map_ok(T::from)
            .map_err(|status| Error::from_status(status, 1))
            .boxed()
    }

    // ----- journal -----

    /// Writes atomic writes (each a list of events of one persistence id, stored all or none)
    /// and returns one outcome per write, in order.
    ///
    /// Concurrent calls of one client (and its clones) share `WriteEvents` calls, as
    /// [`ClientBuilder::write_coalescing`] says; each gets the outcomes of its own writes.
    pub async fn write_events(&self, writes: Vec<Vec<Event>>) -> Result<Vec<WriteOutcome>> {
        let writes = writes
            .into_iter()
            .map(|events| pb::AtomicWrite {
                events: events.into_iter().map(Into::into).collect(),
            })
            .collect();
        let results = self.coalescer.write(self, writes).await?;
        Ok(results.into_iter().map(Into::into).collect())
    }

    /// One `WriteEvents` call of `writes` on `lane` (the client's connection for `None`), with
    /// at most `max_attempts` attempts.
    async fn write_call(
        &self,
        lane: Option<coalesce::Lane>,
        writes: &[pb::AtomicWrite],
        max_attempts: u32,
    ) -> Result<Vec<pb::AtomicWriteResult>> {
        // Refused here with a clear error: past the limit, tonic fails the call with an HTTP/2
        // error that says nothing of why.
        let size: usize = writes
            .iter()
            .map(|write| {
                let length = prost::Message::encoded_len(write);
                1 + prost::encoding::encoded_len_varint(length as u64) + length
            })
            .sum();
        if size > self.max_message_size {
            return Err(Error::InvalidArgument(format!(
                "the request's {} write(s) encode to {size} bytes, over the largest message of \
                 {} bytes (ClientBuilder::max_message_size; the server's is \
                 server.max-message-size)",
                writes.len(),
                self.max_message_size
            )));
        }
        let journal = lane.map_or(&self.journal, |lane| &self.write_lanes[lane]);
        let response = self
            .retrying_up_to("WriteEvents", max_attempts, |timeout| {
                let mut journal = journal.clone();
                let request = pb::WriteEventsRequest {
                    writes: writes.to_vec(),
                    responses_received: None,
                };
                let mut request = Self::request(request, timeout);
                request
                    .metadata_mut()
                    .insert(proto::PRODUCER_GROUP_METADATA, self.producer_group.clone());
                async move { journal.write_events(request).await }
            })
            .await?;
        Ok(response.into_inner().results)
    }

    /// Marks the events of `persistence_id` up to `to_sequence_nr` deleted (`i64::MAX`: all).
    pub async fn delete_events_to(&self, persistence_id: &str, to_sequence_nr: i64) -> Result<()> {
        let message = pb::DeleteEventsToRequest {
            persistence_id: persistence_id.to_owned(),
            to_sequence_nr,
        };
        self.retrying("DeleteEventsTo", |timeout| {
            let mut journal = self.journal.clone();
            let request = Self::request(message.clone(), timeout);
            async move { journal.delete_events_to(request).await }
        })
        .await
        .map(drop)
    }

    /// The highest sequence number of `persistence_id` (0 when it has none), deleted events
    /// included.
    pub async fn highest_sequence_nr(&self, persistence_id: &str) -> Result<i64> {
        let message = pb::ReadHighestSequenceNrRequest {
            persistence_id: persistence_id.to_owned(),
            from_sequence_nr: 0,
        };
        let response = self
            .retrying("ReadHighestSequenceNr", |timeout| {
                let mut journal = self.journal.clone();
                let request = Self::request(message.clone(), timeout);
                async move { journal.read_highest_sequence_nr(request).await }
            })
            .await?;
        Ok(response.into_inner().highest_sequence_nr)
    }

    /// The events of `persistence_id` from `from_sequence_nr` (up to `to_sequence_nr`, at most
    /// `max`), then its highest sequence number.
    pub async fn replay(
        &self,
        persistence_id: &str,
        from_sequence_nr: i64,
        to_sequence_nr: Option<i64>,
        max: Option<i64>,
    ) -> Result<ResultStream<Replayed>> {
        let message = pb::ReplayEventsRequest {
            persistence_id: persistence_id.to_owned(),
            from_sequence_nr,
            to_sequence_nr,
            max,
        };
        let response = self
            .retrying("ReplayEvents", |timeout| {
                let mut journal = self.journal.clone();
                let request = Self::request(message.clone(), timeout);
                async move { journal.replay_events(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .map_err(|status| Error::from_status(status, 1))
            .try_filter_map(|item| async move {
                use pb::replay_events_response::Item;
                Ok(match item.item {
                    Some(Item::Event(event)) => Some(Replayed::Event(event.into())),
                    Some(Item::HighestSequenceNr(highest)) => {
                        Some(Replayed::HighestSequenceNr(highest))
                    }
                    None => None,
                })
            })
            .boxed())
    }

    // ----- snapshots -----

    /// Saves a snapshot; returns its metadata as stored (the timestamp stamped if it was 0).
    pub async fn save_snapshot(
        &self,
        metadata: SnapshotMetadata,
        snapshot: Payload,
    ) -> Result<SnapshotMetadata> {
        let message = pb::SaveSnapshotRequest {
            metadata: Some(metadata.into()),
            snapshot: Some(snapshot.into()),
        };
        let response = self
            .retrying("SaveSnapshot", |timeout| {
                let mut snapshots = self.snapshots.clone();
                let request = Self::request(message.clone(), timeout);
                async move { snapshots.save_snapshot(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .metadata
            .map(Into::into)
            .unwrap_or_default())
    }

    /// The newest snapshot of `persistence_id` that `criteria` selects.
    pub async fn load_snapshot(
        &self,
        persistence_id: &str,
        criteria: SnapshotCriteria,
    ) -> Result<Option<Snapshot>> {
        let message = pb::LoadSnapshotRequest {
            persistence_id: persistence_id.to_owned(),
            criteria: Some(criteria.into()),
            to_sequence_nr: None,
        };
        let response = self
            .retrying("LoadSnapshot", |timeout| {
                let mut snapshots = self.snapshots.clone();
                let request = Self::request(message.clone(), timeout);
                async move { snapshots.load_snapshot(request).await }
            })
            .await?;
        Ok(response.into_inner().snapshot.map(|selected| Snapshot {
            metadata: selected.metadata.map(Into::into).unwrap_or_default(),
            snapshot: selected.snapshot.map(Into::into).unwrap_or_default(),
        }))
    }

    /// Deletes the snapshot `metadata` names (a timestamp of 0 matches any).
    pub async fn delete_snapshot(&self, metadata: SnapshotMetadata) -> Result<()> {
        let message = pb::DeleteSnapshotRequest {
            metadata: Some(metadata.into()),
        };
        self.retrying("DeleteSnapshot", |timeout| {
            let mut snapshots = self.snapshots.clone();
            let request = Self::request(message.clone(), timeout);
            async move { snapshots.delete_snapshot(request).await }
        })
        .await
        .map(drop)
    }

    /// Deletes the snapshots of `persistence_id` that `criteria` selects.
    pub async fn delete_snapshots(
        &self,
        persistence_id: &str,
        criteria: SnapshotCriteria,
    ) -> Result<()> {
        let message = pb::DeleteSnapshotsRequest {
            persistence_id: persistence_id.to_owned(),
            criteria: Some(criteria.into()),
        };
        self.retrying("DeleteSnapshots", |timeout| {
            let mut snapshots = self.snapshots.clone();
            let request = Self::request(message.clone(), timeout);
            async move { snapshots.delete_snapshots(request).await }
        })
        .await
        .map(drop)
    }

    // ----- durable state -----

    /// An object's value and revision (revision 0, no value: it never existed).
    pub async fn get_object(&self, persistence_id: &str) -> Result<StoredObject> {
        let message = pb::GetObjectRequest {
            persistence_id: persistence_id.to_owned(),
        };
        let response = self
            .retrying("GetObject", |timeout| {
                let mut state = self.state.clone();
                let request = Self::request(message.clone(), timeout);
                async move { state.get_object(request).await }
            })
            .await?
            .into_inner();
        Ok(StoredObject {
            value: response.value.map(Into::into),
            revision: response.revision,
        })
    }

    /// Stores `value` as revision `revision` (exactly the stored revision + 1; 1 creates);
    /// [`Error::Conflict`] when another writer got there first.
    pub async fn upsert_object(
        &self,
        persistence_id: &str,
        revision: i64,
        value: Payload,
        tag: &str,
    ) -> Result<()> {
        let message = pb::UpsertObjectRequest {
            persistence_id: persistence_id.to_owned(),
            revision,
            value: Some(value.into()),
            tag: tag.to_owned(),
        };
        self.retrying("UpsertObject", |timeout| {
            let mut state = self.state.clone();
            let request = Self::request(message.clone(), timeout);
            async move { state.upsert_object(request).await }
        })
        .await
        .map(drop)
    }

    /// Deletes an object: `revision` the stored revision + 1, or 0 to remove it completely.
    pub async fn delete_object(&self, persistence_id: &str, revision: i64) -> Result<()> {
        let message = pb::DeleteObjectRequest {
            persistence_id: persistence_id.to_owned(),
            revision,
        };
        self.retrying("DeleteObject", |timeout| {
            let mut state = self.state.clone();
            let request = Self::request(message.clone(), timeout);
            async move { state.delete_object(request).await }
        })
        .await
        .map(drop)
    }

    // ----- read journal -----

    /// Events with `tag` after `offset`, live: the stream never ends.
    pub async fn events_by_tag(
        &self,
        tag: &str,
        offset: Offset,
    ) -> Result<ResultStream<EventEnvelope>> {
        self.by_tag(tag, offset, true).await
    }

    /// Events with `tag` after `offset` that are stored now; the stream then ends.
    pub async fn current_events_by_tag(
        &self,
        tag: &str,
        offset: Offset,
    ) -> Result<ResultStream<EventEnvelope>> {
        self.by_tag(tag, offset, false).await
    }

    async fn by_tag(
        &self,
        tag: &str,
        offset: Offset,
        live: bool,
    ) -> Result<ResultStream<EventEnvelope>> {
        let message = pb::EventsByTagRequest {
            tag: tag.to_owned(),
            offset: offset.0,
        };
        let response = self
            .retrying("EventsByTag", |timeout| {
                let mut queries = self.queries.clone();
                let request = Self::request(message.clone(), timeout);
                async move {
                    if live {
                        queries.events_by_tag(request).await
                    } else {
                        queries.current_events_by_tag(request).await
                    }
                }
            })
            .await?;
        Ok(Self::items(response.into_inner()))
    }

    /// Events of persistence ids in slices `min_slice..=max_slice` after `offset`; live when
    /// `live`, otherwise ending with what is stored now.
    pub async fn events_by_slices(
        &self,
        min_slice: i32,
        max_slice: i32,
        offset: Offset,
        live: bool,
    ) -> Result<ResultStream<EventEnvelope>> {
        let message = pb::EventsBySlicesRequest {
            min_slice,
            max_slice,
            offset: offset.0,
        };
        let response = self
            .retrying("EventsBySlices", |timeout| {
                let mut queries = self.queries.clone();
                let request = Self::request(message.clone(), timeout);
                async move {
                    if live {
                        queries.events_by_slices(request).await
                    } else {
                        queries.current_events_by_slices(request).await
                    }
                }
            })
            .await?;
        Ok(Self::items(response.into_inner()))
    }

    /// The events of one persistence id from `from_sequence_nr` (to `to_sequence_nr`); live
    /// when `live`.
    pub async fn events_by_persistence_id(
        &self,
        persistence_id: &str,
        from_sequence_nr: i64,
        to_sequence_nr: Option<i64>,
        live: bool,
    ) -> Result<ResultStream<EventEnvelope>> {
        let message = pb::EventsByPersistenceIdRequest {
            persistence_id: persistence_id.to_owned(),
            from_sequence_nr,
            to_sequence_nr,
        };
        let response = self
            .retrying("EventsByPersistenceId", |timeout| {
                let mut queries = self.queries.clone();
                let request = Self::request(message.clone(), timeout);
                async move {
                    if live {
                        queries.events_by_persistence_id(request).await
                    } else {
                        queries.current_events_by_persistence_id(request).await
                    }
                }
            })
            .await?;
        Ok(Self::items(response.into_inner()))
    }

    /// The persistence ids stored now, after `after_id` (at most `limit`), in id order.
    pub async fn current_persistence_ids(
        &self,
        after_id: &str,
        limit: Option<i64>,
    ) -> Result<ResultStream<String>> {
        let message = pb::CurrentPersistenceIdsRequest {
            after_id: after_id.to_owned(),
            limit,
        };
        let response = self
            .retrying("CurrentPersistenceIds", |timeout| {
                let mut queries = self.queries.clone();
                let request = Self::request(message.clone(), timeout);
                async move { queries.current_persistence_ids(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .map_ok(|entry| entry.persistence_id)
            .map_err(|status| Error::from_status(status, 1))
            .boxed())
    }

    /// Changes of durable-state objects with `tag` after `offset`; live when `live`.
    pub async fn durable_state_changes(
        &self,
        tag: &str,
        offset: Offset,
        live: bool,
    ) -> Result<ResultStream<StateChange>> {
        let message = pb::DurableStateChangesRequest {
            tag: tag.to_owned(),
            offset: offset.0,
        };
        let response = self
            .retrying("DurableStateChanges", |timeout| {
                let mut queries = self.queries.clone();
                let request = Self::request(message.clone(), timeout);
                async move {
                    if live {
                        queries.durable_state_changes(request).await
                    } else {
                        queries.current_durable_state_changes(request).await
                    }
                }
            })
            .await?;
        Ok(Self::items(response.into_inner()))
    }
}
