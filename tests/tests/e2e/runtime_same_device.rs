//! Both binaries started bare with the same `--device`, for every preset, as an operator would:
//! memory-service's pools are sized for what runtime-service loads on that device, so the runtime
//! becomes SERVING. A config file that preloads more than the device holds is refused at start.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc::RecvTimeoutError,
    time::Duration,
};

use e2e::{
    process::{Process, binary},
    wait_serving,
};
use serving::device::DeviceSpec;

const LOG: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info,runtime_service=info")];

/// Far beyond a preload (one lease per model): reaching it means the runtime waits for memory
/// that will never come, which is the defect this guards against.
const READY_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_binaries_on_the_same_device_become_serving_for_every_preset() {
    for device in DeviceSpec::preset_names() {
        let memory = Process::start("memory-service", &["--device", &device], LOG, false);
        let memory_addr = format!("http://{}", memory.addr);
        let args = ["--device", device.as_str(), "--memory-addr", memory_addr.as_str()];
        let runtime = Process::start("runtime-service", &args, LOG, false);
        let channel = runtime.channel().await;
        let serving =
            tokio::time::timeout(READY_WITHIN, wait_serving(channel, "runtime.v1.RuntimeService")).await;
        let logs = runtime.logs.lock().map(|l| l.join("\n")).unwrap_or_default();
        assert!(serving.is_ok(), "{device}: runtime not SERVING within {READY_WITHIN:?}; it logged:\n{logs}");
        if device == "webgpu-laptop" {
            // 16 GB of Llama-3.1-8B cannot fit 8 GiB: the bare runtime serves without it and says so.
            assert!(
                logs.lines().any(|l| l.contains("default model not served") && l.contains("llama-3.1-8b")),
                "{logs}"
            );
        }
        runtime.stop();
        memory.stop();
    }
}

#[test]
fn a_config_file_preloading_more_than_the_device_holds_exits_64_with_the_numbers() {
    let dir = std::env::temp_dir().join(format!("same-device-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("runtime.toml");
    std::fs::write(&path, "[[models]]\nkey = \"llama-3.1-8b\"\nmock_lm = \"webllm\"\npreload = true\n")
        .expect("write config");
    let mut child = Command::new(binary("runtime-service"))
        .args(["--device", "webgpu-laptop", "--listen", "127.0.0.1:0", "--admin-listen", "off"])
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run runtime-service");
    // Read its log until it exits (stderr closes), bounded: a runtime that starts instead of
    // refusing must fail this test, not hang it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => lines.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("runtime-service started instead of refusing its config:\n{}", lines.join("\n"));
            }
        }
    }
    let status = child.wait().expect("wait");
    std::fs::remove_dir_all(&dir).ok();
    let stderr = lines.join("\n");
    assert_eq!(status.code(), Some(serving::EXIT_CONFIG), "{stderr}");
    // The weights, the device's usable bytes, and the model.
    for needle in ["16060522496", "7730941133", "llama-3.1-8b"] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
}
