//! The `eventjournal.v1` gRPC contract: generated messages, clients and server traits.
//!
//! This crate is deliberately slim: no MongoDB, no validation. Requests are turned into
//! validated domain types by the `model` crate as soon as the server receives them.

pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("eventjournal.v1");
}

/// The metadata key a client with several connections sends on each `WriteEvents` call, the
/// same random 64-bit value (1 to 16 hex digits) on all of them, so the server's group commit
/// knows them for one client and does not pace one of them for another's small writes.
pub const PRODUCER_GROUP_METADATA: &str = "eventjournal-producer-group";

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("eventjournal_descriptor");
