//! Idempotency keys, business keys and event ids.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The longest scope or id, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// An idempotency key: a scope (consumer, operation or tenant) and an id within it.
///
/// Both parts are 1..=255 bytes of visible ASCII (`0x21..=0x7e`). Business keys made of several
/// parts come from [`Key::compose`]; keys passed to a downstream system from [`Key::derive`].
///
/// A `Key` is cheap to clone (one reference count).
///
/// ```
/// use idemgate_core::Key;
///
/// let key = Key::new("payments", "8e03978e-40d5-43e8-bc93-6894a57f9324")?;
/// assert_eq!(key.scope(), "payments");
/// assert!(Key::new("payments", "has space").is_err());
///
/// // order id + SKU, without ambiguity between ("ab", "c") and ("a", "bc")
/// let a = Key::compose("reservations", ["ab", "c"])?;
/// let b = Key::compose("reservations", ["a", "bc"])?;
/// assert_ne!(a, b);
///
/// // what to send to the card network as *its* idempotency key
/// let downstream = key.derive("charge");
/// assert_eq!(downstream, key.derive("charge"));
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    // the scope and the id in one allocation: one pointer to follow when a store compares keys
    text: Arc<str>,
    scope_len: u8,
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.scope(), self.id()).cmp(&(other.scope(), other.id()))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn check(what: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid_key(format!("{what} is empty")));
    }
    if s.len() > MAX_KEY_LEN {
        return Err(Error::invalid_key(format!(
            "{what} is {} bytes, longer than {MAX_KEY_LEN}",
            s.len()
        )));
    }
    if let Some((at, b)) = s.bytes().enumerate().find(|(_, b)| !b.is_ascii_graphic()) {
        return Err(Error::invalid_key(format!(
            "{what} has byte 0x{b:02x} at {at}; only visible ASCII is allowed"
        )));
    }
    Ok(())
}

/// Parts written as `len:part` pairs, which no other list of parts can produce.
enum Encoded {
    /// The encoding is a valid id, or empty (no parts): the first this many bytes of the buffer.
    Id(usize),
    /// The BLAKE3 digest of the encoding: it is too long for an id or has a byte outside
    /// visible ASCII.
    Digest(blake3::Hash),
}

impl Encoded {
    /// The digest of the encoding, whichever form it took (`buf`: the buffer it was written to).
    fn digest(self, buf: &[u8]) -> blake3::Hash {
        match self {
            Encoded::Id(len) => blake3::hash(&buf[..len]),
            Encoded::Digest(digest) => digest,
        }
    }
}

/// Encodes `parts` into `buf` (at least [`MAX_KEY_LEN`] bytes) while the encoding fits an id and
/// is visible ASCII, and into a BLAKE3 hasher (made only then) once it does not: no heap
/// allocation either way.
fn length_prefixed<I>(parts: I, buf: &mut [u8]) -> Encoded
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let mut parts = parts.into_iter();
    let (mut len, mut graphic) = (0, true);
    while let Some(part) = parts.next() {
        let part = part.as_ref();
        // the length in decimal, then ':' (`itoa`: `write!` cost more than the rest)
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(part.len()).as_bytes();
        let end = len + digits.len() + 1 + part.len();
        if end > MAX_KEY_LEN {
            // too long for an id: hash what was written and all that is left
            let mut h = blake3::Hasher::new();
            h.update(&buf[..len])
                .update(digits)
                .update(b":")
                .update(part);
            for part in parts {
                let part = part.as_ref();
                h.update(itoa::Buffer::new().format(part.len()).as_bytes());
                h.update(b":").update(part);
            }
            return Encoded::Digest(h.finalize());
        }
        buf[len..len + digits.len()].copy_from_slice(digits);
        buf[len + digits.len()] = b':';
        buf[end - part.len()..end].copy_from_slice(part);
        graphic &= part.iter().all(u8::is_ascii_graphic);
        len = end;
    }
    if graphic {
        Encoded::Id(len)
    } else {
        Encoded::Digest(blake3::hash(&buf[..len]))
    }
}

impl Key {
    /// A key from a scope and an id, both 1..=255 bytes of visible ASCII.
    pub fn new(scope: impl AsRef<str>, id: impl AsRef<str>) -> Result<Self> {
        let (scope, id) = (scope.as_ref(), id.as_ref());
        check("scope", scope)?;
        check("id", id)?;
        Ok(Key::joined(scope, &[id]))
    }

