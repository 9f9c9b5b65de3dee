//! BSON forms shared by the stores' documents.

use model::Payload;
use mongodb::bson::{Binary, RawDocumentBuf, spec::BinarySubtype, to_raw_document_buf};
use serde::{Deserialize, Serialize};

use crate::MAX_DOCUMENT_BYTES;

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

/// Why a document cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// Above MongoDB's 16 MiB; `size` is exact, or a lower bound when `at_least`.
    TooLarge {
        size: usize,
        at_least: bool,
    },
    Invalid(String),
}

impl EncodeError {
    /// A message naming `what` and the limit, for the client.
    pub fn describe(&self, what: &str) -> String {
        match self {
            Self::TooLarge { size, at_least } => format!(
                "{what} is {}{size} bytes as a MongoDB document, above the limit of \
                 {MAX_DOCUMENT_BYTES} bytes (16 MiB)",
                if *at_least { "at least " } else { "" }
            ),
            Self::Invalid(reason) => format!("{what} cannot be stored: {reason}"),
        }
    }
}

/// Encodes `document`, refusing one larger than MongoDB accepts. `binary_bytes` is the size of
/// its binary fields: the serializer refuses an oversized binary with a vaguer error, so that
/// case is caught first.
pub fn encode_within_limit<T: Serialize>(
    document: &T,
    binary_bytes: usize,
) -> Result<RawDocumentBuf, EncodeError> {
    if binary_bytes > MAX_DOCUMENT_BYTES {
        return Err(EncodeError::TooLarge {
            size: binary_bytes,
            at_least: true,
        });
    }
    let encoded =
        to_raw_document_buf(document).map_err(|error| EncodeError::Invalid(error.to_string()))?;
    let size = encoded.as_bytes().len();
    if size > MAX_DOCUMENT_BYTES {
        return Err(EncodeError::TooLarge {
            size,
            at_least: false,
        });
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(bytes: usize) -> PayloadDocument {
        PayloadDocument::from(&Payload {
            data: vec![0; bytes],
            serializer_id: 1,
            manifest: String::new(),
        })
    }

    #[test]
    fn refuses_documents_above_the_limit_naming_it() {
        assert!(encode_within_limit(&payload(1024), 1024).is_ok());
        let over = MAX_DOCUMENT_BYTES - 10;
        let error = encode_within_limit(&payload(over), over).unwrap_err();
        assert!(
            matches!(
                error,
                EncodeError::TooLarge {
                    at_least: false,
                    ..
                }
            ),
            "{error:?}"
        );
        let error = encode_within_limit(&payload(17 << 20), 17 << 20).unwrap_err();
        assert_eq!(
            error.describe("event 3"),
            "event 3 is at least 17825792 bytes as a MongoDB document, above the limit of 16777216 bytes (16 MiB)"
        );
    }
}
