//! Parsing the `Idempotency-Key` header.

use std::borrow::Cow;

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
/// ASCII (a space is allowed inside a quoted string). The key is borrowed from `raw` unless it
/// had escapes.
///
/// ```
/// use idemgate_http::parse_key;
/// assert_eq!(parse_key(br#""8e03-a""#).unwrap(), "8e03-a");
/// assert_eq!(parse_key(b"8e03-a").unwrap(), "8e03-a");
/// assert!(parse_key(b"").is_err());
/// ```
pub fn parse_key(raw: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    let raw = raw.trim_ascii();
    let key: Cow<'_, [u8]> = if let Some(inner) = raw.strip_prefix(b"\"") {
        // the usual key: no escape, the closing quote last
        if let Some((b'"', key)) = inner.split_last()
            && !key.iter().any(|&c| c == b'"' || c == b'\\')
            && key.iter().all(|&c| c == b' ' || c.is_ascii_graphic())
        {
            return ascii(check_len(key)?).map(Cow::Borrowed);
        }
        // borrowed until the first escape
        let mut owned: Option<Vec<u8>> = None;
        let mut i = 0;
        loop {
            match inner.get(i) {
                None => return Err(KeyError::Malformed),
                Some(b'"') => break,
                Some(b'\\') => match inner.get(i + 1) {
                    Some(&c @ (b'"' | b'\\')) => {
                        owned.get_or_insert_with(|| inner[..i].to_vec()).push(c);
                        i += 2;
                        continue;
                    }
                    _ => return Err(KeyError::Malformed),
                },
                Some(&c) if c == b' ' || c.is_ascii_graphic() => {
                    if let Some(o) = &mut owned {
                        o.push(c);
                    }
                }
                Some(_) => return Err(KeyError::Malformed),
            }
            i += 1;
        }
        // nothing may follow the closing quote
        if i + 1 != inner.len() {
            return Err(KeyError::Malformed);
        }
        owned.map_or(Cow::Borrowed(&inner[..i]), Cow::Owned)
    } else {
        if !raw.iter().all(u8::is_ascii_graphic) {
            return Err(KeyError::Malformed);
        }
        Cow::Borrowed(raw)
    };
    check_len(&key)?;
    match key {
        Cow::Borrowed(b) => ascii(b).map(Cow::Borrowed),
        Cow::Owned(v) => String::from_utf8(v)
            .map(Cow::Owned)
            .map_err(|_| KeyError::Malformed),
    }
}

fn check_len(key: &[u8]) -> Result<&[u8], KeyError> {
    match key.len() {
        0 => Err(KeyError::Empty),
        1..=255 => Ok(key),
        _ => Err(KeyError::TooLong),
    }
}

/// Bytes already checked to be printable ASCII, as text.
fn ascii(b: &[u8]) -> Result<&str, KeyError> {
    std::str::from_utf8(b).map_err(|_| KeyError::Malformed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_quotes_and_what_follows_them() {
        assert!(matches!(parse_key(br#""a-b""#), Ok(Cow::Borrowed("a-b"))));
        let escaped = parse_key(br#""a\"b\\c d""#).unwrap();
        assert!(matches!(escaped, Cow::Owned(_)));
        assert_eq!(escaped, r#"a"b\c d"#);
        assert_eq!(parse_key(br#"  "k"  "#).unwrap(), "k");
        for bad in [
            &br#""k"x"#[..],
            br#""k"""#,
            br#""k"#,
            br#""k\x""#,
            br#""k\"#,
            b"k k",
            b"\"\xff\"",
        ] {
            assert_eq!(parse_key(bad), Err(KeyError::Malformed), "{bad:?}");
        }
        assert_eq!(parse_key(br#""""#), Err(KeyError::Empty));
        assert_eq!(parse_key(&[b'k'; 256]), Err(KeyError::TooLong));
    }
}
