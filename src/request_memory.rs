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
//! connection for good. A `WriteEventsStream` that stops reading ahead (below) holds its own
//! HTTP/2 window in the same way, which can hold up the other calls on its connection, but
//! only until its answers come from MongoDB: it waits on nothing else.
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
//!   ends its stream quietly (OK) on a refused message, as on any error of its input.
//!
//! What the budget does not count: what HTTP/2 buffers before a call reads it (at most the
//! connection's window, 1 MiB, per connection); the copies a message is made into while it is
//! handled (the decoded request, its BSON documents, the driver's command: together two to four
//! times its size); the responses; and writes that reached MongoDB before their call was
//! cancelled (the call's bytes are free again at once). A client that sends a message's prefix
//! and then stalls holds that message's bytes until the rest arrives, the call is cancelled, or
//! its connection fails the keep-alive pings (`server.keep-alive-interval`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use bytesize::ByteSize;
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::metrics::server as metrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one method whose handler releases its messages itself, one per response.
const RELEASED_BY_HANDLER: &str = "/eventjournal.v1.Journal/WriteEventsStream";

/// Bytes of a gRPC message's prefix: the compression flag, then the length (big-endian u32).
const PREFIX: usize = 5;

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
    type Response = S::Response;
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
        let body = tonic::body::Body::new(Metered::new(body, self.budget.clone(), held.clone()));
        let response = self.inner.call(http::Request::from_parts(parts, body));
        if released_by_handler {
            return Box::pin(response);
        }
        let answered = Answered(held);
        Box::pin(async move {
            let response = response.await;
            drop(answered);
            response
        })
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
        }
    }

    /// Nothing more is read from the client.
    fn finish(&mut self) {
        self.body = None;
        self.receiving = None;
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
        self.framing = Framing::START;
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
        let frame = match ready!(Pin::new(body).poll_frame(context)) {
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
        })
    }

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

    /// A client's body: these chunks, then its end; says when it is dropped.
    struct Chunks(VecDeque<Bytes>, Arc<std::sync::atomic::AtomicBool>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    impl Drop for Chunks {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn the_body_passes_the_messages_before_a_refusal_then_fails_and_lets_the_client_go() {
        let budget = budget(50);
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = message(30);
        let chunk = Bytes::from([first.clone(), message(30), message(1)].concat());
        let client = Chunks(VecDeque::from([chunk]), dropped.clone());
        let mut body = Metered::new(client, budget.clone(), HeldMessages::default());
        let mut context = Context::from_waker(std::task::Waker::noop());
        let mut poll = |body: &mut Metered<Chunks>| match Pin::new(body).poll_frame(&mut context) {
            Poll::Ready(Some(Ok(frame))) => Ok(Some(frame.into_data().unwrap())),
            Poll::Ready(Some(Err(status))) => Err(status),
            Poll::Ready(None) => Ok(None),
            Poll::Pending => panic!("the test body is always ready"),
        };
        assert_eq!(
            poll(&mut body).unwrap().unwrap(),
            first,
            "the first message, whole"
        );
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
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
}
