use proto::v1 as pb;

use crate::{PersistenceId, ValidationError, non_negative};

/// What `ReplayEvents` asks for: events `from..=to` of one persistence id, at most `max`.
/// Absent bounds are `i64::MAX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRange {
    pub persistence_id: PersistenceId,
    pub from_sequence_nr: i64,
    pub to_sequence_nr: i64,
    pub max: i64,
}

impl TryFrom<pb::ReplayEventsRequest> for ReplayRange {
    type Error = ValidationError;

    fn try_from(request: pb::ReplayEventsRequest) -> Result<Self, ValidationError> {
        Ok(Self {
            persistence_id: PersistenceId::parse("persistence_id", request.persistence_id)?,
            from_sequence_nr: non_negative("from_sequence_nr", request.from_sequence_nr)?,
            to_sequence_nr: non_negative(
                "to_sequence_nr",
                request.to_sequence_nr.unwrap_or(i64::MAX),
            )?,
            max: non_negative("max", request.max.unwrap_or(i64::MAX))?,
        })
    }
}
