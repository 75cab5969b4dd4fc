//! Entity → Kamailio row: validation, HA1 computation, row content and its fingerprint.
//!
//! Nothing here touches Redis; the rules are plain functions over `serde_json::Value`, unit
//! tested below. The job (`sync.rs`) reads a document, asks this module for the row it maps to,
//! and decides what to write.

use std::fmt::Write as _;

use md5::{Digest, Md5};
use serde_json::{Map, Value};

use crate::error::SyncError;

/// The two entity kinds kamsync maps, each onto one Kamailio table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Domain,
    Credential,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Domain, Kind::Credential];

    /// Short name used in state keys, INFO fields and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Domain => "domain",
            Kind::Credential => "credential",
        }
    }
}

/// Longest name (SIP domain, username, did) accepted. Kamailio's SQL schemas use 64 characters;
/// db_redis has no limit, so this only stops absurd values from reaching a row.
pub const MAX_NAME_LEN: usize = 255;
/// Longest plaintext password accepted.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// The content of one Kamailio row, without `id` and `last_modified`, which the job adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `<table>:entry::<v1>[:<v2>]`, the db_redis key.
    pub key: String,
    /// Column name and value, in the order they are written.
    pub fields: Vec<(&'static str, String)>,
    /// For a domain row: the `domain` and `did` values, whose change needs a `domain.reload`.
    pub reload_relevant: bool,
}

impl Row {
    /// Whether the row carries the plaintext password (only with `store-password yes`).
    pub fn has_password(&self) -> bool {
        self.fields.iter().any(|(name, _)| *name == "password")
    }

    /// FNV-1a over the id and the fields: what the job compares to decide whether the row needs
    /// writing, without reading it back. `last_modified` is not part of it on purpose: it changes
    /// only when something else does.
    pub fn fingerprint(&self, id: i64) -> u64 {
        let mut hash = Fnv::new();
        hash.write(self.key.as_bytes());
        hash.write(&[0]);
        hash.write(id.to_string().as_bytes());
        for (name, value) in &self.fields {
            hash.write(&[0]);
            hash.write(name.as_bytes());
            hash.write(&[1]);
            hash.write(value.as_bytes());
        }
        hash.finish()
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The row a SIP domain document maps to.
pub fn domain_row(doc: &Value, table: &str) -> Result<Row, SyncError> {
    let doc = as_object(doc)?;
    let name = required_name(doc, "name")?;
    let did = match doc.get("did") {
        None | Some(Value::Null) => name.to_owned(),
        Some(_) => required_name(doc, "did")?.to_owned(),
    };
    Ok(Row {
        key: format!("{table}:entry::{name}"),
        fields: vec![("domain", name.to_owned()), ("did", did)],
        reload_relevant: true,
    })
}

/// The row a credential document maps to. `store_password` also writes the plaintext password
/// into the row's `password` column (Kamailio's `calculate_ha1` mode).
pub fn credential_row(doc: &Value, table: &str, store_password: bool) -> Result<Row, SyncError> {
    let doc = as_object(doc)?;
    let username = required_name(doc, "username")?;
    let domain = required_name(doc, "domain")?;
    let password = optional_password(doc)?;
    let ha1 = match (optional_hex(doc, "ha1")?, password) {
        (Some(given), _) => given,
        (None, Some(password)) => ha1(username, domain, password),
        (None, None) => return Err(SyncError::NoSecret),
    };
    let ha1b = match (optional_hex(doc, "ha1b")?, password) {
        (Some(given), _) => given,
        (None, Some(password)) => ha1b(username, domain, password),
        // auth_db reads both columns; an empty ha1b only fails `user@domain` digests.
        (None, None) => String::new(),
    };
    let mut fields = vec![
        ("username", username.to_owned()),
        ("domain", domain.to_owned()),
        ("ha1", ha1),
        ("ha1b", ha1b),
    ];
    if let (true, Some(password)) = (store_password, password) {
        fields.push(("password", password.to_owned()));
    }
    Ok(Row { key: format!("{table}:entry::{username}:{domain}"), fields, reload_relevant: false })
}

/// `MD5(username:realm:password)`, the realm being the SIP domain, as kamctl computes it.
pub fn ha1(username: &str, realm: &str, password: &str) -> String {
    md5_hex(&format!("{username}:{realm}:{password}"))
}

/// `MD5(username@domain:realm:password)`: the digest a UA that sends `user@domain` as its
/// username produces.
pub fn ha1b(username: &str, realm: &str, password: &str) -> String {
    md5_hex(&format!("{username}@{realm}:{realm}:{password}"))
}

fn md5_hex(input: &str) -> String {
    let digest = Md5::digest(input.as_bytes());
    let mut out = String::with_capacity(32);
    for byte in digest {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn as_object(doc: &Value) -> Result<&Map<String, Value>, SyncError> {
    doc.as_object().ok_or(SyncError::NotAnObject(json_type(doc)))
}

/// The JSON type name of a value, for error messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn required_name<'a>(
    doc: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, SyncError> {
    let value = match doc.get(field) {
        None | Some(Value::Null) => return Err(SyncError::field(field, "is missing")),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(SyncError::field(
                field,
                format!("must be a string, not {}", json_type(other)),
            ))
        }
    };
    check_name(value).map_err(|problem| SyncError::field(field, problem))?;
    Ok(value)
}

/// A name that goes into a db_redis key: `:` separates key parts, whitespace and control
/// characters would break SIP and Kamailio's key parsing.
pub fn check_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".into());
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!("is {} bytes long, over the limit of {MAX_NAME_LEN}", value.len()));
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control() || *c == ':') {
        let what =
            if c == ':' { "':'".to_owned() } else { format!("character U+{:04X}", c as u32) };
        return Err(format!("contains {what}, not allowed in a Kamailio key"));
    }
    Ok(())
}

