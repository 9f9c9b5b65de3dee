//! Indexes of the journal collection.

use mongodb::IndexModel;
use mongodb::bson::doc;
use mongodb::options::IndexOptions;

use crate::document::{PERSISTENCE_ID, SEQUENCE_NR, SLICE, TAGS, WRITTEN_AT};

/// The indexes the journal and the read journal need.
pub fn journal_indexes() -> Vec<IndexModel> {
    let named = |name: &str| IndexOptions::builder().name(name.to_owned());
    vec![
        // Uniqueness decides races between writers; also serves replay and highest-seqNr.
        IndexModel::builder()
            .keys(doc! { PERSISTENCE_ID: 1, SEQUENCE_NR: 1 })
            .options(named("pid_seqNr").unique(true).build())
            .build(),
        // Events by tag, in read-journal order.
        IndexModel::builder()
            .keys(doc! { TAGS: 1, WRITTEN_AT: 1, PERSISTENCE_ID: 1, SEQUENCE_NR: 1 })
            .options(named("tags_writtenAt").build())
            .build(),
        // Read-journal order over all events: wide slice ranges and new persistence ids.
        IndexModel::builder()
            .keys(doc! { WRITTEN_AT: 1, PERSISTENCE_ID: 1, SEQUENCE_NR: 1 })
            .options(named("writtenAt_pid_seqNr").build())
            .build(),
        // Events by slice, in read-journal order.
        IndexModel::builder()
            .keys(doc! { SLICE: 1, WRITTEN_AT: 1, PERSISTENCE_ID: 1, SEQUENCE_NR: 1 })
            .options(named("slice_writtenAt").build())
            .build(),
    ]
}
