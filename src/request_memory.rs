//! The server-wide budget for request messages (`server.max-request-memory`), as a tower layer
//! in front of every gRPC service.
//!
//! `server.max-message-size` bounds one message, and a `WriteEventsStream` holds at most
//! `write-journal.stream-max-unacknowledged` requests; neither bounds what many calls hold
//! together. Here every request body is read through a [`Metered`] body that follows the gRPC
//! framing (a 5-byte prefix: a compression flag and the message's length, then the message). As
//! soon as a message's prefix has arrived, before tonic allocates its buffer, the message's
//! length is reserved from the budget. When the budget cannot cover it, the call fails at once
//! with `UNAVAILABLE`, naming the setting: nothing of that message is read or written, so the
//! client can retry it safely (the Rust client does, with backoff). The client's body is dropped
//! then, so HTTP/2 discards what it still sends.
//!
//! Why fail instead of waiting for room: a request left unread keeps its data in the
//! connection's shared HTTP/2 window, and the calls holding the budget on that connection may
//! need that window to receive the rest of their own messages. Waiting could stall the
//! connection for good. A `WriteEventsStream` that stops reading ahead (below) holds its
//! stream's HTTP/2 window (`server.http2-stream-window`, 1 MiB by default) in the same way, but
//! only until its answers come from MongoDB: it waits on nothing else. The connection's window
//! (`server.http2-connection-window`) is four times that by default, so one such stream does
//! not hold up the other calls on its connection; several together can.
//!
//! How long a message holds its bytes:
//! - a unary call's, and a server-streaming call's request: until the handler has answered, or
//!   the call is cancelled;
//! - a `WriteEventsStream` request's: until its response is ready. The handler releases one
//!   message per response with [`HeldMessages::release_oldest`]; it finds them in the request's
//!   extensions. It reads ahead only while its requests hold less than
//!   [`stream_share`] of the budget, so one stream cannot take it all. A refusal ends the
//!   stream after the requests read before it are answered;
//! - any other stream of requests (reflection): only while it is being received. Reflection
//!   ends its stream quietly on any error of its input; so that a refused message's call does
//!   not end with OK, the layer puts the refusal in the place of the OK in its trailers
//!   ([`Reported`]). For the same reason the layer checks reflection's messages as tonic's
//!   decoder does (their compression flag, their length against tonic's limit, whether they
//!   decode), and reports a failing one's status the same way ([`ReflectionInput`]).
//!
//! What the budget does not count: what HTTP/2 buffers before a call reads it (at most the
//! connection's window, `server.http2-connection-window`, 4 MiB by default, per connection);
//! the copies a message is made into while it is handled (the decoded request, its BSON
//! documents, the driver's command: together two to four times its size); the responses; and
//! writes that reached MongoDB before their call was cancelled (the call's bytes are free again
//! at once).
//!
//! A message that has begun to arrive must keep arriving: when none of its bytes come for
//! `server.message-idle-timeout` while the call waits for them, the call fails with
//! `UNAVAILABLE` naming the setting and the message's bytes are free again. Otherwise a client
//! that sent a large message's prefix and stalled would hold that share of the budget for as
//! long as its connection lived, and others' requests would be refused meanwhile. Only time
//! spent waiting on the client counts: a slow sender that keeps sending is not cut, and a
//! `WriteEventsStream` that has stopped reading ahead is not waiting on its client (a timeout
//! that ran out while the call was not reading starts again when it reads). A client that
//! stalls between messages holds nothing; a stream may stay open and idle. There is no minimum
//! rate: a client that trickles a message on purpose, a few bytes inside every timeout, still
//! holds its share. A message can also wait through no fault of its client, when other calls on
//! its connection have together filled the connection's HTTP/2 window and stopped reading
//! (streams waiting for MongoDB); the setting's default, above MongoDB's longest wait with the
//! default settings, keeps that from cutting it. A reflection call whose message stalls ends with
//! that status too ([`Reported`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::Status;

use crate::metrics::server as metrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one method whose handler releases its messages itself, one per response.
const RELEASED_BY_HANDLER: &str = "/eventjournal.v1.Journal/WriteEventsStream";

/// Methods whose handler ends its response with OK when its request body fails (tonic's
/// reflection service): their call's status is the body's failure instead ([`Reported`]).
const QUIET_ON_BODY_ERRORS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Bytes of a gRPC message's prefix: the compression flag, then the length (big-endian u32).
const PREFIX: usize = 5;

