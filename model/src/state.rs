use proto::v1 as pb;

use crate::{Payload, PersistenceId, Tag, ValidationError};

/// Revision of a durable-state object: 0 for a missing object, then 1, 2, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(i64);

impl Revision {
    pub const ZERO: Revision = Revision(0);

    pub fn parse(field: &str, value: i64) -> Result<Self, ValidationError> {
        if value < 0 {
            Err(ValidationError::new(
                field,
                format!("must not be negative, got {value}"),
            ))
        } else {
            Ok(Self(value))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The revision this one must follow (`None` for 0).
    pub fn previous(self) -> Option<Revision> {
        (self.0 > 0).then(|| Revision(self.0 - 1))
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `UpsertObject`: store `value` as `revision`, which must be the stored revision + 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertObject {
    pub persistence_id: PersistenceId,
    /// 1 or more.
    pub revision: Revision,
    pub value: Payload,
    /// `None` when the request's tag was empty.
    pub tag: Option<Tag>,
}

/// `DeleteObject`: revision 0 removes the object; otherwise it must be the stored revision + 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteObject {
    pub persistence_id: PersistenceId,
    pub revision: Revision,
}

/// What `GetObject` finds: no value for a missing or deleted object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub value: Option<Payload>,
    pub revision: Revision,
}

impl TryFrom<pb::UpsertObjectRequest> for UpsertObject {
    type Error = ValidationError;

    fn try_from(request: pb::UpsertObjectRequest) -> Result<Self, ValidationError> {
        let persistence_id = PersistenceId::parse("persistence_id", request.persistence_id)?;
        if request.revision < 1 {
            return Err(ValidationError::new(
                "revision",
                format!(
                    "must be 1 or more (the stored revision + 1), got {}",
                    request.revision
                ),
            ));
        }
        let tag = match request.tag.is_empty() {
            true => None,
            false => Some(Tag::parse("tag", request.tag)?),
        };
        Ok(Self {
            persistence_id,
            revision: Revision(request.revision),
            value: request
                .value
                .ok_or_else(|| ValidationError::new("value", "is required"))?
                .into(),
            tag,
        })
    }
}

impl TryFrom<pb::DeleteObjectRequest> for DeleteObject {
    type Error = ValidationError;

    fn try_from(request: pb::DeleteObjectRequest) -> Result<Self, ValidationError> {
        Ok(Self {
            persistence_id: PersistenceId::parse("persistence_id", request.persistence_id)?,
            revision: Revision::parse("revision", request.revision)?,
        })
    }
}

impl From<StoredObject> for pb::GetObjectResponse {
    fn from(object: StoredObject) -> Self {
        Self {
            value: object.value.map(pb::Payload::from),
            revision: object.revision.get(),
        }
    }
}
