//! gRPC answers: the layer's refusals as gRPC statuses, and which statuses are stored.
//!
//! A gRPC call is an HTTP/2 POST whose outcome travels in trailers (`grpc-status`,
//! `grpc-message`), or in the headers of a trailers-only response. The layer stores the
//! trailers with the response and replays them, and answers its own refusals trailers-only.

use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, HeaderValue, Response, header};

use crate::ResponseBody;
use crate::body::full;

/// `grpc-status` codes the layer uses.
pub(crate) mod code {
    pub(crate) const INVALID_ARGUMENT: u16 = 3;
    pub(crate) const ALREADY_EXISTS: u16 = 6;
    pub(crate) const RESOURCE_EXHAUSTED: u16 = 8;
    pub(crate) const FAILED_PRECONDITION: u16 = 9;
    pub(crate) const ABORTED: u16 = 10;
    pub(crate) const INTERNAL: u16 = 13;
    pub(crate) const UNAVAILABLE: u16 = 14;
    pub(crate) const UNAUTHENTICATED: u16 = 16;
    pub(crate) const DEADLINE_EXCEEDED: u16 = 4;
}

const GRPC_STATUS: &str = "grpc-status";

/// Whether a call that ended with `code` is stored and replayed: what the service decided
/// (OK, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE). Failures a retry may
/// get past (CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS) and refusals before any effect (INVALID_ARGUMENT,
/// PERMISSION_DENIED, UNIMPLEMENTED, UNAUTHENTICATED) release the key, as a 5xx and a 400 do
/// under the IETF profile.
pub(crate) fn stores(code: u16) -> bool {
    matches!(code, 0 | 5 | 6 | 9 | 11)
}

/// The call's `grpc-status`: from the trailers, or from the headers of a trailers-only
/// response.
pub(crate) fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<u16> {
    trailers
        .and_then(|t| t.get(GRPC_STATUS))
        .or_else(|| headers.get(GRPC_STATUS))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A trailers-only response with `code` and `message` (percent-encoded as the gRPC spec says).
/// With `retry_after`, it carries a `google.rpc.Status` whose details hold a
/// `google.rpc.RetryInfo` (`grpc-status-details-bin`), as the gRPC richer error model has it.
pub(crate) fn status(
    code: u16,
    message: &str,
    retry_after: Option<Duration>,
) -> Response<ResponseBody> {
    let mut res = Response::new(full(""));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    if let Some(after) = retry_after {
        let details = status_details(code, message, after);
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(details);
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("grpc-status-details-bin", v);
        }
    }
    res
}

/// Percent-encodes what gRPC's `grpc-message` may not carry as it is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `google.rpc.Status { code, message, details: [Any(google.rpc.RetryInfo { retry_delay })] }`
/// in protobuf's wire format.
fn status_details(code: u16, message: &str, after: Duration) -> Vec<u8> {
    let mut delay = Vec::new();
    field_varint(&mut delay, 1, after.as_secs());
    if after.subsec_nanos() > 0 {
        field_varint(&mut delay, 2, u64::from(after.subsec_nanos()));
    }
    let mut retry_info = Vec::new();
    field_bytes(&mut retry_info, 1, &delay);
    let mut any = Vec::new();
    field_bytes(&mut any, 1, b"type.googleapis.com/google.rpc.RetryInfo");
    field_bytes(&mut any, 2, &retry_info);
    let mut status = Vec::new();
    field_varint(&mut status, 1, u64::from(code));
    field_bytes(&mut status, 2, message.as_bytes());
    field_bytes(&mut status, 3, &any);
    status
}

#[allow(clippy::cast_possible_truncation)] // seven bits at a time
fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field_varint(out: &mut Vec<u8>, field: u64, n: u64) {
    varint(out, field << 3);
    varint(out, n);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_percent_encoded() {
        assert_eq!(percent_encode("50% done\n"), "50%25 done%0A");
        assert_eq!(percent_encode("caf\u{e9}"), "caf%C3%A9");
    }

    #[test]
    fn retry_info_is_protobuf() {
        // Status{code: 10, message: "x", details: [Any{RetryInfo{retry_delay: 2s}}]}
        let bytes = status_details(10, "x", Duration::from_secs(2));
        let type_url = b"type.googleapis.com/google.rpc.RetryInfo";
        let len = |n: usize| u8::try_from(n).unwrap();
        let mut want = vec![
            0x08,
            10,
            0x12,
            1,
            b'x',
            0x1a,
            len(2 + type_url.len() + 2 + 4),
        ];
        want.extend_from_slice(&[0x0a, len(type_url.len())]);
        want.extend_from_slice(type_url);
        want.extend_from_slice(&[0x12, 4, 0x0a, 2, 0x08, 2]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn the_status_comes_from_trailers_or_a_trailers_only_head() {
        let mut head = HeaderMap::new();
        let mut trailers = HeaderMap::new();
        assert_eq!(status_of(&head, None), None);
        head.insert(GRPC_STATUS, HeaderValue::from(14u16));
        assert_eq!(status_of(&head, None), Some(14));
        trailers.insert(GRPC_STATUS, HeaderValue::from(0u16));
        assert_eq!(status_of(&head, Some(&trailers)), Some(0));
        assert!(stores(0) && stores(6) && !stores(14) && !stores(3));
    }
}