/// A call that looks at its body this long after the message's idle timeout ran out had
/// stopped reading meanwhile (a call waiting for its body is woken when the timeout runs out).
const READ_AGAIN_LATE: Duration = Duration::from_secs(1);

/// tonic's limit for a message received, for the services the server does not give
/// `server.max-message-size` (health, reflection, the read journal, backups).
const TONIC_DEFAULT_MAX_MESSAGE_SIZE: u64 = 4 << 20;

/// The budget, shared by every call of the server.
struct Budget {
    permits: Arc<Semaphore>,
    limit: u64,
    /// The largest message any service takes: a longer one is refused by tonic's decoder, with
    /// its own status, on its prefix and before it allocates anything; it reserves nothing.
    max_message_size: u64,
    /// `server.message-idle-timeout`.
    idle_timeout: Duration,
}

impl Budget {
    fn reserve(&self, bytes: u32) -> Result<Reservation, Status> {
        match self.permits.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => {
                metrics::REQUEST_MEMORY.add(i64::from(bytes));
                Ok(Reservation(permit))
            }
            Err(_) => {
                metrics::REQUEST_MEMORY_REFUSALS.inc();
                let held = self
                    .limit
                    .saturating_sub(self.permits.available_permits() as u64);
                tracing::debug!(bytes, held, "request refused: server.max-request-memory");
                Err(Status::unavailable(format!(
                    "the server holds {} of request messages and server.max-request-memory is \
                     {}: no room for this message of {}. Nothing of it was read or written; \
                     retrying is safe",
                    ByteSize::b(held),
                    ByteSize::b(self.limit),
                    ByteSize::b(u64::from(bytes)),
                )))
            }
        }
    }

    /// The status of a call whose message of `length` bytes stopped arriving with `remaining`
    /// of them still to come.
    fn stalled(&self, length: u64, remaining: u64) -> Status {
        metrics::REQUEST_MESSAGE_STALLS.inc();
        tracing::debug!(
            length,
            remaining,
            "request message stalled: server.message-idle-timeout"
        );
        Status::unavailable(format!(
            "the request's message of {} stopped arriving with {} of it still to come: no more \
             of it came for {} (server.message-idle-timeout). Nothing of it was read or written; \
             retrying is safe",
            ByteSize::b(length),
            ByteSize::b(remaining),
            humantime::format_duration(self.idle_timeout),
        ))
    }
}

/// A message's share of the budget (a permit per byte), given back when dropped.
struct Reservation(OwnedSemaphorePermit);

impl Reservation {
    fn bytes(&self) -> u64 {
        self.0.num_permits() as u64
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        metrics::REQUEST_MEMORY.sub(self.bytes() as i64);
    }
}

/// How much of the budget one `WriteEventsStream` may hold before it stops reading ahead: a
/// quarter. It may go over by the request that crosses it and one whose length has arrived
/// with it (and small ones that came whole in the same HTTP/2 frame), and it always reads when
/// nothing of it is unanswered.
pub(crate) fn stream_share(settings: &config::ServerSettings) -> u64 {
    settings.max_request_memory.as_u64() / 4
}

/// The messages of one call that have been received and still hold their bytes, oldest first.
#[derive(Clone, Default)]
pub(crate) struct HeldMessages(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    messages: VecDeque<Reservation>,
    /// The call has been answered: messages received from now on do not stay held.
    answered: bool,
    /// The status of the call's body when it failed for want of room or of data, or (for
    /// reflection) its first message that tonic's decoder refuses.
    failure: Option<(tonic::Code, String)>,
}

impl HeldMessages {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding it cannot leave the queue inconsistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives back the bytes of the oldest message still held: a `WriteEventsStream` calls it
    /// once per response.
    pub(crate) fn release_oldest(&self) {
        let released = self.lock().messages.pop_front();
        drop(released);
    }

