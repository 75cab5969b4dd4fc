//! Loading the module: refused cleanly where it cannot work (Redis 7.0, bad settings), loadable
//! at runtime with MODULE LOAD, configurable through CONFIG SET with clear refusals.

mod common;
use common::*;

const TOO_OLD: &str = "kamsync needs Redis 7.2 or newer";

#[test]
fn redis_7_0_refuses_the_module_at_start_up_with_a_clear_message() {
    let (status, log) = Server::run_to_exit(Options::new(Flavor::Redis70));

    assert!(!status.success());
    assert!(log.contains(TOO_OLD), "log:\n{log}");
    assert!(!log.contains("panicked"), "log:\n{log}");
}

#[test]
fn redis_7_0_refuses_module_load_at_runtime_and_keeps_serving() {
    let server = Options::new(Flavor::Redis70).without_module().start();
    let mut con = server.connect();

    let loaded: redis::RedisResult<String> =
        cmd("MODULE").arg("LOAD").arg(module_path().to_str().unwrap()).query(&mut con);

    assert!(loaded.is_err());
    assert!(server.log().contains(TOO_OLD));
    // Nothing of kamsync is left registered: no settings, no command, and writes (which a
    // dangling keyspace subscription would crash on) still work.
    let settings: Vec<String> = cmd("CONFIG").arg("GET").arg("kamsync.*").query(&mut con).unwrap();
    assert!(settings.is_empty(), "{settings:?}");
    let status: redis::RedisResult<redis::Value> = cmd("KAMSYNC.STATUS").query(&mut con);
    assert!(status.is_err());
    let _: () = cmd("SET").arg("sipdomain:1").arg("x").query(&mut con).unwrap();
    let _: () = cmd("DEL").arg("sipdomain:1").query(&mut con).unwrap();
    let pong: String = cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
}

on_every_server! {
    /// MODULE LOAD into a running server (with arguments) starts syncing at once.
    fn module_load_at_runtime_syncs_from_then_on(flavor: Flavor) {
        let server = Options::new(flavor).without_module().start();
        let mut con = server.connect();

        let _: () = cmd("MODULE").arg("LOAD").arg(module_path().to_str().unwrap()).arg("domain-table").arg("dom").query(&mut con).unwrap();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));

        assert_eq!(row_id(&mut con, "dom:entry::a.org"), 1);
        let table: Vec<String> = cmd("CONFIG").arg("GET").arg("kamsync.domain-table").query(&mut con).unwrap();
        assert_eq!(table, ["kamsync.domain-table", "dom"]);
    }
}

on_every_server! {
    /// Invalid values are refused by CONFIG SET with a message naming the rule; valid ones
    /// take effect for the next write.
    fn config_set_refuses_invalid_values_and_applies_valid_ones(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        let set = |con: &mut Connection, name: &str, value: &str| -> redis::RedisResult<()> {
            cmd("CONFIG").arg("SET").arg(format!("kamsync.{name}")).arg(value).query(con)
        };

        let refusals = [
            ("domain-prefix", "", "must not be empty"),
            ("domain-prefix", "credential:", "overlap"),
            ("credential-prefix", "subscriber:", "overlaps kamsync's own key space"),
            ("domain-table", "a:b", "contains ':'"),
            ("subscriber-table", "domain", "must differ"),
            ("reload-stream", "", "must not be empty"),
            ("reload-stream-maxlen", "0", ""),
            ("last-modified-format", "iso", ""),
            ("audit", "maybe", ""),
        ];
        for (name, value, why) in refusals {
            let err = set(&mut con, name, value).unwrap_err().to_string();
            assert!(err.contains(why), "{name}={value:?}: {err}");
        }
        set(&mut con, "domain-prefix", "dom/").unwrap();
        json_set(&mut con, "dom/1", &json!({"name": "a.org"}));
        json_set(&mut con, "sipdomain:1", &json!({"name": "b.org"}));

        assert_eq!(keys(&mut con, "domain:entry::*"), ["domain:entry::a.org".to_owned()].into());
    }
}

on_every_server! {
    /// A bad setting given at start-up fails the module load with the reason, rather than
    /// running with the default.
    fn invalid_startup_settings_fail_the_load_with_the_reason(flavor: Flavor) {
        let cases = [
            (vec!["domain-prefix", "domain:"], "overlaps kamsync's own key space"),
            (vec!["audit", "maybe"], "audit must be yes or no"),
            (vec!["no-such-setting", "1"], "unknown loadmodule argument 'no-such-setting'"),
            (vec!["last-modified-format", "iso"], "must be datetime or epoch"),
        ];
        for (args, why) in cases {
            let (status, log) = Server::run_to_exit(Options::new(flavor).module_args(&args));
            assert!(!status.success(), "{args:?} accepted");
            assert!(log.contains(why), "{args:?}: log lacks {why:?}:\n{log}");
        }
    }
}

/// Cluster mode is detected and said, in the log and in STATUS; writes that cannot be synced
/// are counted, never dropped silently.
#[test]
fn cluster_mode_is_detected_and_reported() {
    let server = Options::new(Flavor::Redis74).arg("cluster-enabled", "yes").start();
    let mut con = server.connect();

    let status: Vec<redis::Value> = cmd("KAMSYNC.STATUS").query(&mut con).unwrap();
    let text = format!("{status:?}");

    assert!(text.contains("yes (unsupported"), "{text}");
    assert!(server.log().contains("cluster mode is not supported yet"));
    assert_eq!(server.kamsync_info(&mut con)["cluster_mode"], "yes");
}

on_every_server! {
    /// MODULE UNLOAD is refused (kamsync's delivery timer and threads must not outlive its
    /// code); the server keeps serving and syncing.
    fn module_unload_is_refused_and_syncing_goes_on(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();

        let unloaded: redis::RedisResult<()> = cmd("MODULE").arg("UNLOAD").arg("kamsync").query(&mut con);
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));

        assert!(unloaded.is_err());
        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 1);
    }
}
