//! Module configuration: `kamsync.<name>` through redis.conf, `loadmodule` arguments and
//! CONFIG GET/SET.
//!
//! All values live in one [`Config`] behind a lock; each registered setting is an accessor into
//! it. A change is applied to a copy, the whole copy is validated (so that rules across settings,
//! such as "the two entity prefixes must not overlap", hold), and only then stored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use redis_module::configuration::{
    register_bool_configuration, register_enum_configuration, register_i64_configuration,
    register_string_configuration, ConfigurationContext, ConfigurationFlags,
    EnumConfigurationValue,
};
use redis_module::{raw, ConfigurationValue, Context, RedisError, RedisString};

use crate::mapping::{check_name, Kind};

/// How `last_modified` is written into domain rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastModifiedFormat {
    /// `YYYY-MM-DD HH:MM:SS`, 24-hour clock, server local time (as db_redis writes DATETIME).
    Datetime = 0,
    /// Integer seconds since the Unix epoch (matches the `int` type of the shipped db_redis
    /// schema file).
    Epoch = 1,
}

impl TryFrom<i32> for LastModifiedFormat {
    type Error = RedisError;
    fn try_from(v: i32) -> Result<Self, RedisError> {
        match v {
            0 => Ok(LastModifiedFormat::Datetime),
            1 => Ok(LastModifiedFormat::Epoch),
            _ => Err(RedisError::Str("last-modified-format must be datetime or epoch")),
        }
    }
}

impl From<LastModifiedFormat> for i32 {
    fn from(v: LastModifiedFormat) -> i32 {
        v as i32
    }
}

impl EnumConfigurationValue for LastModifiedFormat {
    fn get_options(&self) -> (Vec<String>, Vec<i32>) {
        (vec!["datetime".into(), "epoch".into()], vec![0, 1])
    }
}

/// Every setting, with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub domain_prefix: String,
    pub credential_prefix: String,
    pub domain_table: String,
    pub subscriber_table: String,
    pub domain_sequence: String,
    pub subscriber_sequence: String,
    pub reload_stream: String,
    pub reload_stream_maxlen: i64,
    /// Kamailio JSON-RPC URLs that get `domain.reload` (see `reload.rs`); empty: off.
    pub reload_targets: String,
    pub last_modified_format: LastModifiedFormat,
    pub audit: bool,
    pub store_password: bool,
}

/// Hash that holds kamsync's own per-entity state for one kind (see `store.rs`).
pub const STATE_KEY_PREFIX: &str = "kamsync:state:";

impl Default for Config {
    fn default() -> Self {
        Config {
            domain_prefix: "sipdomain:".into(),
            credential_prefix: "credential:".into(),
            domain_table: "domain".into(),
            subscriber_table: "subscriber".into(),
            domain_sequence: "id:sequence:domain".into(),
            subscriber_sequence: "id:sequence:subscriber".into(),
            reload_stream: "reload:domain".into(),
            reload_stream_maxlen: 1000,
            reload_targets: String::new(),
            last_modified_format: LastModifiedFormat::Datetime,
            audit: true,
            store_password: false,
        }
    }
}

impl Config {
    /// The kind of entity a key names, by prefix.
    pub fn kind_of(&self, key: &[u8]) -> Option<Kind> {
        if key.starts_with(self.domain_prefix.as_bytes()) {
            Some(Kind::Domain)
        } else if key.starts_with(self.credential_prefix.as_bytes()) {
            Some(Kind::Credential)
        } else {
            None
        }
    }

    pub fn table(&self, kind: Kind) -> &str {
        match kind {
            Kind::Domain => &self.domain_table,
            Kind::Credential => &self.subscriber_table,
        }
    }

    pub fn sequence(&self, kind: Kind) -> &str {
        match kind {
            Kind::Domain => &self.domain_sequence,
            Kind::Credential => &self.subscriber_sequence,
        }
    }

