//! What kamsync remembers per entity, and how it is laid out in Redis.
//!
//! One hash per kind and database, `kamsync:state:<kind>`, with two sorts of fields:
//!
//! * `e:<entity key>` → [`EntityState`]: the entity's id, its first-sync time, the row it owns
//!   and a fingerprint of that row's content;
//! * `r:<row key>` → `<entity key>`: which entity owns a row, so a second entity that maps to the
//!   same row is recognised as a conflict.
//!
//! * `w:<row key>` → the entities refused because that row was taken (see
//!   [`encode_waiters`]): when the owner lets the row go, they are reconciled at once, and the
//!   first still mapping to it takes it.
//!
//! All live in the same hash so that one `HMGET` answers "what do I know about this entity, and
//! who owns the row it wants", and one `HSET` records both. Kamailio never reads this hash, and
//! the state outlives the entity key until the row is removed: a delete finds the row here.

use crate::mapping::Kind;

/// Name of the state hash for a kind (`kamsync:state:<kind>`, under
/// [`crate::config::STATE_KEY_PREFIX`]).
pub fn state_key(kind: Kind) -> &'static str {
    match kind {
        Kind::Domain => "kamsync:state:domain",
        Kind::Credential => "kamsync:state:credential",
    }
}

/// Field holding an entity's state.
pub fn entity_field(entity_key: &[u8]) -> Vec<u8> {
    [b"e:".as_slice(), entity_key].concat()
}

/// Field naming a row's owner.
pub fn owner_field(row_key: impl AsRef<[u8]>) -> Vec<u8> {
    [b"r:".as_slice(), row_key.as_ref()].concat()
}

/// Field listing the entities waiting for a row.
pub fn waiters_field(row_key: &str) -> Vec<u8> {
    [b"w:".as_slice(), row_key.as_bytes()].concat()
}

/// Entity keys are binary, so the list is length-prefixed: `<len>:<key>` repeated.
pub fn encode_waiters(keys: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        out.extend_from_slice(key.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(key);
    }
    out
}

/// The keys of an [`encode_waiters`] value; a malformed tail is dropped.
pub fn decode_waiters(mut raw: &[u8]) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    while let Some(colon) = raw.iter().position(|&b| b == b':') {
        let Some(len) = std::str::from_utf8(&raw[..colon]).ok().and_then(|n| n.parse().ok()) else {
            break;
        };
        let rest = &raw[colon + 1..];
        if rest.len() < len {
            break;
        }
        keys.push(rest[..len].to_vec());
        raw = &rest[len..];
    }
    keys
}

/// The remembered state of one synced entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityState {
    /// The Kamailio `id`, issued once from the sequence.
    pub id: i64,
    /// `dateCreated` in ms, from the first sync.
    pub created_ms: i64,
    /// [`crate::mapping::Row::fingerprint`] of the row as last written.
    pub fingerprint: u64,
    /// Whether the row as last written carries a `password` column.
    pub row_has_password: bool,
    /// The row key this entity owns.
    pub row: String,
}

impl EntityState {
    /// `<id> <created_ms> <fingerprint hex> <flags> <row key>`; the row key goes last because it
    /// is the only part that could ever contain a space (it cannot today: names exclude
    /// whitespace).
    pub fn encode(&self) -> String {
        format!(
            "{} {} {:x} {} {}",
            self.id,
            self.created_ms,
            self.fingerprint,
            u8::from(self.row_has_password),
            self.row
        )
    }

    /// `None` for anything that is not a value [`encode`](Self::encode) produced.
    pub fn decode(raw: &[u8]) -> Option<EntityState> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut parts = text.splitn(5, ' ');
        let id = parts.next()?.parse().ok()?;
        let created_ms = parts.next()?.parse().ok()?;
        let fingerprint = u64::from_str_radix(parts.next()?, 16).ok()?;
        let row_has_password = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let row = parts.next()?.to_owned();
        if row.is_empty() {
            return None;
        }
        Some(EntityState { id, created_ms, fingerprint, row_has_password, row })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let state = EntityState {
            id: 42,
            created_ms: 1_700_000_000_123,
            fingerprint: u64::MAX - 5,
            row_has_password: true,
            row: "subscriber:entry::alice:example.com".into(),
        };

        assert_eq!(EntityState::decode(state.encode().as_bytes()), Some(state));
    }

    #[test]
    fn decode_rejects_garbage() {
        for raw in [&b""[..], b"x", b"1 2 3", b"1 2 zz 0 row", b"1 2 3 7 row", b"1 2 3 0 ", b"\xff"]
        {
            assert_eq!(EntityState::decode(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn waiter_lists_round_trip_binary_keys() {
        let keys = vec![b"sipdomain:a".to_vec(), b"sip:\x00:9:x".to_vec(), Vec::new()];

        assert_eq!(decode_waiters(&encode_waiters(&keys)), keys);
        assert_eq!(decode_waiters(b"3:abc9:short"), vec![b"abc".to_vec()]);
        assert!(decode_waiters(b"garbage").is_empty());
    }

    #[test]
    fn fields_are_prefixed_by_sort() {
        assert_eq!(entity_field(b"sipdomain:\x00"), b"e:sipdomain:\x00".to_vec());
        assert_eq!(owner_field("domain:entry::a"), b"r:domain:entry::a".to_vec());
        assert_eq!(state_key(Kind::Credential), "kamsync:state:credential");
        for kind in Kind::ALL {
            assert!(state_key(kind).starts_with(crate::config::STATE_KEY_PREFIX));
        }
    }
}