    /// The bytes of the messages held (a stream holds a few: it reads a bounded number ahead).
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().messages.iter().map(Reservation::bytes).sum()
    }

    fn keep(&self, message: Reservation) {
        let mut held = self.lock();
        if !held.answered {
            held.messages.push_back(message);
        }
    }

    /// The call's body failed with `status` (a refusal, a stall, or a message reflection's
    /// decoder refuses). The first failure is the call's.
    fn fail(&self, status: &Status) {
        self.lock()
            .failure
            .get_or_insert_with(|| (status.code(), status.message().to_owned()));
    }

    fn failure(&self) -> Option<Status> {
        let held = self.lock();
        let (code, message) = held.failure.as_ref()?;
        Some(Status::new(*code, message.clone()))
    }

    fn answer(&self) {
        let released = {
            let mut held = self.lock();
            held.answered = true;
            std::mem::take(&mut held.messages)
        };
        drop(released);
    }
}

/// Releases a call's messages when its handler has answered (or the call is dropped).
struct Answered(HeldMessages);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.answer();
    }
}

/// The tower layer.
#[derive(Clone)]
pub struct RequestMemoryLayer {
    budget: Arc<Budget>,
}

impl RequestMemoryLayer {
    pub fn new(settings: &config::ServerSettings) -> Self {
        let limit = settings
            .max_request_memory
            .as_u64()
            .min(Semaphore::MAX_PERMITS as u64);
        Self {
            budget: Arc::new(Budget {
                permits: Arc::new(Semaphore::new(limit as usize)),
                limit,
                max_message_size: settings
                    .max_message_size
                    .as_u64()
                    .max(TONIC_DEFAULT_MAX_MESSAGE_SIZE),
                idle_timeout: settings.message_idle_timeout,
            }),
        }
    }
}