    /// Both parts already checked; the id given in pieces.
    fn joined(scope: &str, id: &[&str]) -> Self {
        let mut buf = [0u8; 2 * MAX_KEY_LEN];
        let mut len = scope.len();
        buf[..len].copy_from_slice(scope.as_bytes());
        for piece in id {
            buf[len..len + piece.len()].copy_from_slice(piece.as_bytes());
            len += piece.len();
        }
        // both parts are ASCII, so their concatenation is UTF-8
        Key::from_text(
            std::str::from_utf8(&buf[..len]).unwrap_or_default(),
            scope.len(),
        )
    }

    /// A key whose text is the checked scope (its first `scope_len` bytes) and then the id.
    fn from_text(text: &str, scope_len: usize) -> Self {
        Key {
            text: Arc::from(text),
            scope_len: u8::try_from(scope_len).unwrap_or(u8::MAX),
        }
    }

    /// A business key built from several parts (payment id + operation, order id + SKU, user id
    /// + email type), without ambiguity.
    ///
    /// Parts are written length-prefixed (`7:payment3:abc`), so distinct lists of parts never give
    /// the same id. When the result would not be a valid id (longer than 255 bytes, or a part has
    /// bytes outside visible ASCII), the id is `b3:` followed by the BLAKE3 hex digest of that same
    /// encoding.
    pub fn compose<I>(scope: impl AsRef<str>, parts: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let scope = scope.as_ref();
        check("scope", scope)?;
        // the scope, then the id encoded right behind it: the key's text is written once
        let mut buf = [0; 2 * MAX_KEY_LEN];
        let (head, id) = buf.split_at_mut(scope.len());
        head.copy_from_slice(scope.as_bytes());
        match length_prefixed(parts, id) {
            Encoded::Id(0) => Err(Error::invalid_key("a composed key needs at least one part")),
            // 1..=255 bytes of visible ASCII: a valid id as it is
            Encoded::Id(len) => {
                let text = std::str::from_utf8(&buf[..scope.len() + len])
                    .map_err(|_| Error::invalid_key("a composed id is not ASCII"))?;
                Ok(Key::from_text(text, scope.len()))
            }
            Encoded::Digest(digest) => Ok(Key::joined(scope, &["b3:", &digest.to_hex()])),
        }
    }

    /// The deterministic key for a downstream call made on behalf of this key.
    ///
    /// A handler that crashes after its effect but before `complete` runs again; passing
    /// `key.derive("charge")` to the payment provider as *its* idempotency key makes that second
    /// run harmless. The same key and step always give the same derived key.
    pub fn derive(&self, step: &str) -> Key {
        let mut buf = [0; MAX_KEY_LEN];
        let digest = length_prefixed([self.scope(), self.id(), step], &mut buf).digest(&buf);
        Key::joined(self.scope(), &["d3:", &digest.to_hex()])
    }

    /// The scope: consumer, operation or tenant.
    pub fn scope(&self) -> &str {
        &self.text[..usize::from(self.scope_len)]
    }

    /// The id within the scope.
    pub fn id(&self) -> &str {
        &self.text[usize::from(self.scope_len)..]
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?}, {:?})", self.scope(), self.id())
    }
}

/// `scope/id`, for logs and people.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope(), self.id())
    }
}

/// The id of an event, stamped by its producer.
///
/// Either a UUIDv7 ([`EventId::new`]) or a producer id with a per-producer sequence number
/// ([`EventId::sequence`]). Never a timestamp alone: two events in the same millisecond are two
/// events.
///
/// ```
/// use idemgate_core::EventId;
///
/// let id = EventId::new();
/// assert_eq!(id.to_string().parse::<EventId>()?, id);
///
/// let seq = EventId::sequence("billing-1", 42)?;
/// assert_eq!(seq.to_string(), "billing-1#42");
/// assert_eq!("billing-1#42".parse::<EventId>()?, seq);
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventId {
    /// A UUIDv7: unique without coordination, and ordered by creation time.
    Uuid(uuid::Uuid),
    /// A producer's own id and its gap-free sequence number.
    Sequence {
        /// The producer: 1..=200 bytes of visible ASCII without `#`.
        producer: Box<str>,
        /// The producer's sequence number.
        seq: u64,
    },
}

impl EventId {
    /// A fresh UUIDv7.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        EventId::Uuid(uuid::Uuid::now_v7())
    }

    /// A producer id and sequence number.
    pub fn sequence(producer: impl AsRef<str>, seq: u64) -> Result<Self> {
        let producer = producer.as_ref();
        check("producer", producer)?;
        if producer.len() > 200 || producer.contains('#') {
            return Err(Error::invalid_key(
                "producer must be at most 200 bytes and must not contain '#'",
            ));
        }
        Ok(EventId::Sequence {
            producer: producer.into(),
            seq,
        })
    }

    /// This event's key in `scope` (usually the consumer's name).
    pub fn key(&self, scope: impl AsRef<str>) -> Result<Key> {
        Key::new(scope, self.to_string())
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventId::Uuid(u) => u.hyphenated().fmt(f),
            EventId::Sequence { producer, seq } => write!(f, "{producer}#{seq}"),
        }
    }
}

