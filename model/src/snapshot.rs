use proto::v1 as pb;

use crate::{Payload, PersistenceId, ValidationError, non_negative};

/// Identifies a snapshot and carries its optional metadata payload. Sequence number 0 is
/// allowed (Akka snapshots an actor that has persisted nothing yet at 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMetadata {
    pub persistence_id: PersistenceId,
    pub sequence_nr: i64,
    /// Milliseconds since the epoch. On save, 0 means "stamp now"; on delete, "any".
    pub timestamp_millis: i64,
    pub metadata: Option<Payload>,
}

/// A snapshot: its metadata and the serialized state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub metadata: SnapshotMetadata,
    pub payload: Payload,
}

/// Akka's `SnapshotSelectionCriteria`; all bounds inclusive. The default selects every snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSelectionCriteria {
    pub max_sequence_nr: i64,
    pub max_timestamp_millis: i64,
    pub min_sequence_nr: i64,
    pub min_timestamp_millis: i64,
}

impl Default for SnapshotSelectionCriteria {
    fn default() -> Self {
        Self {
            max_sequence_nr: i64::MAX,
            max_timestamp_millis: i64::MAX,
            min_sequence_nr: 0,
            min_timestamp_millis: 0,
        }
    }
}

/// The snapshots of one persistence id that match the criteria (`LoadSnapshot` takes the
/// youngest of them, `DeleteSnapshots` deletes them all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotQuery {
    pub persistence_id: PersistenceId,
    pub criteria: SnapshotSelectionCriteria,
}

fn metadata(
    field: &str,
    metadata: Option<pb::SnapshotMetadata>,
) -> Result<SnapshotMetadata, ValidationError> {
    let metadata = metadata.ok_or_else(|| ValidationError::new(field, "is required"))?;
    let within = |error: ValidationError| error.within(field);
    Ok(SnapshotMetadata {
        persistence_id: PersistenceId::parse("persistence_id", metadata.persistence_id)
            .map_err(within)?,
        sequence_nr: non_negative("sequence_nr", metadata.sequence_nr).map_err(within)?,
        timestamp_millis: non_negative("timestamp_millis", metadata.timestamp_millis)
            .map_err(within)?,
        metadata: metadata.metadata.map(Payload::from),
    })
}

fn criteria(
    criteria: Option<pb::SnapshotSelectionCriteria>,
) -> Result<SnapshotSelectionCriteria, ValidationError> {
    let Some(criteria) = criteria else {
        return Ok(SnapshotSelectionCriteria::default());
    };
    let within = |error: ValidationError| error.within("criteria");
    Ok(SnapshotSelectionCriteria {
        max_sequence_nr: non_negative(
            "max_sequence_nr",
            criteria.max_sequence_nr.unwrap_or(i64::MAX),
        )
        .map_err(within)?,
        max_timestamp_millis: non_negative(
            "max_timestamp_millis",
            criteria.max_timestamp_millis.unwrap_or(i64::MAX),
        )
        .map_err(within)?,
        min_sequence_nr: non_negative("min_sequence_nr", criteria.min_sequence_nr)
            .map_err(within)?,
        min_timestamp_millis: non_negative("min_timestamp_millis", criteria.min_timestamp_millis)
            .map_err(within)?,
    })
}

impl TryFrom<pb::SaveSnapshotRequest> for Snapshot {
    type Error = ValidationError;

    fn try_from(request: pb::SaveSnapshotRequest) -> Result<Self, ValidationError> {
        Ok(Self {
            metadata: metadata("metadata", request.metadata)?,
            payload: request
                .snapshot
                .ok_or_else(|| ValidationError::new("snapshot", "is required"))?
                .into(),
        })
    }
}

impl TryFrom<pb::LoadSnapshotRequest> for SnapshotQuery {
    type Error = ValidationError;

    fn try_from(request: pb::LoadSnapshotRequest) -> Result<Self, ValidationError> {
        let persistence_id = PersistenceId::parse("persistence_id", request.persistence_id)?;
        let mut criteria = criteria(request.criteria)?;
        if let Some(to) = request.to_sequence_nr {
            criteria.max_sequence_nr = criteria
                .max_sequence_nr
                .min(non_negative("to_sequence_nr", to)?);
        }
        Ok(Self {
            persistence_id,
            criteria,
        })
    }
}

impl TryFrom<pb::DeleteSnapshotsRequest> for SnapshotQuery {
    type Error = ValidationError;

    fn try_from(request: pb::DeleteSnapshotsRequest) -> Result<Self, ValidationError> {
        Ok(Self {
            persistence_id: PersistenceId::parse("persistence_id", request.persistence_id)?,
            criteria: criteria(request.criteria)?,
        })
    }
}

impl TryFrom<pb::DeleteSnapshotRequest> for SnapshotMetadata {
    type Error = ValidationError;

    fn try_from(request: pb::DeleteSnapshotRequest) -> Result<Self, ValidationError> {
        metadata("metadata", request.metadata)
    }
}

impl From<SnapshotMetadata> for pb::SnapshotMetadata {
    fn from(metadata: SnapshotMetadata) -> Self {
        Self {
            persistence_id: metadata.persistence_id.into_string(),
            sequence_nr: metadata.sequence_nr,
            timestamp_millis: metadata.timestamp_millis,
            metadata: metadata.metadata.map(pb::Payload::from),
        }
    }
}

impl From<Snapshot> for pb::SelectedSnapshot {
    fn from(snapshot: Snapshot) -> Self {
        Self {
            metadata: Some(snapshot.metadata.into()),
            snapshot: Some(snapshot.payload.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_sequence_nr_narrows_max_sequence_nr() {
        let request = pb::LoadSnapshotRequest {
            persistence_id: "p".into(),
            criteria: Some(pb::SnapshotSelectionCriteria {
                max_sequence_nr: Some(13),
                ..Default::default()
            }),
            to_sequence_nr: Some(7),
        };
        assert_eq!(
            SnapshotQuery::try_from(request)
                .unwrap()
                .criteria
                .max_sequence_nr,
            7
        );
        let request = pb::LoadSnapshotRequest {
            persistence_id: "p".into(),
            criteria: None,
            to_sequence_nr: None,
        };
        assert_eq!(
            SnapshotQuery::try_from(request).unwrap().criteria,
            SnapshotSelectionCriteria::default()
        );
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let request = pb::SaveSnapshotRequest {
            metadata: None,
            snapshot: None,
        };
        assert_eq!(
            Snapshot::try_from(request).unwrap_err().to_string(),
            "metadata: is required"
        );
        let request = pb::SaveSnapshotRequest {
            metadata: Some(pb::SnapshotMetadata {
                persistence_id: "p".into(),
                sequence_nr: -1,
                ..Default::default()
            }),
            snapshot: Some(pb::Payload::default()),
        };
        assert_eq!(
            Snapshot::try_from(request).unwrap_err().to_string(),
            "metadata.sequence_nr: must not be negative, got -1"
        );
        let request = pb::DeleteSnapshotsRequest {
            persistence_id: "p".into(),
            criteria: Some(pb::SnapshotSelectionCriteria {
                min_timestamp_millis: -5,
                ..Default::default()
            }),
        };
        assert_eq!(
            SnapshotQuery::try_from(request).unwrap_err().to_string(),
            "criteria.min_timestamp_millis: must not be negative, got -5"
        );
    }
}
