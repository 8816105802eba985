//! The binary refuses a bad configuration with exit code 64 before binding any port.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_memory-service"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run memory-service")
}

#[test]
fn bad_configuration_exits_64_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--pool", "Bad_Name=1GiB"], "lowercase"),
        (&["--pool", "kv-cache"], "NAME=SIZE"),
        (&["--pool", "kv-cache=12 parsecs"], "unknown unit"),
        (&["--pool", "kv-cache=0"], "greater than zero"),
        (&["--default-ttl-ms", "0"], "default TTL"),
        (&["--config", "/nonexistent/memory.toml"], "cannot read"),
        // Port 1 would need privileges: exit 64 proves validation happens before any bind.
        (&["--listen", "127.0.0.1:1", "--event-buffer", "0"], "event buffer"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
    }
}

#[test]
fn malformed_flags_exit_64_and_help_exits_0() {
    for args in [&["--no-such-flag"][..], &["--listen", "not-an-address"], &["--max-ttl-ms", "-5"]] {
        assert_eq!(run(args).status.code(), Some(64), "{args:?}");
    }
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("MEMORY_LISTEN"), "env fallbacks are documented");
}
