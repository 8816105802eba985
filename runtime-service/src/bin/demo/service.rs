//! The demo's child services: started on ephemeral loopback ports, addresses read from their logs
//! (no port guessing, no sleeping), stopped with SIGTERM, killed if the demo exits early.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use proto::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::Error;

/// A child service.
pub struct Service {
    name: String,
    child: Child,
    /// Its gRPC address.
    pub addr: String,
}

impl Service {
    /// Starts `binary` with `args`, logging to `logs/<name>.log`.
    pub fn start(name: &str, binary: &Path, args: &[&str], logs: &Path) -> Result<Self, Error> {
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "off"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot start {}: {e} (run scripts/demo, which builds it)", binary.display())
            })?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening addr=").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_owned());
                }
                let _ = writeln!(log, "{line}");
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("{name} did not start; see its log"))?;
        Ok(Service { name: name.to_owned(), child, addr })
    }

    /// A connected channel.
    pub async fn channel(&self) -> Result<Channel, Error> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?.connect().await?)
    }

    /// A runtime client, once health says SERVING (memory reachable, preload models loaded).
    pub async fn runtime_ready(&self) -> Result<RuntimeServiceClient<Channel>, Error> {
        let channel = self.channel().await?;
        let mut health = HealthClient::new(channel.clone());
        let request = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
        let mut watch = health.watch(request).await?.into_inner();
        while let Some(reply) = watch.next().await {
            if reply?.status() == ServingStatus::Serving {
                return Ok(RuntimeServiceClient::new(channel));
            }
        }
        Err(format!("{} never became ready; see its log", self.name).into())
    }

    /// SIGTERM, then wait.
    pub fn stop(mut self) -> Result<(), Error> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
