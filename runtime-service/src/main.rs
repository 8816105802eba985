//! The runtime-service binary: flags and environment → validated [`Config`] → [`run`].

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use rand::{TryRng, rngs::SysRng};
use runtime_service::{Config, config, run};

serving::launch_args!(LaunchArgs, "RUNTIME_", "127.0.0.1:50052", "127.0.0.1:9465");
serving::security_args!(SecurityArgs, "RUNTIME_");

/// Streams generated tokens over gRPC (runtime.v1.RuntimeService), with memory leased from
/// memory-service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    launch: LaunchArgs,
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
        return serving::launch::print_config(args.into_config(), memory_json);
    }
    let launch = args.launch.launch("runtime-service");
    serving::launch::launch(launch, move || args.into_config(), run).await
}

/// `--print-memory`: what the configuration needs from memory-service, as one JSON object.
fn memory_json(config: &Config) -> String {
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
    format!(
        r#"{{"device":"{}","activation_bytes":{},"preload_weight_bytes":{},"models":[{}]}}"#,
        config.device.name,
        config.activation_bytes(),
        preload,
        models.join(",")
    )
}
