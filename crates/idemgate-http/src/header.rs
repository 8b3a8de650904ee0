//! Parsing the `Idempotency-Key` header.

/// Why a header value is not an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// Empty (or `""`).
    Empty,
    /// Longer than 255 bytes.
    TooLong,
    /// Bytes outside visible ASCII, or a malformed structured-field string.
    Malformed,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyError::Empty => "the Idempotency-Key is empty",
            KeyError::TooLong => "the Idempotency-Key is longer than 255 bytes",
            KeyError::Malformed => {
                "the Idempotency-Key is not a structured-field string or visible ASCII"
            }
        })
    }
}

/// Reads a key in the IETF draft's structured-field string form (`"8e03…"`, with `\"` and `\\`
/// escapes) or in the bare form Stripe-style clients send. The key is 1..=255 bytes of visible
/// ASCII (a space is allowed inside a quoted string).
///
/// ```
/// use idemgate_http::parse_key;
/// assert_eq!(parse_key(br#""8e03-a""#).unwrap(), "8e03-a");
/// assert_eq!(parse_key(b"8e03-a").unwrap(), "8e03-a");
/// assert!(parse_key(b"").is_err());
/// ```
pub fn parse_key(raw: &[u8]) -> Result<String, KeyError> {
    let raw = raw.trim_ascii();
    let key = if let Some(inner) = raw.strip_prefix(b"\"") {
        let mut out = Vec::with_capacity(inner.len());
        let mut it = inner.iter();
        loop {
            match it.next() {
                None => return Err(KeyError::Malformed),
                Some(b'"') => break,
                Some(b'\\') => match it.next() {
                    Some(&c @ (b'"' | b'\\')) => out.push(c),
                    _ => return Err(KeyError::Malformed),
                },
                Some(&c) if c == b' ' || c.is_ascii_graphic() => out.push(c),
                Some(_) => return Err(KeyError::Malformed),
            }
        }
        if it.next().is_some() {
            return Err(KeyError::Malformed);
        }
        out
    } else {
        if !raw.iter().all(u8::is_ascii_graphic) {
            return Err(KeyError::Malformed);
        }
        raw.to_vec()
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > 255 {
        return Err(KeyError::TooLong);
    }
    String::from_utf8(key).map_err(|_| KeyError::Malformed)
}

/// The structured-field string form of a key, as a client sends it.
pub fn format_key(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 2);
    s.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}
