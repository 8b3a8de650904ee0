//! Request fingerprints.

use std::fmt;

/// A 32-byte BLAKE3 digest of a request's canonical content.
///
/// A claim with a known key and a *different* fingerprint is a
/// [`Claim::Mismatch`](crate::Claim::Mismatch), not a replay: the client reused a key for another
/// request.
///
/// ```
/// use idemgate_core::Fingerprint;
///
/// let a = Fingerprint::of(b"amount=100");
/// assert_eq!(a, Fingerprint::of(b"amount=100"));
/// // parts are length-prefixed, so ("ab", "c") and ("a", "bc") differ
/// assert_ne!(Fingerprint::of_parts(["ab", "c"]), Fingerprint::of_parts(["a", "bc"]));
/// assert_eq!(a.to_hex().parse::<Fingerprint>().unwrap(), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The digest of one byte string.
    pub fn of(content: impl AsRef<[u8]>) -> Self {
        Fingerprint(*blake3::hash(content.as_ref()).as_bytes())
    }

    /// The digest of several parts (method, path, body, ...), each length-prefixed.
    pub fn of_parts<I>(parts: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        // small parts are gathered and hashed in one call (each `update` has a fixed cost);
        // BLAKE3 gives the same digest however the input is split. The streaming hasher (about
        // 2 KB of state) is made only for content that outgrows the buffer.
        let mut h: Option<blake3::Hasher> = None;
        let mut buf = [0u8; 512];
        let mut used = 0;
        for part in parts {
            let part = part.as_ref();
            let len = (part.len() as u64).to_le_bytes();
            if used + len.len() + part.len() <= buf.len() {
                buf[used..used + len.len()].copy_from_slice(&len);
                used += len.len();
                buf[used..used + part.len()].copy_from_slice(part);
                used += part.len();
            } else {
                let h = h.get_or_insert_with(blake3::Hasher::new);
                h.update(&buf[..used]);
                used = 0;
                h.update(&len);
                h.update(part);
            }
        }
        let digest = match h {
            None => blake3::hash(&buf[..used]),
            Some(mut h) => {
                h.update(&buf[..used]);
                h.finalize()
            }
        };
        Fingerprint(*digest.as_bytes())
    }

    /// A fingerprint from its 32 raw bytes (as stored).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl TryFrom<&[u8]> for Fingerprint {
    type Error = crate::Error;

    fn try_from(value: &[u8]) -> crate::Result<Self> {
        let bytes: [u8; 32] = value.try_into().map_err(|_| crate::Error::Corrupt {
            backend: "fingerprint",
            reason: format!("a fingerprint is 32 bytes, got {}", value.len()),
        })?;
        Ok(Fingerprint(bytes))
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        let bad = || crate::Error::Config {
            message: format!("{s:?} is not a 64-digit hex fingerprint"),
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::Fingerprint;

    /// The digest `of_parts` has always meant: BLAKE3 of each part's little-endian u64 length
    /// followed by the part, concatenated.
    fn reference(parts: &[&[u8]]) -> Fingerprint {
        let mut all = Vec::new();
        for p in parts {
            all.extend_from_slice(&(p.len() as u64).to_le_bytes());
            all.extend_from_slice(p);
        }
        Fingerprint(*blake3::hash(&all).as_bytes())
    }

    #[test]
    fn of_parts_is_the_hash_of_the_length_prefixed_parts() {
        let big = vec![7u8; 600];
        let edge = vec![1u8; 512 - 8];
        let cases: [&[&[u8]]; 5] = [
            &[],
            &[b"POST", b"/orders", b"", b"{\"sku\":\"A1\"}"],
            &[b"POST", &big, b"tail"],
            &[&edge, b"x"],
            &[b"a", &big, &big, b"b"],
        ];
        for parts in cases {
            assert_eq!(Fingerprint::of_parts(parts.iter()), reference(parts));
        }
    }
}
