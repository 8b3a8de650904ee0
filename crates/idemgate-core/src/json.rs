//! Keys and fingerprints from chosen fields of a JSON payload, picked by JSON Pointer
//! (RFC 6901).

use serde_json::Value;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;

/// Fields of a JSON payload, each named by a JSON Pointer (`/amount`, `/order/id`,
/// `/items/0/sku`), for a key or a fingerprint taken from part of the payload.
///
/// A re-publish that changes only a timestamp field keeps its fingerprint when the fingerprint
/// covers `/amount` and `/currency` only, so it is replayed rather than dead-lettered as a
/// mismatch; a business key from `/order_id` makes two events about one order one key.
///
/// ```
/// use idemgate_core::{JsonFields, Key};
///
/// let fields = JsonFields::new(["/amount", "/currency"])?;
/// let a = fields.fingerprint(br#"{"amount": 250, "currency": "EUR", "sent_at": "10:00"}"#)?;
/// let b = fields.fingerprint(br#"{"sent_at": "10:05", "currency": "EUR", "amount": 250}"#)?;
/// assert_eq!(a, b);
///
/// let key = JsonFields::new(["/order_id"])?.key("orders", br#"{"order_id": "o-7"}"#)?;
/// assert_eq!(key, Key::compose("orders", ["o-7"])?);
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonFields {
    pointers: Vec<String>,
}

impl JsonFields {
    /// Fields by JSON Pointer; at least one, each empty (the whole document) or starting with
    /// `/`, or [`Error::Config`].
    pub fn new<I>(pointers: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let pointers: Vec<String> = pointers.into_iter().map(Into::into).collect();
        if pointers.is_empty() {
            return Err(config("JsonFields needs at least one JSON Pointer"));
        }
        if let Some(bad) = pointers
            .iter()
            .find(|p| !p.is_empty() && !p.starts_with('/'))
        {
            return Err(config(&format!(
                "{bad:?} is not a JSON Pointer: it must start with '/' (as in /amount)"
            )));
        }
        Ok(JsonFields { pointers })
    }

    /// The pointers, as given.
    pub fn pointers(&self) -> &[String] {
        &self.pointers
    }

    /// The fingerprint of the chosen fields: their values in a canonical form (object members
    /// sorted, no whitespace), so field order and the other fields do not count. A field the
    /// payload lacks counts as absent, distinct from `null`. A payload that is not JSON is
    /// [`Error::InvalidPayload`].
    pub fn fingerprint(&self, payload: &[u8]) -> Result<Fingerprint> {
        let doc = parse(payload)?;
        let parts: Vec<Vec<u8>> = self
            .pointers
            .iter()
            .flat_map(|p| {
                let value = doc.pointer(p).map(|v| {
                    let mut out = vec![b'='];
                    canonical(v, &mut out);
                    out
                });
                [p.as_bytes().to_vec(), value.unwrap_or_default()]
            })
            .collect();
        Ok(Fingerprint::of_parts(parts))
    }

    /// A key in `scope` composed of the chosen fields (see [`Key::compose`]): a string field
    /// gives its text, any other value its canonical JSON. A missing or `null` field, or a
    /// payload that is not JSON, is [`Error::InvalidPayload`].
    pub fn key(&self, scope: &str, payload: &[u8]) -> Result<Key> {
        let doc = parse(payload)?;
        let parts = self
            .pointers
            .iter()
            .map(|p| match doc.pointer(p) {
                None | Some(Value::Null) => Err(Error::InvalidPayload {
                    reason: format!("the payload has no {p} to take the key from"),
                }),
                Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
                Some(v) => {
                    let mut out = Vec::new();
                    canonical(v, &mut out);
                    Ok(out)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Key::compose(scope, parts)
    }
}

fn config(message: &str) -> Error {
    Error::Config {
        message: message.to_owned(),
    }
}

fn parse(payload: &[u8]) -> Result<Value> {
    serde_json::from_slice(payload).map_err(|e| Error::InvalidPayload {
        reason: format!("the payload is not JSON: {e}"),
    })
}

/// `v` as compact JSON with object members sorted by name, whatever the map's own order.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                scalar(&Value::String(k.clone()), out);
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        other => scalar(other, out),
    }
}

fn scalar(v: &Value, out: &mut Vec<u8>) {
    // writing a scalar into a Vec cannot fail
    let _ = serde_json::to_writer(&mut *out, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_covers_only_the_chosen_fields() {
        let f = JsonFields::new(["/amount", "/meta"]).unwrap();
        let fp = |s: &str| f.fingerprint(s.as_bytes()).unwrap();
        let base = fp(r#"{"amount":1,"meta":{"a":1,"b":2},"ts":1}"#);
        assert_eq!(base, fp(r#"{"ts":2,"meta":{"b":2,"a":1},"amount":1}"#));
        assert_ne!(base, fp(r#"{"amount":2,"meta":{"a":1,"b":2}}"#));
        assert_ne!(base, fp(r#"{"amount":1,"meta":{"a":1,"b":3}}"#));
        // absent and null differ; a field cannot pass for another
        assert_ne!(fp(r#"{"amount":null}"#), fp("{}"));
        let g = JsonFields::new(["/meta", "/amount"]).unwrap();
        assert_ne!(
            f.fingerprint(br#"{"amount":1,"meta":2}"#).unwrap(),
            g.fingerprint(br#"{"amount":2,"meta":1}"#).unwrap()
        );
    }

    #[test]
    fn keys_and_bad_input() {
        let f = JsonFields::new(["/order", "/line"]).unwrap();
        assert_eq!(
            f.key("o", br#"{"order":"a-1","line":3}"#).unwrap(),
            Key::compose("o", ["a-1", "3"]).unwrap()
        );
        for bad in [
            &br#"{"order":"a-1"}"#[..],
            br#"{"order":null,"line":1}"#,
            b"not json",
        ] {
            assert!(matches!(f.key("o", bad), Err(Error::InvalidPayload { .. })));
        }
        assert!(matches!(
            f.fingerprint(b"{"),
            Err(Error::InvalidPayload { .. })
        ));
        assert!(matches!(
            JsonFields::new(["amount"]),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            JsonFields::new(Vec::<String>::new()),
            Err(Error::Config { .. })
        ));
    }
}
