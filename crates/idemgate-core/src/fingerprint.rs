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
        let mut h = blake3::Hasher::new();
        for part in parts {
            let part = part.as_ref();
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Fingerprint(*h.finalize().as_bytes())
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
