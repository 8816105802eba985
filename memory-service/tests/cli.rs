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
        (&["--pool", "kv-cache=0"], "between 1 byte and 4 EiB"),
        (&["--default-ttl-ms", "0"], "default TTL"),
        (&["--config", "/nonexistent/memory.toml"], "cannot read"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
    }
}

#[test]
fn validation_happens_before_binding() {
    // The port is taken: had the binary bound before validating, it would exit 1 ("cannot bind").
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run(&["--listen", &addr, "--event-buffer", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("event buffer"), "{stderr}");
    // And with a valid config the same port is refused by the bind, with exit 1.
    let out = run(&["--listen", &addr]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
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
