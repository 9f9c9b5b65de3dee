//! The `eventjournal.v1` gRPC contract: generated messages, clients and server traits.
//!
//! This crate is deliberately slim: no MongoDB, no validation. Requests are turned into
//! validated domain types by the `model` crate as soon as the server receives them.

pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("eventjournal.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("eventjournal_descriptor");
