//! The memory-service binary: flags and environment → validated [`Config`] → [`run`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use memory_service::{Config, run};
use serving::launch::Launch;

serving::security_args!(SecurityArgs, "MEMORY_");

/// Leases named pools of simulated device memory over gRPC (memory.v1.MemoryService).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "MEMORY_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the admin HTTP port (Prometheus metrics at /metrics), or "off".
    #[arg(long, env = "MEMORY_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    admin_listen: String,
    /// Log format: "text" (human-readable) or "json" (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: serving::telemetry::LogFormat,
    /// TOML file with pools and limits (see deploy/memory-service.toml). Flags override it.
    #[arg(long, env = "MEMORY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: memory_service::config::Overrides,
    /// Print the pools this configuration creates (name and bytes) as JSON, and exit without
    /// serving: lets deployment checks compare them with what runtimes preload.
    #[arg(long)]
    print_pools: bool,
    #[command(flatten)]
    security: SecurityArgs,
}

impl Args {
    fn into_config(self) -> Result<Config, String> {
        let mut config = memory_service::config::layered(self.config.as_deref(), self.settings)
            .map_err(|e| e.to_string())?;
        self.security.apply(&mut config.security)?;
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
    if args.print_pools {
        return print_pools(args);
    }
    let launch = Launch {
        service: "memory-service",
        listen: args.listen,
        admin_listen: args.admin_listen.clone(),
        log_format: args.log_format,
    };
    serving::launch::launch(launch, move || args.into_config(), run).await
}

/// `--print-pools`: the validated configuration's pools, as one JSON object.
#[allow(clippy::print_stdout, clippy::print_stderr)] // the output is the point
fn print_pools(args: Args) -> ExitCode {
    match args.into_config() {
        Ok(config) => {
            let pools: Vec<String> =
                config.pools.iter().map(|p| format!(r#""{}":{}"#, p.name, p.capacity)).collect();
            println!(r#"{{"pools":{{{}}}}}"#, pools.join(","));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            ExitCode::from(serving::EXIT_CONFIG as u8)
        }
    }
}