    pub fn prefix(&self, kind: Kind) -> &str {
        match kind {
            Kind::Domain => &self.domain_prefix,
            Kind::Credential => &self.credential_prefix,
        }
    }

    /// Checks the rules that span settings. The message names the setting to change.
    pub fn validate(&self) -> Result<(), String> {
        let all_strings = [
            ("domain-prefix", &self.domain_prefix),
            ("credential-prefix", &self.credential_prefix),
            ("domain-sequence", &self.domain_sequence),
            ("subscriber-sequence", &self.subscriber_sequence),
            ("reload-stream", &self.reload_stream),
        ];
        for (name, value) in all_strings {
            if value.chars().any(char::is_control) {
                return Err(format!("kamsync.{name} must not contain control characters"));
            }
        }
        for (name, table) in
            [("domain-table", &self.domain_table), ("subscriber-table", &self.subscriber_table)]
        {
            check_name(table).map_err(|why| format!("kamsync.{name} {why}"))?;
        }
        if self.domain_table == self.subscriber_table {
            return Err("kamsync.domain-table and kamsync.subscriber-table must differ".into());
        }
        let plain_keys = [
            ("domain-sequence", &self.domain_sequence),
            ("subscriber-sequence", &self.subscriber_sequence),
            ("reload-stream", &self.reload_stream),
        ];
        for (name, key) in plain_keys {
            if key.is_empty() {
                return Err(format!("kamsync.{name} must not be empty"));
            }
        }
        let prefixes = [
            ("domain-prefix", &self.domain_prefix),
            ("credential-prefix", &self.credential_prefix),
        ];
        for (name, prefix) in prefixes {
            if prefix.is_empty() {
                return Err(format!("kamsync.{name} must not be empty: it would match every key"));
            }
        }
        if overlaps(&self.domain_prefix, &self.credential_prefix) {
            return Err(format!(
                "kamsync.domain-prefix '{}' and kamsync.credential-prefix '{}' overlap: a key \
                 would belong to both kinds",
                self.domain_prefix, self.credential_prefix
            ));
        }
        // kamsync's own keys must never look like entities.
        let own_keys = [
            format!("{}:entry::", self.domain_table),
            format!("{}:entry::", self.subscriber_table),
            self.domain_sequence.clone(),
            self.subscriber_sequence.clone(),
            self.reload_stream.clone(),
            STATE_KEY_PREFIX.to_owned(),
        ];
        for (name, prefix) in prefixes {
            if let Some(own) = own_keys.iter().find(|own| overlaps(prefix, own)) {
                return Err(format!(
                    "kamsync.{name} '{prefix}' overlaps kamsync's own key space '{own}'"
                ));
            }
        }
        crate::reload::parse_targets(&self.reload_targets)
            .map_err(|why| format!("kamsync.reload-targets: {why}"))?;
        if self.reload_stream_maxlen < 1 {
            return Err("kamsync.reload-stream-maxlen must be at least 1".into());
        }
        Ok(())
    }
}

fn overlaps(a: &str, b: &str) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The current configuration. A change replaces the whole `Arc`, so a job or a task keeps one
/// consistent snapshot for its whole run, for the price of a reference count.
static CONFIG: LazyLock<RwLock<Arc<Config>>> =
    LazyLock::new(|| RwLock::new(Arc::new(Config::default())));

/// Set once the module finished loading; until then a refused value fails the load instead of
/// only being logged (see [`load_refusals`]).
static LOADED: AtomicBool = AtomicBool::new(false);
static LOAD_REFUSALS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The current configuration. Cheap: an uncontended read lock and a reference count.
pub fn get() -> Arc<Config> {
    CONFIG.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
}

/// The kind of entity `key` names under the current prefixes. The keyspace callback asks this
/// for every key written in the server, entity or not: it reads under the lock, without
/// taking a reference to the whole configuration as [`get`] does.
pub fn kind_of(key: &[u8]) -> Option<Kind> {
    CONFIG.read().unwrap_or_else(|poisoned| poisoned.into_inner()).kind_of(key)
}

