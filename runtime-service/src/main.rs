//! The runtime-service binary: flags and environment → validated [`Config`] → [`run`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use rand::{TryRng, rngs::SysRng};
use runtime_service::{Config, config, run};
use serving::launch::Launch;

serving::security_args!(SecurityArgs, "RUNTIME_");

/// Streams generated tokens over gRPC (runtime.v1.RuntimeService), with memory leased from
/// memory-service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "RUNTIME_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Address of the admin HTTP port (Prometheus metrics at /metrics), or "off".
    #[arg(long, env = "RUNTIME_ADMIN_LISTEN", default_value = "127.0.0.1:9465")]
    admin_listen: String,
    /// Log format: "text" (human-readable) or "json" (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: serving::telemetry::LogFormat,
    /// memory-service endpoint.
    #[arg(long, env = "RUNTIME_MEMORY_ADDR", default_value = "http://127.0.0.1:50051")]
    memory_addr: String,
    /// TOML file with the device, models and limits (see deploy/runtime-service.toml). Flags
    /// override it.
    #[arg(long, env = "RUNTIME_CONFIG")]
    config: Option<PathBuf>,
    /// Name of this instance on its memory leases (default: runtime-<random>). In Kubernetes,
    /// the pod name.
    #[arg(long, env = "RUNTIME_INSTANCE")]
    instance: Option<String>,
    #[command(flatten)]
    settings: config::Overrides,
    #[command(flatten)]
    security: SecurityArgs,
    /// PEM CA that signed memory-service's certificate: TLS to memory-service (the address must
    /// be https://).
    #[arg(long, env = "RUNTIME_MEMORY_TLS_CA")]
    memory_tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate presented to memory-service (mutual TLS), with --memory-tls-key.
    #[arg(long, env = "RUNTIME_MEMORY_TLS_CERT")]
    memory_tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --memory-tls-cert.
    #[arg(long, env = "RUNTIME_MEMORY_TLS_KEY")]
    memory_tls_key: Option<std::path::PathBuf>,
    /// File holding the bearer token this runtime presents to memory-service.
    #[arg(long, env = "RUNTIME_MEMORY_TOKEN_FILE")]
    memory_token_file: Option<std::path::PathBuf>,
    /// Print what this configuration needs from memory-service (device, activations, each model's
    /// weights and whether it is preloaded) as JSON, and exit without serving: lets deployment
    /// checks size memory-service's pools from the binary itself.
    #[arg(long)]
    print_memory: bool,
}

impl Args {
    fn into_config(self) -> Result<Config, String> {
        let layered = config::layered(self.config.as_deref(), self.settings).map_err(|e| e.to_string())?;
        let mut config = layered.config;
        config.memory_addr = self.memory_addr;
        config.instance = self
            .instance
            .unwrap_or_else(|| format!("runtime-{:08x}", SysRng.try_next_u64().unwrap_or_default() as u32));
        self.security.apply(&mut config.security)?;
        config.memory_auth.tls_ca = self.memory_tls_ca.or(config.memory_auth.tls_ca);
        config.memory_auth.token_file = self.memory_token_file.or(config.memory_auth.token_file);
        config.memory_auth.tls_identity = match (self.memory_tls_cert, self.memory_tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => config.memory_auth.tls_identity,
            _ => return Err("--memory-tls-cert and --memory-tls-key go together".into()),
        };
        // Once the device and the token budget are final: the embedded models are trimmed to what
        // that device holds (the models memory-service --device sizes `uniforms` for); models a
        // file lists are the operator's choice, checked by `validate` instead.
        if !layered.lists_models {
            for (model, reason) in config.serve_fitting_defaults().map_err(|e| e.to_string())? {
                tracing::warn!(%model, device = %config.device.name, %reason, "default model not served on this device");
            }
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = match serving::launch::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    if args.print_memory {
        return print_memory(args);
    }
    let launch = Launch {
        service: "runtime-service",
        listen: args.listen,
        admin_listen: args.admin_listen.clone(),
        log_format: args.log_format,
    };
    serving::launch::launch(launch, move || args.into_config(), run).await
}

/// `--print-memory`: the validated configuration's memory needs, as one JSON object.
#[allow(clippy::print_stdout, clippy::print_stderr)] // the output is the point
fn print_memory(args: Args) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            return ExitCode::from(serving::EXIT_CONFIG as u8);
        }
    };
    let models: Vec<String> = config
        .models
        .iter()
        .map(|m| {
            format!(
                r#"{{"key":"{}","preload":{},"weight_bytes":{}}}"#,
                m.key,
                m.preload,
                m.arch.weight_bytes()
            )
        })
        .collect();
    let preload: u64 = config.models.iter().filter(|m| m.preload).map(|m| m.arch.weight_bytes()).sum();
    println!(
        r#"{{"device":"{}","activation_bytes":{},"preload_weight_bytes":{},"models":[{}]}}"#,
        config.device.name,
        config.activation_bytes(),
        preload,
        models.join(",")
    );
    ExitCode::SUCCESS
}
