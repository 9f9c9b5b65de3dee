//! The eventjournal server: gRPC services over the stores.
//!
//! `server::run` wires settings, MongoDB and the services together; `grpc/` holds one handler
//! module per service (they only convert, validate and map errors); `status` is the one place
//! where store errors become gRPC statuses.

pub mod auth;
pub mod cli;
mod grpc;
mod health;
mod linger;
mod metrics;
pub mod ops;
mod request_memory;
mod rpc_metrics;
pub mod server;
pub mod signal;
mod status;

pub use server::run;
