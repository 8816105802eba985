//! runtime-service refuses a bad configuration with exit code 64, before binding any port.

use std::process::{Command, Output};

fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime-service"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run runtime-service")
}

#[test]
fn bad_configuration_is_refused_before_binding() {
    // A taken port: binding first would fail with exit 1, not the 64 of a refused config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let listen = taken.local_addr().expect("addr").to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--memory-addr", "127.0.0.1:50051"], "http://host:port"),
        (&["--pipeline-depth", "0"], "pipeline depth"),
        (&["--max-concurrent", "0"], "max concurrent"),
        (&["--retry-attempts", "0"], "retry attempts"),
        (&["--idle-timeout-ms", "1"], "idle timeout"),
        (&["--config", "/nonexistent/runtime.toml"], "cannot read"),
        (&["--instance", ""], "instance name"),
        (&["--grace-period-ms", "soon"], "invalid value"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--listen", listen.as_str()];
        all.extend_from_slice(args);
        let out = runtime(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
    }
}

#[test]
fn a_config_file_with_bad_models_is_refused() {
    let dir = std::env::temp_dir().join(format!("runtime-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("runtime.toml");
    let bad_engine = "[[models]]\nkey = \"m\"\nengine = \"cuda\"\nuniform_bytes = 1\nkv_bytes_per_token = 1\n\
                      activation_bytes_per_token = 1\nmax_tokens_limit = 1\nmax_prompt_tokens = 1\n";
    std::fs::write(&path, bad_engine).expect("write config");
    let out = runtime(&["--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn help_documents_the_environment_fallbacks() {
    let out = runtime(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ["RUNTIME_LISTEN", "RUNTIME_MEMORY_ADDR", "RUNTIME_CONFIG", "RUNTIME_PIPELINE_DEPTH"] {
        assert!(help.contains(var), "{var} missing from --help");
    }
}
