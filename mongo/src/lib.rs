//! MongoDB plumbing shared by the stores: a client built from the settings, the retry policy,
//! and the classification of driver errors into what callers must tell apart.

mod client;
pub mod deployment;
mod describe;
mod document;
mod failure;
pub mod metrics;
mod retry;
pub mod watermark;

pub use client::{commit_quorum, connect, create_collections, ping};
pub use describe::{describe, describe_chain};
pub use document::{EncodeError, PayloadDocument, encode_within_limit};
pub use failure::{FailureKind, MongoError, StorageError, error_codes, is_duplicate_key};
pub use retry::Retry;
pub use watermark::{Acknowledged, HorizonUnavailable, InFlight, NotLeased, Watermarks};

/// MongoDB's largest document (BSON `maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
