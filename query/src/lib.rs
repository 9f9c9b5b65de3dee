//! Read journal over MongoDB: live and current queries by tag, persistence id and slice, persistence ids, and durable-state changes.