/// Values refused while the module was loading (from redis.conf or `loadmodule` arguments).
/// Redis only logs such a refusal and keeps the default; kamsync fails the load instead, so a
/// typo in a prefix never syncs the wrong keys silently.
pub fn load_refusals() -> Vec<String> {
    std::mem::take(&mut *LOAD_REFUSALS.lock().unwrap_or_else(|p| p.into_inner()))
}

pub fn mark_loaded() {
    LOADED.store(true, Ordering::Relaxed);
}

fn update(change: impl FnOnce(&mut Config)) -> Result<(), RedisError> {
    let mut current = CONFIG.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut next = Config::clone(&current);
    change(&mut next);
    match next.validate() {
        Ok(()) => {
            *current = Arc::new(next);
            Ok(())
        }
        Err(why) => {
            if !LOADED.load(Ordering::Relaxed) {
                LOAD_REFUSALS.lock().unwrap_or_else(|p| p.into_inner()).push(why.clone());
            }
            Err(RedisError::String(why))
        }
    }
}

/// A string setting: an accessor to one field of [`Config`].
pub struct StrSetting(pub fn(&mut Config) -> &mut String);
/// A boolean setting.
pub struct BoolSetting(pub fn(&mut Config) -> &mut bool);
/// The numeric setting(s).
pub struct IntSetting(pub fn(&mut Config) -> &mut i64);
/// The `last-modified-format` setting.
pub struct FormatSetting;

impl ConfigurationValue<RedisString> for StrSetting {
    fn get(&self, _: &ConfigurationContext) -> RedisString {
        let mut copy = Config::clone(&get());
        RedisString::create(None, self.0(&mut copy).as_str())
    }
    fn set(&self, _: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let value = val.try_as_str().map_err(|_| RedisError::Str("value must be UTF-8"))?;
        update(|config| *self.0(config) = value.to_owned())
    }
}

impl ConfigurationValue<bool> for BoolSetting {
    fn get(&self, _: &ConfigurationContext) -> bool {
        *self.0(&mut Config::clone(&get()))
    }
    fn set(&self, _: &ConfigurationContext, val: bool) -> Result<(), RedisError> {
        update(|config| *self.0(config) = val)
    }
}

impl ConfigurationValue<i64> for IntSetting {
    fn get(&self, _: &ConfigurationContext) -> i64 {
        *self.0(&mut Config::clone(&get()))
    }
    fn set(&self, _: &ConfigurationContext, val: i64) -> Result<(), RedisError> {
        update(|config| *self.0(config) = val)
    }
}

impl ConfigurationValue<LastModifiedFormat> for FormatSetting {
    fn get(&self, _: &ConfigurationContext) -> LastModifiedFormat {
        get().last_modified_format
    }
    fn set(&self, _: &ConfigurationContext, val: LastModifiedFormat) -> Result<(), RedisError> {
        update(|config| config.last_modified_format = val)
    }
}

pub static DOMAIN_PREFIX: StrSetting = StrSetting(|c| &mut c.domain_prefix);
pub static CREDENTIAL_PREFIX: StrSetting = StrSetting(|c| &mut c.credential_prefix);
pub static DOMAIN_TABLE: StrSetting = StrSetting(|c| &mut c.domain_table);
pub static SUBSCRIBER_TABLE: StrSetting = StrSetting(|c| &mut c.subscriber_table);
pub static DOMAIN_SEQUENCE: StrSetting = StrSetting(|c| &mut c.domain_sequence);
pub static SUBSCRIBER_SEQUENCE: StrSetting = StrSetting(|c| &mut c.subscriber_sequence);
pub static RELOAD_STREAM: StrSetting = StrSetting(|c| &mut c.reload_stream);
pub static RELOAD_TARGETS: StrSetting = StrSetting(|c| &mut c.reload_targets);
pub static RELOAD_STREAM_MAXLEN: IntSetting = IntSetting(|c| &mut c.reload_stream_maxlen);
pub static LAST_MODIFIED_FORMAT: FormatSetting = FormatSetting;
pub static AUDIT: BoolSetting = BoolSetting(|c| &mut c.audit);
pub static STORE_PASSWORD: BoolSetting = BoolSetting(|c| &mut c.store_password);

