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
    // Accept parameters such as `; charset=utf-8` and structured-suffix types (`+json`); media
    // types are case-insensitive (RFC 2045), so `Application/JSON` is JSON.
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence != JSON && !essence.ends_with("+json") {
        return Err(CodecError::UnsupportedContentType(ct.to_owned()));
    }
    serde_json::from_slice(&envelope.data).map_err(|source| CodecError::Decode { ty: envelope.ty.clone(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventInfo, PendingEvent};

    fn envelope(content_type: &str) -> Envelope {
        let info = EventInfo { name: "T", version: 1, ce_type: "T.v1", topic: "t", path: "tests::T" };
        let mut e = Envelope::root("test", PendingEvent { info, key: None, data: b"7".to_vec() }, None);
        e.datacontenttype = content_type.to_owned();
        e
    }

    #[test]
    fn media_types_are_compared_without_regard_to_case() {
        for json in
            ["application/json", "Application/JSON", "APPLICATION/JSON; charset=UTF-8", "application/cloudevents+JSON"]
        {
            assert_eq!(decode::<u32>(&envelope(json)).ok(), Some(7), "{json}");
        }
        assert!(matches!(decode::<u32>(&envelope("text/plain")), Err(CodecError::UnsupportedContentType(_))));
    }
}