impl FromStr for EventId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some((producer, seq)) = s.rsplit_once('#') {
            let seq = seq.parse().map_err(|_| {
                Error::invalid_key(format!("bad sequence number in event id {s:?}"))
            })?;
            return EventId::sequence(producer, seq);
        }
        let u = uuid::Uuid::try_parse(s).map_err(|_| {
            Error::invalid_key(format!("event id {s:?} is neither a UUID nor producer#seq"))
        })?;
        Ok(EventId::Uuid(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_parts() {
        assert!(Key::new("s", "a").is_ok());
        assert!(Key::new("", "a").is_err());
        assert!(Key::new("s", "").is_err());
        assert!(Key::new("s", "x".repeat(255)).is_ok());
        let err = Key::new("s", "x".repeat(256)).unwrap_err();
        assert!(err.to_string().contains("256 bytes"), "{err}");
        assert!(Key::new("s", "é").is_err());
        assert!(Key::new("s", "a\nb").is_err());
        assert!(matches!(
            Key::new("s", " ").unwrap_err(),
            Error::InvalidKey { .. }
        ));
    }

    #[test]
    fn compose_is_unambiguous_and_hashes_long_or_binary_parts() {
        let k = Key::compose("orders", ["o-1", "sku:9"]).unwrap();
        assert_eq!(k.id(), "3:o-15:sku:9");
        assert_ne!(
            Key::compose("s", ["a:b", "c"]).unwrap(),
            Key::compose("s", ["a", "b:c"]).unwrap()
        );
        let long = Key::compose("s", ["x".repeat(300)]).unwrap();
        assert!(long.id().starts_with("b3:") && long.id().len() == 67);
        let binary = Key::compose("s", [&b"\x00\xff"[..]]).unwrap();
        assert!(binary.id().starts_with("b3:"));
        assert!(Key::compose("s", Vec::<&str>::new()).is_err());
        // the digest is of the whole `len:part` encoding, however it was gathered: past the
        // stack buffer at a part's boundary, in the middle of one, or with a binary byte early
        let x300 = "x".repeat(300);
        let y200 = "y".repeat(200);
        for parts in [
            vec![x300.as_bytes()],
            vec![y200.as_bytes(), y200.as_bytes()],
            vec![&b"\x00\xff"[..], y200.as_bytes(), x300.as_bytes()],
        ] {
            let mut encoding = Vec::new();
            for p in &parts {
                encoding.extend_from_slice(format!("{}:", p.len()).as_bytes());
                encoding.extend_from_slice(p);
            }
            let want = format!("b3:{}", blake3::hash(&encoding).to_hex());
            assert_eq!(Key::compose("s", &parts).unwrap().id(), want);
        }
        // a 255-byte encoding is still the id itself
        let fits = "z".repeat(251);
        assert_eq!(
            Key::compose("s", [fits.as_str()]).unwrap().id(),
            format!("251:{fits}")
        );
    }

    #[test]
    fn derive_is_deterministic_and_distinct() {
        let k = Key::new("pay", "p1").unwrap();
        assert_eq!(k.derive("charge"), k.derive("charge"));
        assert_ne!(k.derive("charge"), k.derive("refund"));
        assert_ne!(
            k.derive("charge"),
            Key::new("pay", "p2").unwrap().derive("charge")
        );
        assert_eq!(k.derive("charge").scope(), "pay");
        // stable across versions: stored keys and downstream providers depend on it
        assert_eq!(
            k.derive("charge").id(),
            "d3:e88a9e76c82aaa99bd6cd1ba26ce27d304a9da1c5f41983ea29c1cd571b01c80"
        );
    }

    #[test]
    fn compose_writes_lengths_in_decimal() {
        let part = "y".repeat(123);
        let k = Key::compose("s", ["abcdefghijkl", part.as_str(), ""]).unwrap();
        assert_eq!(k.id(), format!("12:abcdefghijkl123:{part}0:"));
    }

    #[test]
    fn event_ids_round_trip() {
        let a = EventId::new();
        let b = EventId::new();
        assert_ne!(a, b);
        assert!(a < b, "UUIDv7 ids are ordered");
        assert_eq!(a.to_string().parse::<EventId>().unwrap(), a);
        assert!("nope".parse::<EventId>().is_err());
        assert!("p#x".parse::<EventId>().is_err());
        assert!(EventId::sequence("a#b", 1).is_err());
        assert_eq!(
            EventId::sequence("p", 7).unwrap().key("c").unwrap().id(),
            "p#7"
        );
    }
}
