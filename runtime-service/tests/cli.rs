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
        (&["--device", "h200"], "no device \"h200\""),
        (&["--scheduler", "eager"], "overlapped"),
        (&["--max-batch-size", "0"], "max batch size"),
        (&["--kv-block-tokens", "0"], "KV block tokens"),
        (&["--kv-reserve", "lazy"], "paged"),
        (&["--jitter", "1.5"], "jitter"),
        (&["--idle-timeout-ms", "1"], "idle timeout"),
        (&["--lease-ttl-ms", "10"], "at least 100ms"),
        (&["--config", "/nonexistent/runtime.toml"], "cannot read"),
        (&["--instance", ""], "instance name"),
        (&["--grace-period-ms", "soon"], "invalid value"),
        (&["--decode-steps", "0"], "decode steps"),
        (&["--chunked-prefill", "maybe"], "\"on\" or \"off\""),
        (&["--time-scale", "0.5"], "time scale"),
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
    let cases = [
        ("[[models]]\nkey = \"m\"\nmock_lm = \"cuda\"\n", "cuda"),
        ("[[models]]\nkey = \"m\"\nmock_lm = \"webllm\"\npreset = \"gpt-9\"\n", "no architecture preset"),
        ("[[models]]\nkey = \"phi-3-mini\"\nmock_lm = \"webllm\"\nmax_prompt_tokens = 9000\n", "context"),
        ("device = \"tpu\"\n", "no device"),
        ("pipeline_depth = 2\n", "pipeline_depth"),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).expect("write config");
        let out = runtime(&["--config", path.to_str().expect("utf-8 path")]);
        assert_eq!(out.status.code(), Some(64), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn help_documents_the_environment_fallbacks() {
    let out = runtime(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for var in
        ["RUNTIME_LISTEN", "RUNTIME_MEMORY_ADDR", "RUNTIME_CONFIG", "RUNTIME_DEVICE", "RUNTIME_SCHEDULER"]
    {
        assert!(help.contains(var), "{var} missing from --help");
    }
}

/// The README's newcomer path: `cargo run -p runtime-service` must pick the service among the
/// package's two binaries (the demo is the other).
#[test]
fn cargo_run_picks_the_service_binary() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).expect("manifest");
    let package: toml::Table = toml::from_str(&manifest).expect("manifest parses");
    let default_run = package.get("package").and_then(|p| p.get("default-run")).and_then(|d| d.as_str());
    assert_eq!(default_run, Some("runtime-service"));
}
