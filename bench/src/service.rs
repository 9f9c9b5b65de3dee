//! The client side of the service: unary `WriteEvents`, the `WriteEventsStream` pipeline, and
//! the one rule for both: every write must come back `Written`, anything else fails the
//! scenario (a benchmark that counts rejected writes as fast writes measures nothing).

use anyhow::{Context, bail};
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use proto::v1::journal_client::JournalClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// Fails unless `response` has `expected` results, all `Written`.
pub fn check_written(response: &pb::WriteEventsResponse, expected: usize) -> anyhow::Result<()> {
    if response.results.len() != expected {
        bail!("{} results for {expected} writes", response.results.len());
    }
    for (index, result) in response.results.iter().enumerate() {
        match &result.outcome {
            Some(Outcome::Written(_)) => {}
            Some(Outcome::Rejected(rejected)) => {
                bail!("write {index} was rejected: {}", rejected.reason)
            }
            Some(Outcome::Conflict(conflict)) => {
                bail!("write {index} was a conflict: {}", conflict.reason)
            }
            None => bail!("write {index} came back without an outcome"),
        }
    }
    Ok(())
}

/// Fails unless `response` has `expected` results, all `Rejected` (nothing was stored).
pub fn check_rejected(response: &pb::WriteEventsResponse, expected: usize) -> anyhow::Result<()> {
    if response.results.len() != expected {
        bail!("{} results for {expected} writes", response.results.len());
    }
    match response
        .results
        .iter()
        .position(|result| !matches!(result.outcome, Some(Outcome::Rejected(_))))
    {
        Some(index) => bail!(
            "write {index} was not rejected: {:?}",
            response.results[index]
        ),
        None => Ok(()),
    }
}

/// One unary `WriteEvents` whose writes must all come back `Written`.
pub async fn write(
    client: &mut JournalClient<Channel>,
    request: pb::WriteEventsRequest,
) -> anyhow::Result<()> {
    let expected = request.writes.len();
    let response = client
        .write_events(request)
        .await
        .context("WriteEvents failed")?;
    check_written(response.get_ref(), expected)
}

/// Writes one event through `eventjournal-client` (which may send it in one call with other
/// tasks' writes) and checks that it was written.
pub async fn write_through(
    client: &eventjournal_client::Client,
    event: eventjournal_client::Event,
) -> anyhow::Result<()> {
    let outcomes = client
        .write_events(vec![vec![event]])
        .await
        .context("write_events failed")?;
    match outcomes.as_slice() {
        [eventjournal_client::WriteOutcome::Written] => Ok(()),
        other => Err(anyhow::anyhow!("write_events answered {other:?}")),
    }
}

/// Whether the server implements `WriteEventsStream`: a stream opened and closed at once
/// writes nothing, and an unimplemented method answers before any message.
pub async fn stream_implemented(channel: &Channel) -> anyhow::Result<bool> {
    let mut client = JournalClient::new(channel.clone());
    match client
        .write_events_stream(tokio_stream::empty::<pb::WriteEventsRequest>())
        .await
    {
        Ok(_) => Ok(true),
        Err(status) if status.code() == Code::Unimplemented => Ok(false),
        Err(status) => Err(status).context("opening WriteEventsStream"),
    }
}

/// An open `WriteEventsStream`: requests go in through `sender`, one response per request
/// comes back in order.
pub struct EventStream {
    pub sender: mpsc::Sender<pb::WriteEventsRequest>,
    pub responses: Streaming<pb::WriteEventsResponse>,
}

impl EventStream {
    /// Opens the stream with `first` already queued, so a server that waits for the first
    /// request before answering the call cannot deadlock with a client waiting for the answer.
    /// `capacity` is the client-side queue; it must hold all of `first`.
    pub async fn open(
        channel: &Channel,
        capacity: usize,
        first: Vec<pb::WriteEventsRequest>,
    ) -> anyhow::Result<Self> {
        let (sender, receiver) = mpsc::channel(capacity.max(first.len()).max(1));
        for request in first {
            sender
                .try_send(request)
                .map_err(|_| anyhow::anyhow!("request queue full before the stream opened"))?;
        }
        let responses = JournalClient::new(channel.clone())
            .write_events_stream(ReceiverStream::new(receiver))
            .await
            .context("opening WriteEventsStream")?
            .into_inner();
        Ok(Self { sender, responses })
    }

    pub async fn send(&self, request: pb::WriteEventsRequest) -> anyhow::Result<()> {
        self.sender
            .send(request)
            .await
            .map_err(|_| anyhow::anyhow!("WriteEventsStream closed while sending"))
    }

    /// The next response, which must answer `expected` writes, all `Written`.
    pub async fn next_written(&mut self, expected: usize) -> anyhow::Result<()> {
        let response = self
            .responses
            .message()
            .await
            .context("WriteEventsStream failed")?
            .context("WriteEventsStream ended before answering every request")?;
        check_written(&response, expected)
    }
}
