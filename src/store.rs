//! What kamsync remembers per entity, and how it is laid out in Redis.
//!
//! One hash per kind and database, `kamsync:state:<kind>`, with two sorts of fields:
//!
//! * `e:<entity key>` → [`EntityState`]: the entity's id, its first-sync time, the row it owns
//!   and a fingerprint of that row's content;
//! * `r:<row key>` → `<entity key>`: which entity owns a row, so a second entity that maps to the
//!   same row is recognised as a conflict.
//!
//! Both live in the same hash so that one `HMGET` answers "what do I know about this entity, and
//! who owns the row it wants", and one `HSET` records both. Kamailio never reads this hash, and
//! the state outlives the entity key until the row is removed: a delete finds the row here.

use crate::mapping::Kind;

/// Name of the state hash for a kind.
pub fn state_key(kind: Kind) -> String {
    format!("{}{}", crate::config::STATE_KEY_PREFIX, kind.name())
}

/// Field holding an entity's state.
pub fn entity_field(entity_key: &[u8]) -> Vec<u8> {
    [b"e:".as_slice(), entity_key].concat()
}

/// Field naming a row's owner.
pub fn owner_field(row_key: &str) -> Vec<u8> {
    [b"r:".as_slice(), row_key.as_bytes()].concat()
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
    fn fields_are_prefixed_by_sort() {
        assert_eq!(entity_field(b"sipdomain:\x00"), b"e:sipdomain:\x00".to_vec());
        assert_eq!(owner_field("domain:entry::a"), b"r:domain:entry::a".to_vec());
        assert_eq!(state_key(Kind::Credential), "kamsync:state:credential");
    }
}
