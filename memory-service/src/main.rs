//! The memory-service binary: flags and environment → validated [`Config`] → [`run`].

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use memory_service::{Config, run};

serving::launch_args!(LaunchArgs, "MEMORY_", "127.0.0.1:50051", "127.0.0.1:9464");
serving::security_args!(SecurityArgs, "MEMORY_");

/// Leases named pools of simulated device memory over gRPC (memory.v1.MemoryService).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    launch: LaunchArgs,
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
        return serving::launch::print_config(args.into_config(), pools_json);
    }
    let launch = args.launch.launch("memory-service");
    serving::launch::launch(launch, move || args.into_config(), run).await
}

/// `--print-pools`: the pools, as one JSON object.
fn pools_json(config: &Config) -> String {
    let pools: Vec<String> = config.pools.iter().map(|p| format!(r#""{}":{}"#, p.name, p.capacity)).collect();
    format!(r#"{{"pools":{{{}}}}}"#, pools.join(","))
}
