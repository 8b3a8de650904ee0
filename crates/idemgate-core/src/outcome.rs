//! Stored results.

use bytes::Bytes;

use crate::error::{Error, Result};

/// The result of a finished handler, stored with the record and replayed to every duplicate.
///
/// A status and metadata pairs (HTTP status and headers, or a consumer's result kind) plus the
/// body bytes. [`Outcome::encode`] / [`Outcome::decode`] give the one byte layout every backend
/// stores, so a record written by one version is read by the next.
///
/// Cloning an outcome never allocates: the body and the metadata are each one shared buffer
/// ([`Bytes`], [`Meta`]), so a store can hand its copy to every duplicate.
///
/// ```
/// use idemgate_core::Outcome;
///
/// let o = Outcome::new(201, b"{\"id\":7}".to_vec()).with_meta("content-type", "application/json");
/// assert_eq!(Outcome::decode(&o.encode())?, o);
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Outcome {
    /// A status: an HTTP status code, or [`Outcome::OK`] / [`Outcome::FAILED`] for the Gate.
    pub status: u16,
    /// Ordered name/value pairs (HTTP headers; names may repeat).
    pub meta: Meta,
    /// The body.
    pub body: Bytes,
}

const FORMAT_V1: u8 = 1;

impl Outcome {
    /// The Gate's status for a stored success.
    pub const OK: u16 = 0;
    /// The Gate's status for a stored failure (error policy `Store`).
    pub const FAILED: u16 = 1;

    /// An outcome with a status and body and no metadata.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Outcome {
            status,
            meta: Meta::default(),
            body: body.into(),
        }
    }

    /// Adds one metadata pair (copying the pairs already there: build many at once with
    /// `collect` into [`Meta`]).
    pub fn with_meta(mut self, name: impl AsRef<str>, value: impl AsRef<[u8]>) -> Self {
        self.meta = self
            .meta
            .iter()
            .chain([(name.as_ref(), value.as_ref())])
            .collect();
        self
    }

    /// The stored byte layout: a format byte, the status, the metadata pairs and the body, each
    /// length-prefixed (u32, little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.status.to_le_bytes());
        put_len(&mut out, self.meta.len());
        // `Meta` holds its pairs in this very layout
        out.extend_from_slice(&self.meta.buf);
        put_len(&mut out, self.body.len());
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads [`Outcome::encode`]'s layout back; damaged or foreign bytes are
    /// [`Error::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        let format = r.take(1)?[0];
        if format != FORMAT_V1 {
            return Err(corrupt(format!("unknown outcome format {format}")));
        }
        let status = u16::from_le_bytes([r.take(1)?[0], r.take(1)?[0]]);
        let pairs = r.len()?;
        let start = r.0;
        for _ in 0..pairs {
            let n = r.len()?;
            std::str::from_utf8(r.take(n)?)
                .map_err(|_| corrupt("outcome metadata name is not UTF-8".into()))?;
            let n = r.len()?;
            r.take(n)?;
        }
        let meta = Meta {
            buf: Bytes::copy_from_slice(&start[..start.len() - r.0.len()]),
            len: pairs,
        };
        let n = r.len()?;
        let body = Bytes::copy_from_slice(r.take(n)?);
        if !r.0.is_empty() {
            return Err(corrupt(format!(
                "{} trailing bytes after outcome",
                r.0.len()
            )));
        }
        Ok(Outcome { status, meta, body })
    }

    /// The encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        1 + 2 + 4 + self.meta.buf.len() + 4 + self.body.len()
    }
}

/// The metadata pairs of an [`Outcome`]: ordered name/value pairs (HTTP headers; names may
/// repeat).
///
/// The pairs live in one shared buffer, in the layout [`Outcome::encode`] stores, so a clone is
/// one reference count and encoding copies them in one go. Build it with `collect`:
///
/// ```
/// use idemgate_core::Meta;
///
/// let meta: Meta = [("content-type", &b"application/json"[..]), ("etag", b"\"7\"")]
///     .into_iter()
///     .collect();
/// assert_eq!(meta.len(), 2);
/// assert_eq!(meta.iter().next(), Some(("content-type", &b"application/json"[..])));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Meta {
    // `len` pairs, each `u32 name length, name, u32 value length, value` (little-endian);
    // names are UTF-8 (checked when built or decoded)
    buf: Bytes,
    len: usize,
}

impl Meta {
    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        let mut r = Reader(&self.buf);
        std::iter::from_fn(move || {
            // the buffer was written by `collect` or checked by `decode`: these never fail
            let n = r.len().ok()?;
            let name = std::str::from_utf8(r.take(n).ok()?).ok()?;
            let n = r.len().ok()?;
            Some((name, r.take(n).ok()?))
        })
    }

    /// The pairs, each value a slice of the shared buffer (no copy): for building
    /// `http::HeaderValue`s with `from_maybe_shared`.
    pub fn iter_shared(&self) -> impl Iterator<Item = (&str, Bytes)> + '_ {
        self.iter().map(|(n, v)| (n, self.buf.slice_ref(v)))
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, V)> for Meta {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Self {
        let pairs = pairs.into_iter();
        // one allocation for typical headers (a name and a value of ~40 bytes together)
        let mut buf = Vec::with_capacity(pairs.size_hint().0 * 48);
        let mut len = 0;
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref());
            put_len(&mut buf, name.len());
            buf.extend_from_slice(name.as_bytes());
            put_len(&mut buf, value.len());
            buf.extend_from_slice(value);
            len += 1;
        }
        Meta {
            buf: buf.into(),
            len,
        }
    }
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter_shared()).finish()
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Outcomes are capped far below 4 GiB by every caller; saturate rather than wrap.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        backend: "outcome",
        reason,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(corrupt(format!(
                "outcome truncated: wanted {n} bytes, {} left",
                self.0.len()
            )));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn len(&mut self) -> Result<usize> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let o = Outcome::new(200, "hi")
            .with_meta("a", "1")
            .with_meta("a", vec![0u8, 255]);
        assert_eq!(
            o.meta.iter().collect::<Vec<_>>(),
            [("a", &b"1"[..]), ("a", &[0u8, 255][..])]
        );
        assert_eq!(
            o.meta.iter_shared().map(|(_, v)| v).collect::<Vec<_>>(),
            [Bytes::from_static(b"1"), Bytes::from_static(&[0, 255])]
        );
        let bytes = o.encode();
        assert_eq!(bytes.len(), o.encoded_len());
        assert_eq!(Outcome::decode(&bytes).unwrap(), o);
        for cut in 0..bytes.len() {
            assert!(Outcome::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Outcome::decode(&extra).is_err());
        let mut wrong = bytes;
        wrong[0] = 9;
        assert!(matches!(
            Outcome::decode(&wrong),
            Err(Error::Corrupt { .. })
        ));
        // a huge length prefix must not allocate or panic
        assert!(Outcome::decode(&[1, 0, 0, 255, 255, 255, 255]).is_err());
    }
}