impl<S> tower::Layer<S> for RequestMemoryLayer {
    type Service = RequestMemory<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMemory {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestMemory<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestMemory<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    R: Send + 'static,
{
    type Response = http::Response<Reported<R>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let held = HeldMessages::default();
        let released_by_handler = request.uri().path() == RELEASED_BY_HANDLER;
        let (mut parts, body) = request.into_parts();
        if released_by_handler {
            parts.extensions.insert(held.clone());
        }
        let quiet = QUIET_ON_BODY_ERRORS.contains(&parts.uri.path());
        let mut metered = Metered::new(body, self.budget.clone(), held.clone());
        if quiet {
            metered.checked = Some(ReflectionInput::default());
        }
        let body = tonic::body::Body::new(metered);
        let response = self.inner.call(http::Request::from_parts(parts, body));
        let failure = quiet.then(|| held.clone());
        let answered = (!released_by_handler).then(|| Answered(held));
        Box::pin(async move {
            let response = response.await;
            drop(answered);
            Ok(response?.map(|body| Reported { body, failure }))
        })
    }
}

/// A response body; for a call whose handler ends with OK when its request body fails
/// ([`QUIET_ON_BODY_ERRORS`]), OK in its trailers becomes the body's refusal or stall.
#[derive(Default)]
pub struct Reported<B> {
    body: B,
    failure: Option<HeldMessages>,
}

impl<B: Body + Unpin> Body for Reported<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(context));
        let Some(failure) = &self.failure else {
            return Poll::Ready(frame);
        };
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame);
        };
        let ok = frame.trailers_ref().is_some_and(|trailers| {
            trailers
                .get("grpc-status")
                .is_some_and(|status| status == "0")
        });
        let reported = match ok.then(|| failure.failure()).flatten() {
            Some(status) => {
                let mut trailers = http::HeaderMap::new();
                status.add_header(&mut trailers).ok().map(|()| trailers)
            }
            None => None,
        };
        Poll::Ready(Some(Ok(reported.map_or(frame, Frame::trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Where the reading of a request body is in the gRPC framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `filled` bytes of a message's prefix have arrived.
    Prefix { prefix: [u8; PREFIX], filled: usize },
    /// `remaining` bytes of the current message are still to come.
    Message { remaining: u64 },
    /// A message over every service's limit: tonic ends the call on its prefix; the rest
    /// passes.
    Unchecked,
}

impl Framing {
    const START: Framing = Framing::Prefix {
        prefix: [0; PREFIX],
        filled: 0,
    };
}

/// A request body that reserves each message's bytes from the budget as its prefix arrives.
pub(crate) struct Metered<B> {
    /// The client's body; dropped once it has ended, failed or been refused, so that HTTP/2
    /// stops keeping what the client still sends (and the connection's window is free for the
    /// other calls on it) while the call finishes.
    body: Option<B>,
    budget: Arc<Budget>,
    held: HeldMessages,
    framing: Framing,
    /// The reservation of the message being received.
    receiving: Option<Reservation>,
    /// A refusal to report once the data before it has been passed on.
    refused: Option<Status>,
    /// While a message is being received and the call waits for more of it: when it fails for
    /// want of more (`server.message-idle-timeout`). Made when first needed, then reset.
    stall: Option<Pin<Box<Sleep>>>,
    /// `stall` runs: the client's body was found with nothing to give, and has given nothing
    /// since.
    stall_armed: bool,
    /// For a call whose handler ends with OK when its input fails (reflection): the checks of
    /// its messages.
    checked: Option<ReflectionInput>,
}

impl<B> Metered<B> {
    fn new(body: B, budget: Arc<Budget>, held: HeldMessages) -> Self {
        Self {
            body: Some(body),
            budget,
            held,
            framing: Framing::START,
            receiving: None,
            refused: None,
            stall: None,
            stall_armed: false,
            checked: None,
        }
    }

    /// Nothing more is read from the client.
    fn finish(&mut self) {
        self.body = None;
        self.receiving = None;
        self.stall = None;
        self.stall_armed = false;
    }

    /// The client's body has nothing to give: whether the message being received (if any) has
    /// now waited `server.message-idle-timeout` for more of its bytes.
    fn poll_stalled(&mut self, context: &mut Context<'_>) -> Option<Status> {
        let (Some(message), Framing::Message { remaining }) = (&self.receiving, self.framing)
        else {
            return None;
        };
        let length = message.bytes();
        let idle_timeout = self.budget.idle_timeout;
        let now = tokio::time::Instant::now();
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle_timeout)));
        if !self.stall_armed {
            stall.as_mut().reset(now + idle_timeout);
            self.stall_armed = true;
        }
        if stall.as_mut().poll(context).is_pending() {
            return None;
        }
        if now.saturating_duration_since(stall.deadline()) > READ_AGAIN_LATE {
            // It ran out while the call was not reading (a stream waiting for its answers, or
            // for its client to take them): that time was not spent waiting on the client, so
            // the client has the whole timeout again from now.
            stall.as_mut().reset(now + idle_timeout);
            let _ = stall.as_mut().poll(context);
            return None;
        }
        let status = self.budget.stalled(length, remaining);
        self.held.fail(&status);
        self.finish();
        Some(status)
    }

    /// Follows the framing through `data`, reserving each message whose prefix completes. On a
    /// refusal: how many bytes of `data` come before the refused message's prefix.
    fn meter(&mut self, data: &[u8]) -> Result<(), (usize, Status)> {
        let mut at = 0;
        while at < data.len() {
            match &mut self.framing {
                Framing::Unchecked => return Ok(()),
                Framing::Message { remaining } => {
                    let taken = (*remaining).min((data.len() - at) as u64);
                    *remaining -= taken;
                    if let Some(checked) = &mut self.checked {
                        checked
                            .message
                            .extend_from_slice(&data[at..at + taken as usize]);
                    }
                    at += taken as usize;
                    if *remaining == 0 {
                        self.received();
                    }
                }
                Framing::Prefix { prefix, filled } => {
                    let taken = (PREFIX - *filled).min(data.len() - at);
                    prefix[*filled..*filled + taken].copy_from_slice(&data[at..at + taken]);
                    *filled += taken;
                    at += taken;
                    if *filled < PREFIX {
                        continue;
                    }
                    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                    let refused = self
                        .checked
                        .as_ref()
                        .and_then(|checked| checked.refused(prefix[0], length));
                    if let Some(status) = refused {
                        // tonic's decoder refuses it as well, and reflection ends quietly.
                        self.held.fail(&status);
                        self.framing = Framing::Unchecked;
                        continue;
                    }
                    if u64::from(length) > self.budget.max_message_size {
                        self.framing = Framing::Unchecked;
                        continue;
                    }
                    let reservation = self
                        .budget
                        .reserve(length)
                        .map_err(|status| (at.saturating_sub(PREFIX), status))?;
                    self.receiving = Some(reservation);
                    self.framing = Framing::Message {
                        remaining: u64::from(length),
                    };
                    if length == 0 {
                        self.received();
                    }
                }
            }
        }
        Ok(())
    }

    /// The current message has arrived whole: it stays held as long as its call says.
    fn received(&mut self) {
        if let Some(message) = self.receiving.take() {
            self.held.keep(message);
        }
        if let Some(Err(status)) = self.checked.as_mut().map(ReflectionInput::decode) {
            self.held.fail(&status);
        }
        self.framing = Framing::START;
    }
}

