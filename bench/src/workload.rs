//! What is written, built once for both sides: the same 200-byte payload, tag and writer uuid,
//! as a gRPC request for the service and as the service's own document encoding for the raw
//! driver. Keeping both builders here is what makes "the same inserts" true by construction.

use std::fmt;

use anyhow::Context;
use journal::document::EventDocument;
use model::{Payload, PersistenceId, PersistentEvent, SequenceNr, Tag};
use mongodb::bson::{DateTime, RawDocumentBuf};
use proto::v1 as pb;

/// Bytes of every event payload.
pub const PAYLOAD_BYTES: usize = 200;
const SERIALIZER_ID: i32 = 1;
const MANIFEST: &str = "BenchEvent";
const TAG: &str = "bench";

/// Which side of the comparison a measurement belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Service,
    Raw,
}

impl Side {
    /// Both sides, the service first or the raw driver first.
    pub fn in_order(service_first: bool) -> [Side; 2] {
        if service_first {
            [Side::Service, Side::Raw]
        } else {
            [Side::Raw, Side::Service]
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Side::Service => "service",
            Side::Raw => "raw",
        })
    }
}

pub struct Workload {
    run_id: String,
    payload: Vec<u8>,
    writer_uuid: String,
}

impl Workload {
    pub fn new(run_id: &str) -> Self {
        // Not all one byte value, so nothing along the way can shortcut it.
        let payload = (0..PAYLOAD_BYTES)
            .map(|index| (index % 251) as u8)
            .collect();
        Self {
            run_id: run_id.to_owned(),
            payload,
            writer_uuid: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// A persistence id no other scenario, round or side uses, so every write starts at
    /// sequence number 1 of a fresh id (the service rejects gaps).
    pub fn pid(&self, scenario: &str, round: u32, side: Side, index: usize) -> String {
        format!("{scenario}-{}-r{round}-{side}-{index}", self.run_id)
    }

    /// One event as the client sends it; timestamp 0 lets the service stamp it.
    pub fn event(&self, pid: &str, sequence_nr: i64) -> pb::PersistentEvent {
        self.tagged_event(pid, sequence_nr, TAG)
    }

    /// [`Workload::event`] as `eventjournal-client` takes it.
    pub fn client_event(&self, pid: &str, sequence_nr: i64) -> eventjournal_client::Event {
        self.event(pid, sequence_nr).into()
    }

    /// [`Workload::event`] with its own tag instead of the write scenarios' one.
    pub fn tagged_event(&self, pid: &str, sequence_nr: i64, tag: &str) -> pb::PersistentEvent {
        pb::PersistentEvent {
            persistence_id: pid.to_owned(),
            sequence_nr,
            payload: Some(pb::Payload {
                data: self.payload.clone(),
                serializer_id: SERIALIZER_ID,
                manifest: MANIFEST.to_owned(),
            }),
            writer_uuid: self.writer_uuid.clone(),
            timestamp_millis: 0,
            tags: vec![tag.to_owned()],
            metadata: None,
        }
    }

    /// A request of single-event `AtomicWrite`s, one per `(pid, sequence_nr)`, in order.
    pub fn request<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> pb::WriteEventsRequest {
        pb::WriteEventsRequest {
            writes: writes
                .into_iter()
                .map(|(pid, sequence_nr)| pb::AtomicWrite {
                    events: vec![self.event(pid, sequence_nr)],
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The document the service stores for the same event, encoded the way it encodes it
    /// (`journal/src/journal.rs` `encode`), stamped now as the service stamps on receipt.
    pub fn document(&self, pid: &str, sequence_nr: i64) -> anyhow::Result<RawDocumentBuf> {
        let now = DateTime::now();
        let event = PersistentEvent {
            persistence_id: PersistenceId::parse("pid", pid.to_owned())?,
            sequence_nr: SequenceNr::parse("sequence_nr", sequence_nr)?,
            payload: Payload {
                data: self.payload.clone(),
                serializer_id: SERIALIZER_ID,
                manifest: MANIFEST.to_owned(),
            },
            writer_uuid: self.writer_uuid.clone(),
            timestamp_millis: now.timestamp_millis(),
            tags: vec![Tag::parse("tags", TAG.to_owned())?],
            metadata: None,
        };
        mongo::encode_within_limit(&EventDocument::new(&event, now), self.payload.len())
            .map_err(|error| anyhow::anyhow!(error.describe("bench event")))
            .with_context(|| format!("encoding event {sequence_nr} of {pid}"))
    }
}
