//! Encoding of event payloads.

use serde::de::DeserializeOwned;

use crate::envelope::Envelope;
use crate::error::CodecError;
use crate::event::Event;

/// The content type eda writes and reads.
pub const JSON: &str = "application/json";

/// Encodes an event as JSON.
pub fn encode<E: Event>(event: &E) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(event).map_err(|source| CodecError::Encode { ty: E::INFO.ce_type.to_owned(), source })
}

/// Decodes the payload of an envelope as `E`.
pub fn decode<E: DeserializeOwned>(envelope: &Envelope) -> Result<E, CodecError> {
    let ct = envelope.datacontenttype.as_str();
    // Accept parameters such as `; charset=utf-8` and structured-suffix types (`+json`).
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if essence != JSON && !essence.ends_with("+json") {
        return Err(CodecError::UnsupportedContentType(ct.to_owned()));
    }
    serde_json::from_slice(&envelope.data).map_err(|source| CodecError::Decode { ty: envelope.ty.clone(), source })
}
