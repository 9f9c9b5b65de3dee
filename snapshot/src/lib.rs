//! Snapshot store over MongoDB: save, load by selection criteria, delete one or by criteria.
