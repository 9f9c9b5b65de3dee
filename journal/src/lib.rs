//! The write journal over MongoDB, with Akka Persistence's `AsyncWriteJournal` semantics.
//!
//! One document per event (schema in [`document`]); an atomic write of several events is one
//! multi-document transaction, a single event one insert. The unique index on
//! `(pid, seqNr)` decides races between writers. Deletes are logical (`deletedAt`), and the
//! highest sequence number of a persistence id is kept in a metadata collection before its
//! events are marked, so it survives purging of deleted events.

pub mod document;
mod error;
mod indexes;
mod journal;
mod metrics;
mod writer;

pub use error::JournalError;
pub use indexes::journal_indexes as index_models;
pub use journal::{Journal, RefusedWrite, Replay, WriteOutcome, cosmos_ttl_seconds};
pub use writer::{LIGHT_ACTIVITY, Origin, StreamPosition};