/// The checks tonic's decoder makes of a request message, for reflection's, whose handler ends
/// its stream with OK when they fail: each failing message is recorded as the call's failure,
/// with the status tonic gives other calls for it, and reported in the place of that OK
/// ([`Reported`]). The message itself still goes on to tonic, which refuses it as before.
#[derive(Default)]
struct ReflectionInput {
    /// The bytes of the message being received: at most tonic's limit for it, 4 MiB, a copy
    /// beside tonic's, which the budget does not count (as it does not count the copies a
    /// message is made into while it is handled).
    message: Vec<u8>,
}

impl ReflectionInput {
    /// A message's prefix that tonic refuses: a compression flag (reflection takes no
    /// compressed messages), or a length over its limit.
    fn refused(&self, compression: u8, length: u32) -> Option<Status> {
        if compression != 0 {
            return Some(Status::internal(format!(
                "protocol error: the reflection request's message has compression flag \
                 {compression}; reflection takes uncompressed messages only (flag 0)"
            )));
        }
        (u64::from(length) > TONIC_DEFAULT_MAX_MESSAGE_SIZE).then(|| {
            Status::out_of_range(format!(
                "the reflection request's message of {} is over reflection's limit of {}",
                ByteSize::b(u64::from(length)),
                ByteSize::b(TONIC_DEFAULT_MAX_MESSAGE_SIZE),
            ))
        })
    }