const STRING_SETTINGS: [(&str, &StrSetting); 8] = [
    ("reload-targets", &RELOAD_TARGETS),
    ("domain-prefix", &DOMAIN_PREFIX),
    ("credential-prefix", &CREDENTIAL_PREFIX),
    ("domain-table", &DOMAIN_TABLE),
    ("subscriber-table", &SUBSCRIBER_TABLE),
    ("domain-sequence", &DOMAIN_SEQUENCE),
    ("subscriber-sequence", &SUBSCRIBER_SEQUENCE),
    ("reload-stream", &RELOAD_STREAM),
];
const BOOL_SETTINGS: [(&str, &BoolSetting); 2] =
    [("audit", &AUDIT), ("store-password", &STORE_PASSWORD)];

/// Registers every setting as `kamsync.<name>` and applies the values from redis.conf. A value
/// given as a `loadmodule` argument (`<name> <value>` pairs) becomes that setting's default.
pub fn register(ctx: &Context, args: &[RedisString]) -> Result<(), String> {
    let defaults = Config::default();
    for (name, setting) in STRING_SETTINGS {
        let default = setting.0(&mut defaults.clone()).clone();
        let value = load_arg(args, name)?.unwrap_or(default);
        register_string_configuration(
            ctx,
            name,
            setting,
            &value,
            ConfigurationFlags::DEFAULT,
            None,
        );
    }
    for (name, setting) in BOOL_SETTINGS {
        let value = match load_arg(args, name)?.as_deref() {
            None => *setting.0(&mut defaults.clone()),
            Some("yes") => true,
            Some("no") => false,
            Some(other) => {
                return Err(format!("loadmodule argument {name} must be yes or no, not '{other}'"))
            }
        };
        register_bool_configuration(ctx, name, setting, value, ConfigurationFlags::DEFAULT, None);
    }
    let name = "reload-stream-maxlen";
    let value = match load_arg(args, name)? {
        None => defaults.reload_stream_maxlen,
        Some(text) => text.parse().map_err(|_| {
            format!("loadmodule argument {name} must be a whole number, not '{text}'")
        })?,
    };
    register_i64_configuration(
        ctx,
        name,
        &RELOAD_STREAM_MAXLEN,
        value,
        1,
        1_000_000_000,
        ConfigurationFlags::DEFAULT,
        None,
    );
    let name = "last-modified-format";
    let value = match load_arg(args, name)?.as_deref() {
        None => defaults.last_modified_format,
        Some("datetime") => LastModifiedFormat::Datetime,
        Some("epoch") => LastModifiedFormat::Epoch,
        Some(other) => {
            return Err(format!(
                "loadmodule argument {name} must be datetime or epoch, not '{other}'"
            ))
        }
    };
    register_enum_configuration(
        ctx,
        name,
        &LAST_MODIFIED_FORMAT,
        value,
        ConfigurationFlags::DEFAULT,
        None,
    );
    // SAFETY: the load context is valid; LoadConfigs exists on every server that passed the
    // version check.
    let loaded = unsafe { raw::RedisModule_LoadConfigs.map(|load| load(ctx.ctx)) };
    if loaded != Some(raw::REDISMODULE_OK as i32)
        && LOAD_REFUSALS.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    {
        return Err("a kamsync.* value in the configuration file was refused".into());
    }
    Ok(())
}