fn optional_password(doc: &Map<String, Value>) -> Result<Option<&str>, SyncError> {
    match doc.get("password") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(SyncError::field("password", "is empty")),
        Some(Value::String(s)) if s.len() > MAX_PASSWORD_LEN => Err(SyncError::field(
            "password",
            format!("is {} bytes long, over the limit of {MAX_PASSWORD_LEN}", s.len()),
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => {
            Err(SyncError::field("password", format!("must be a string, not {}", json_type(other))))
        }
    }
}

/// An MD5 (32) or SHA-256 (64) hex digest, returned in lower case: Kamailio hashes the HA1 text
/// into the response, so `ABC…` and `abc…` would give different digests.
fn optional_hex(
    doc: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, SyncError> {
    let value = match doc.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(SyncError::field(
                field,
                format!("must be a string, not {}", json_type(other)),
            ))
        }
    };
    if value.len() != 32 && value.len() != 64 {
        return Err(SyncError::field(
            field,
            format!("must be 32 (MD5) or 64 (SHA-256) hex digits, not {} characters", value.len()),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SyncError::field(field, "must contain only hex digits"));
    }
    Ok(Some(value.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn domain_maps_to_row_with_did_defaulting_to_name() {
        let row = domain_row(&json!({"name": "example.com"}), "domain").unwrap();

        assert_eq!(row.key, "domain:entry::example.com");
        assert_eq!(
            row.fields,
            vec![("domain", "example.com".to_owned()), ("did", "example.com".to_owned())]
        );
    }

    #[test]
    fn domain_keeps_explicit_did_and_treats_null_as_absent() {
        let explicit = domain_row(&json!({"name": "a.org", "did": "tenant-7"}), "domain").unwrap();
        let null = domain_row(&json!({"name": "a.org", "did": null}), "domain").unwrap();

        assert_eq!(explicit.fields[1], ("did", "tenant-7".to_owned()));
        assert_eq!(null.fields[1], ("did", "a.org".to_owned()));
    }

    #[test]
    fn domain_rejects_bad_names_with_the_reason() {
        let cases = [
            (json!({}), "name is missing"),
            (json!({"name": ""}), "name is empty"),
            (json!({"name": 5}), "name must be a string, not number"),
            (json!({"name": "a b"}), "name contains character U+0020"),
            (json!({"name": "a:b"}), "name contains ':'"),
            (json!({"name": "a\u{7}"}), "name contains character U+0007"),
            (json!({"name": "ok", "did": ""}), "did is empty"),
            (json!({"name": "ok", "did": 3}), "did must be a string"),
            (json!(["name"]), "the document must be a JSON object, not array"),
            (json!({"name": "x".repeat(MAX_NAME_LEN + 1)}), "over the limit"),
        ];
        for (doc, expected) in cases {
            let err = domain_row(&doc, "domain").unwrap_err().to_string();
            assert!(err.contains(expected), "{doc}: got {err:?}, want {expected:?}");
        }
    }

    #[test]
    fn credential_computes_ha1_and_ha1b_from_password_like_kamctl() {
        let doc = json!({"username": "alice", "domain": "example.com", "password": "secret"});

        let row = credential_row(&doc, "subscriber", false).unwrap();

        assert_eq!(row.key, "subscriber:entry::alice:example.com");
        // echo -n 'alice:example.com:secret' | md5sum
        assert_eq!(field(&row, "ha1"), "b1726872c344b6dc8365b774f8fd6412");
        // echo -n 'alice@example.com:example.com:secret' | md5sum
        assert_eq!(field(&row, "ha1b"), "c79656e4f06dbae9fdf6727654273c65");
        assert!(!row.has_password());
    }

    #[test]
    fn md5_matches_the_reference_vectors() {
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex("abc"), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn credential_prefers_given_hashes_and_lowercases_them() {
        let upper = "A".repeat(32);
        let doc = json!({"username": "bob", "domain": "d.io", "ha1": upper, "password": "pw"});

        let row = credential_row(&doc, "subscriber", false).unwrap();

        assert_eq!(field(&row, "ha1"), "a".repeat(32));
        assert_eq!(field(&row, "ha1b"), ha1b("bob", "d.io", "pw"));
    }

    #[test]
    fn credential_without_password_writes_empty_ha1b() {
        let doc = json!({"username": "bob", "domain": "d.io", "ha1": "b".repeat(64)});

        let row = credential_row(&doc, "subscriber", false).unwrap();

        assert_eq!(field(&row, "ha1"), "b".repeat(64));
        assert_eq!(field(&row, "ha1b"), "");
    }

    #[test]
    fn credential_stores_password_only_when_configured() {
        let doc = json!({"username": "bob", "domain": "d.io", "password": "pw"});

        let without = credential_row(&doc, "subscriber", false).unwrap();
        let with = credential_row(&doc, "subscriber", true).unwrap();

        assert!(!without.has_password());
        assert_eq!(field(&with, "password"), "pw");
    }

    #[test]
    fn credential_rejections_name_the_field_and_never_the_secret() {
        let cases = [
            (json!({"domain": "d", "password": "hunter2"}), "username is missing"),
            (json!({"username": "u", "password": "hunter2"}), "domain is missing"),
            (json!({"username": "u", "domain": "d"}), "neither ha1 nor password"),
            (json!({"username": "u", "domain": "d", "password": ""}), "password is empty"),
            (json!({"username": "u", "domain": "d", "password": 7}), "password must be a string"),
            (json!({"username": "u", "domain": "d", "ha1": "hunter2"}), "ha1 must be 32"),
            (json!({"username": "u", "domain": "d", "ha1": "z".repeat(32)}), "only hex digits"),
            (json!({"username": "u", "domain": "d", "ha1": 1}), "ha1 must be a string"),
            (json!({"username": "u", "domain": "d", "password": "p", "ha1b": []}), "ha1b must be"),
            (json!({"username": "u:x", "domain": "d", "password": "hunter2"}), "username contains"),
            (json!("hunter2"), "not string"),
        ];
        for (doc, expected) in cases {
            let err = credential_row(&doc, "subscriber", false).unwrap_err().to_string();
            assert!(err.contains(expected), "{doc}: got {err:?}, want {expected:?}");
            assert!(!err.contains("hunter2"), "secret leaked into {err:?}");
        }
    }

    #[test]
    fn fingerprint_changes_with_content_and_id_only() {
        let a = domain_row(&json!({"name": "a.org"}), "domain").unwrap();
        let same = domain_row(&json!({"name": "a.org", "extra": 1}), "domain").unwrap();
        let other_did = domain_row(&json!({"name": "a.org", "did": "x"}), "domain").unwrap();

        assert_eq!(a.fingerprint(1), same.fingerprint(1));
        assert_ne!(a.fingerprint(1), a.fingerprint(2));
        assert_ne!(a.fingerprint(1), other_did.fingerprint(1));
    }

    fn field(row: &Row, name: &str) -> String {
        row.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap()
    }
}