    /// Whether the message received whole decodes as a reflection request (v1 and v1alpha
    /// have the same fields); ready for the next either way.
    fn decode(&mut self) -> Result<(), Status> {
        use prost::Message;
        let decoded =
            tonic_reflection::pb::v1::ServerReflectionRequest::decode(self.message.as_slice());
        // Its buffer goes too: an idle reflection stream keeps nothing.
        std::mem::take(&mut self.message);
        decoded.map(drop).map_err(|error| {
            Status::internal(format!(
                "the reflection request's message does not decode as a \
                 ServerReflectionRequest: {error}"
            ))
        })
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(status) = this.refused.take() {
            return Poll::Ready(Some(Err(status)));
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(context);
        if polled.is_pending() {
            return match this.poll_stalled(context) {
                Some(status) => Poll::Ready(Some(Err(status))),
                None => Poll::Pending,
            };
        }
        this.stall_armed = false;
        let frame = match ready!(polled) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                this.finish();
                return Poll::Ready(Some(Err(Status::from_error(error.into()))));
            }
            None => {
                this.finish();
                return Poll::Ready(None);
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        let Err((before, status)) = this.meter(&data) else {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        };
        this.held.fail(&status);
        this.finish();
        if before == 0 {
            return Poll::Ready(Some(Err(status)));
        }
        // The messages before the refused one still reach the call (a stream answers them).
        this.refused = Some(status);
        data.truncate(before);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.refused.is_none() && self.body.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => http_body::SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            permits: Arc::new(Semaphore::new(limit as usize)),
            limit,
            max_message_size: 1_000,
            idle_timeout: IDLE_TIMEOUT,
        })
    }

    const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

    fn message(length: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(length as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(7, length));
        framed
    }

    fn available(budget: &Budget) -> usize {
        budget.permits.available_permits()
    }

    /// A body on `budget`, and its call's held messages.
    fn metered(budget: &Arc<Budget>) -> (Metered<()>, HeldMessages) {
        let held = HeldMessages::default();
        (Metered::new((), budget.clone(), held.clone()), held)
    }

    #[test]
    fn a_message_reserves_its_length_as_its_prefix_arrives_in_any_cut() {
        let framed = [message(10), message(0), message(20)].concat();
        // Every way of cutting the bytes into two chunks meters the same.
        for cut in 0..=framed.len() {
            let budget = budget(100);
            let (mut body, held) = metered(&budget);
            body.meter(&framed[..cut]).unwrap();
            body.meter(&framed[cut..]).unwrap();
            assert_eq!(available(&budget), 70, "cut at {cut}");
            assert_eq!(held.lock().messages.len(), 3, "cut at {cut}");
            assert_eq!(held.bytes(), 30, "cut at {cut}");
            assert_eq!(body.framing, Framing::START);
            held.release_oldest();
            assert_eq!((available(&budget), held.bytes()), (80, 20));
            held.answer();
            assert_eq!(available(&budget), 100);
        }
    }

    #[test]
    fn a_message_being_received_holds_its_bytes_until_it_ends_or_the_body_goes() {
        let budget = budget(100);
        let (mut body, held) = metered(&budget);
        let framed = message(40);
        body.meter(&framed[..PREFIX + 1]).unwrap();
        assert_eq!(available(&budget), 60, "reserved on the prefix");
        assert!(held.lock().messages.is_empty(), "not whole yet");
        drop(body);
        assert_eq!(available(&budget), 100);
    }

    #[test]
    fn a_message_the_budget_cannot_cover_is_refused_after_the_ones_before_it() {
        let budget = budget(50);
        let (mut body, _held) = metered(&budget);
        let first = message(30);
        let framed = [first.clone(), message(30)].concat();
        let (before, status) = body.meter(&framed).unwrap_err();
        assert_eq!(before, first.len(), "the first message passes whole");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("server.max-request-memory"),
            "{}",
            status.message()
        );
        assert_eq!(available(&budget), 20, "the first stays held");
        // A refused prefix cut over two chunks: nothing of the second chunk passes.
        let (mut body, _) = metered(&budget);
        let second = message(30);
        body.meter(&second[..3]).unwrap();
        let (before, _) = body.meter(&second[3..]).unwrap_err();
        assert_eq!(before, 0);
    }

    #[test]
    fn a_message_over_the_size_limit_reserves_nothing_and_is_left_to_tonic() {
        let budget = budget(100);
        let (mut body, _) = metered(&budget);
        body.meter(&message(5_000)).unwrap();
        assert_eq!(available(&budget), 100);
        assert_eq!(body.framing, Framing::Unchecked);
    }

    /// A client's body fed by the test, chunk by chunk; it ends when the sender goes.
    struct Feed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for Feed {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            context: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            self.0
                .poll_recv(context)
                .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    /// A body on `budget` fed through the returned sender.
    fn fed(budget: &Arc<Budget>) -> (Metered<Feed>, tokio::sync::mpsc::UnboundedSender<Bytes>) {
        let (feed, client) = tokio::sync::mpsc::unbounded_channel();
        let body = Metered::new(Feed(client), budget.clone(), HeldMessages::default());
        (body, feed)
    }

    async fn next(body: &mut Metered<Feed>) -> Result<Option<Bytes>, Status> {
        std::future::poll_fn(|context| Pin::new(&mut *body).poll_frame(context))
            .await
            .transpose()
            .map(|frame| frame.map(|frame| frame.into_data().unwrap()))
    }

    /// Polls `body` once, as a handler that then stops reading for a while would.
    fn poll_once(body: &mut Metered<Feed>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut context = Context::from_waker(std::task::Waker::noop());
        Pin::new(body).poll_frame(&mut context)
    }

    #[test]
    fn the_body_passes_the_messages_before_a_refusal_then_fails_and_lets_the_client_go() {
        let budget = budget(50);
        let (mut body, feed) = fed(&budget);
        let first = message(30);
        feed.send([first.clone(), message(30), message(1)].concat().into())
            .unwrap();
        let poll = |body: &mut Metered<Feed>| match poll_once(body) {
            Poll::Ready(Some(Ok(frame))) => Ok(Some(frame.into_data().unwrap())),
            Poll::Ready(Some(Err(status))) => Err(status),
            Poll::Ready(None) => Ok(None),
            Poll::Pending => panic!("the client's body has given everything it had"),
        };
        assert_eq!(
            poll(&mut body).unwrap().unwrap(),
            first,
            "the first message, whole"
        );
        assert!(feed.is_closed(), "the client's body is let go");
        assert!(!body.is_end_stream(), "the refusal is still to come");
        assert_eq!(
            poll(&mut body).unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert_eq!(poll(&mut body).unwrap(), None);
        assert_eq!(available(&budget), 20, "the first message stays held");
    }

    #[test]
    fn messages_received_after_the_answer_are_not_held() {
        let budget = budget(100);
        let (mut body, held) = metered(&budget);
        held.answer();
        body.meter(&message(10)).unwrap();
        assert_eq!(available(&budget), 100);
    }

    /// A body on `budget` whose client has sent the first 100 bytes of a message of 600 (the
    /// whole message is returned, prefix included).
    fn begun(
        budget: &Arc<Budget>,
    ) -> (
        Metered<Feed>,
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        Vec<u8>,
    ) {
        let (body, feed) = fed(budget);
        let framed = message(600);
        feed.send(Bytes::copy_from_slice(&framed[..100])).unwrap();
        (body, feed, framed)
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_stops_arriving_fails_its_call_and_frees_its_bytes() {
        let budget = budget(1_000);
        let (mut body, feed, _) = begun(&budget);
        assert_eq!(next(&mut body).await.unwrap().unwrap().len(), 100);
        assert_eq!(available(&budget), 400, "reserved on the prefix");
        let start = tokio::time::Instant::now();
        let status = tokio::time::timeout(IDLE_TIMEOUT * 4, next(&mut body))
            .await
            .expect("the call fails within four times the timeout")
            .unwrap_err();
        assert_eq!(start.elapsed(), IDLE_TIMEOUT);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("server.message-idle-timeout")
                && status.message().contains("505 B of it still to come"),
            "{}",
            status.message()
        );
        assert_eq!(available(&budget), 1_000, "its bytes are free again");
        assert!(feed.is_closed(), "the client's body is let go");
        assert!(body.is_end_stream());
        assert_eq!(next(&mut body).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_message_that_keeps_arriving_is_not_cut() {
        let budget = budget(1_000);
        let (mut body, feed) = fed(&budget);
        let framed = message(600);
        // A chunk every two thirds of the timeout: seven of them, the whole takes more than four
        // times as long, and the body waits for each.
        let chunks: Vec<Bytes> = framed.chunks(100).map(Bytes::copy_from_slice).collect();
        let sent = chunks.len() as u32;
        tokio::spawn(async move {
            for chunk in chunks {
                tokio::time::sleep(IDLE_TIMEOUT * 2 / 3).await;
                feed.send(chunk).unwrap();
            }
        });
        let start = tokio::time::Instant::now();
        let mut received = 0;
        while let Some(chunk) = next(&mut body).await.unwrap() {
            received += chunk.len();
        }
        assert_eq!(received, framed.len());
        assert_eq!(start.elapsed(), IDLE_TIMEOUT * 2 / 3 * sent);
        assert_eq!(available(&budget), 400, "received whole and held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_idle_between_messages_is_not_cut() {
        let budget = budget(1_000);
        let (mut body, feed) = fed(&budget);
        feed.send(message(10).into()).unwrap();
        assert!(next(&mut body).await.unwrap().is_some());
        // No message is being received: waiting for the next one has no end.
        let waiting = tokio::time::timeout(IDLE_TIMEOUT * 10, next(&mut body)).await;
        assert!(waiting.is_err(), "still waiting: {waiting:?}");
        feed.send(message(10).into()).unwrap();
        assert!(next(&mut body).await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_call_does_not_read_is_not_held_against_the_client() {
        let budget = budget(2_000);
        // The call looks for more once and finds nothing, then stops reading (a stream that
        // waits for its answers) for twice the timeout.
        let paused = |body: &mut Metered<Feed>| {
            assert!(poll_once(body).is_ready());
            assert!(poll_once(body).is_pending());
            tokio::time::sleep(IDLE_TIMEOUT * 2)
        };
        // The client sends the rest meanwhile: the call reads it when it reads again.
        let (mut body, feed, framed) = begun(&budget);
        paused(&mut body).await;
        feed.send(Bytes::copy_from_slice(&framed[100..])).unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap().len(), 505);
        // The client sends nothing meanwhile: it has the whole timeout from when the call reads
        // again.
        let (mut body, _feed, _) = begun(&budget);
        paused(&mut body).await;
        let resumed = tokio::time::Instant::now();
        let status = tokio::time::timeout(IDLE_TIMEOUT * 4, next(&mut body))
            .await
            .expect("the call fails within four times the timeout")
            .unwrap_err();
        assert_eq!(resumed.elapsed(), IDLE_TIMEOUT);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(available(&budget), 1_400, "the first message stays held");
    }
}