/// The value after `name` in the `loadmodule` arguments. Arguments come in `<name> <value>`
/// pairs; `kamsync.<name>` is accepted too. An unknown name is refused, so a typo does not pass
/// silently.
fn load_arg(args: &[RedisString], name: &str) -> Result<Option<String>, String> {
    let mut found = None;
    for pair in args.chunks(2) {
        let key =
            pair[0].try_as_str().map_err(|_| "loadmodule arguments must be UTF-8".to_owned())?;
        let key = key.strip_prefix("kamsync.").unwrap_or(key);
        let Some(value) = pair.get(1) else {
            return Err(format!("loadmodule argument {key} has no value"));
        };
        if !is_setting(key) {
            return Err(format!("unknown loadmodule argument '{key}'"));
        }
        if key == name {
            let value = value
                .try_as_str()
                .map_err(|_| format!("loadmodule argument {name} must be UTF-8"))?;
            found = Some(value.to_owned());
        }
    }
    Ok(found)
}

impl Config {
    /// Every setting by its name (without `kamsync.`) and value as CONFIG GET shows it, in the
    /// order they are registered: what KAMSYNC.STATUS lists.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let mut copy = self.clone();
        let mut out: Vec<(&'static str, String)> =
            STRING_SETTINGS.iter().map(|(name, s)| (*name, s.0(&mut copy).clone())).collect();
        for (name, setting) in BOOL_SETTINGS {
            out.push((name, if *setting.0(&mut copy) { "yes" } else { "no" }.into()));
        }
        out.push(("reload-stream-maxlen", self.reload_stream_maxlen.to_string()));
        let format = match self.last_modified_format {
            LastModifiedFormat::Datetime => "datetime",
            LastModifiedFormat::Epoch => "epoch",
        };
        out.push(("last-modified-format", format.into()));
        out
    }
}

fn is_setting(name: &str) -> bool {
    STRING_SETTINGS.iter().any(|(n, _)| *n == name)
        || BOOL_SETTINGS.iter().any(|(n, _)| *n == name)
        || name == "reload-stream-maxlen"
        || name == "last-modified-format"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn settings_lists_every_registered_setting_once() {
        let settings = Config::default().settings();
        let names: std::collections::BTreeSet<_> = settings.iter().map(|(n, _)| *n).collect();

        assert_eq!(names.len(), settings.len());
        assert_eq!(settings.len(), STRING_SETTINGS.len() + BOOL_SETTINGS.len() + 2);
        assert!(names.iter().all(|name| is_setting(name)));
        assert!(settings.contains(&("audit", "yes".into())));
        assert!(settings.contains(&("last-modified-format", "datetime".into())));
    }

    #[test]
    fn kind_of_matches_by_prefix_only() {
        let config = Config::default();

        assert_eq!(config.kind_of(b"sipdomain:1"), Some(Kind::Domain));
        assert_eq!(config.kind_of(b"credential:\xff"), Some(Kind::Credential));
        assert_eq!(config.kind_of(b"domain:entry::a"), None);
        assert_eq!(config.kind_of(b"sipdomain"), None);
    }

    #[test]
    fn validate_refuses_overlaps_and_empties_with_the_setting_name() {
        type Change = fn(&mut Config);
        let cases: [(Change, &str); 9] = [
            (|c| c.reload_targets = "https://a/RPC".into(), "must start with http://"),
            (|c| c.reload_stream = "a\0b".into(), "must not contain control characters"),
            (|c| c.domain_prefix.clear(), "kamsync.domain-prefix must not be empty"),
            (|c| c.credential_prefix = "sipdomain:x".into(), "overlap"),
            (|c| c.domain_prefix = "domain:".into(), "overlaps kamsync's own key space"),
            (|c| c.credential_prefix = "kamsync:".into(), "overlaps kamsync's own key space"),
            (|c| c.domain_table = "a b".into(), "kamsync.domain-table contains"),
            (|c| c.subscriber_table = "domain".into(), "must differ"),
            (|c| c.reload_stream_maxlen = 0, "at least 1"),
        ];
        for (change, expected) in cases {
            let mut config = Config::default();
            change(&mut config);
            let err = config.validate().unwrap_err();
            assert!(err.contains(expected), "got {err:?}, want {expected:?}");
        }
    }
}
