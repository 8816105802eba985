//! Service binaries as child processes: built once with the same selection as `scripts/test`,
//! started on ephemeral loopback ports, their addresses read from their logs (no port guessing,
//! no sleeping), stopped with SIGTERM or killed if a test fails first.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

/// The path of service binary `name`, next to the running test or bench, built first (a no-op
/// when current) so a stale binary is never measured.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test executable");
    // Tests and benches live in target/<profile>/deps, binaries (the soak) in target/<profile>.
    let parent = exe.parent().expect("target directory");
    let dir = if parent.file_name().is_some_and(|d| d == "deps") {
        parent.parent().unwrap_or(parent)
    } else {
        parent
    };
    BUILT.call_once(|| {
        let mut build = Command::new(env!("CARGO"));
        // The same selection as scripts/test, so features unify the same way and this is a no-op.
        build.args(["build", "--locked", "--workspace", "--bins"]);
        if dir.file_name().is_some_and(|profile| profile == "release") {
            build.arg("--release");
        }
        let status = build.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("run cargo build");
        assert!(status.success(), "building the service binaries failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing after the build", path.display());
    path
}

/// A service process; killed if dropped before [`Process::stop`].
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// Every line it logged so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Its gRPC address.
    pub addr: String,
    /// Its admin (metrics) address, if it serves one.
    pub admin: Option<String>,
    /// The thread copying its stderr into `logs`: joined by [`Process::stop`], so that every line
    /// the process wrote before it exited is in `logs` when `stop` returns.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The value after `key=` (text logs) or `"key":"` (JSON logs) on a line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(&format!("{key}="))
        .nth(1)
        .map(|a| a.split_whitespace().next().unwrap_or_default())
        .or_else(|| line.split(&format!("\"{key}\":\"")).nth(1)?.split('"').next())
}

impl Process {
    /// Starts service binary `name` with `args` on ephemeral loopback ports (`admin` chooses
    /// whether it serves metrics), with `env` added to a copy of this process's environment.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)], admin: bool) -> Process {
        let admin_listen = if admin { "127.0.0.1:0" } else { "off" };
        Self::spawn(name, &["--listen", "127.0.0.1:0", "--admin-listen", admin_listen], args, env, admin)
    }

    /// Like [`Process::start`] without a metrics port, with `args` naming the address to listen
    /// on (`--listen`): to restart a service where it was.
    pub fn start_at(name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        Self::spawn(name, &["--admin-listen", "off"], args, env, false)
    }

    fn spawn(name: &str, prefix: &[&str], args: &[&str], env: &[(&str, &str)], admin: bool) -> Process {
        let mut command = Command::new(binary(name));
        command.args(prefix).args(args);
        for (key, value) in env {
            if value.is_empty() {
                command.env_remove(key);
            } else {
                command.env(key, value);
            }
        }
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn service");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let keep = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("metrics on /metrics") {
                    let _ = tx.send((true, field(&line, "addr").unwrap_or_default().to_owned()));
                } else if line.contains("listening")
                    && let Some(addr) = field(&line, "addr")
                {
                    let _ = tx.send((false, addr.to_owned()));
                }
                if let Ok(mut logs) = keep.lock() {
                    logs.push(line);
                }
            }
        });
        let (mut addr, mut admin_addr) = (None, None);
        while addr.is_none() || (admin && admin_addr.is_none()) {
            let Ok((is_admin, found)) = rx.recv_timeout(Duration::from_secs(60)) else {
                // Not left running behind the failed test; what it logged says why.
                let _ = child.kill();
                let _ = child.wait();
                let logged = logs.lock().map(|l| l.join("\n")).unwrap_or_default();
                panic!("{name} did not report its address within 60 s (or exited); it logged:\n{logged}");
            };
            if is_admin { admin_addr = Some(found) } else { addr = Some(found) }
        }
        Process { child, logs, addr: addr.unwrap_or_default(), admin: admin_addr, reader: Some(reader) }
    }

    /// SIGTERM, then wait; panics unless it exits cleanly.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(status.success());
        let exit = self.child.wait().expect("wait");
        // The pipe ends with the process: the reader has every line once it returns.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        assert!(exit.success(), "{exit}");
    }

    /// A channel to its gRPC port.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// A channel to its gRPC port once its health reports `service` SERVING (event-driven).
    pub async fn serving(&self, service: &str) -> tonic::transport::Channel {
        let channel = self.channel().await;
        crate::wait_serving(channel.clone(), service).await;
        channel
    }

    /// Its process id (to read its resident memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then wait: the process dies without any cleanup, as in a crash or an OOM kill.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The Prometheus text its admin port serves now.
    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let admin = self.admin.as_deref().expect("started with an admin port");
        let mut stream = std::net::TcpStream::connect(admin).expect("connect admin port");
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
