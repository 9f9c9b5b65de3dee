//! BSON forms shared by the stores' documents.

use model::Payload;
use mongodb::bson::{Binary, spec::BinarySubtype};
use serde::{Deserialize, Serialize};

/// A payload as stored: `{ data: BinData, serializerId: int32, manifest: string }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayloadDocument {
    pub data: Binary,
    #[serde(rename = "serializerId")]
    pub serializer_id: i32,
    pub manifest: String,
}

impl From<&Payload> for PayloadDocument {
    fn from(payload: &Payload) -> Self {
        Self {
            data: Binary {
                subtype: BinarySubtype::Generic,
                bytes: payload.data.clone(),
            },
            serializer_id: payload.serializer_id,
            manifest: payload.manifest.clone(),
        }
    }
}

impl From<PayloadDocument> for Payload {
    fn from(document: PayloadDocument) -> Self {
        Self {
            data: document.data.bytes,
            serializer_id: document.serializer_id,
            manifest: document.manifest,
        }
    }
}
