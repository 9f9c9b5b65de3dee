//! Durable-state store over MongoDB: revisioned get, upsert and delete with optimistic concurrency.
