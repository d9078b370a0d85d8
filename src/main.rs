//! The `callgate` command: serve, check, keygen, simulator.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use callgate::config::{LogSettings, Settings};
use callgate::policy::{Policies, key_hash};
use callgate::server::{Gateway, redaction_hash_key};
use callgate::simulator::Simulator;

#[derive(Parser)]
#[command(
    name = "callgate",
    version,
    about = "Policy gateway for outbound AI phone calls"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file.
        #[arg(
            long,
            short,
            env = "CALLGATE_CONFIG",
            default_value = "config.example.toml"
        )]
        config: PathBuf,
    },
    /// Validate the configuration, every tenant policy, list and schema; exit non-zero on error.
    Check {
        #[arg(
            long,
            short,
            env = "CALLGATE_CONFIG",
            default_value = "config.example.toml"
        )]
        config: PathBuf,
    },
    /// Make a new tenant key and print it with the hash line for the tenant's policy.
    Keygen {
        /// The tenant the key is for.
        #[arg(long)]
        tenant: String,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run the Ringyo simulator on its own (no gateway). Places no real calls.
    Simulator {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// The account key requests must carry.
        #[arg(long, env = "RINGYO_SIM_API_KEY", default_value = "sim-account-key")]
        api_key: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit file's hash chain; exit non-zero naming the first broken line.
    Verify {
        /// The audit file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Keygen { tenant } => keygen(&tenant),
        Command::Serve { config } => run(serve(config)),
        Command::Simulator { listen, api_key } => run(simulator(listen, api_key)),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match callgate::audit::verify(&file) {
            Ok(lines) => {
                println!("{}: {lines} line(s), the chain is intact", file.display());
                ExitCode::SUCCESS
            }
            Err((line, reason)) => {
                eprintln!("{}: {reason}", file.display());
                let _ = line;
                ExitCode::FAILURE
            }
        },
    }
}

fn run(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(future),
        Err(e) => {
            eprintln!("callgate: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: PathBuf) -> ExitCode {
    let settings = match Settings::load(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("callgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = callgate::telemetry::init(&settings.log, &settings.telemetry);
    let gateway = match Gateway::start(settings).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("callgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signals(&gateway).await;
    gateway.shutdown().await;
    tracing::info!("stopped");
    telemetry.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(unix)]
async fn wait_for_signals(gateway: &Gateway) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => {
                match gateway.reload_policies() {
                    Ok(tenants) => tracing::info!(tenants, "policies reloaded"),
                    Err(errors) => {
                        for e in errors {
                            tracing::error!(error = %e, "policy reload refused; the old policies stay in force");
                        }
                    }
                }
                if let Err(e) = gateway.reopen_audit() {
                    tracing::error!(error = %e, "audit trail not reopened");
                }
                match gateway.reload_tls() {
                    Ok(true) => tracing::info!("TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "TLS reload refused; the old certificate stays in use"),
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_gateway: &Gateway) {
    let _ = tokio::signal::ctrl_c().await;
}

fn check(config: &Path) -> ExitCode {
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(text) = std::fs::read_to_string(config) {
        for key in Settings::inline_secrets(&text) {
            eprintln!(
                "warning: {}: {key} is written inline; use the environment or a *_file key",
                config.display()
            );
        }
    }
    let tenant_dir = settings.policies.dir.join("tenants");
    for entry in std::fs::read_dir(&tenant_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let inline = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("webhooks")?.get("secret").map(|_| ()))
            .is_some();
        if inline {
            eprintln!(
                "warning: {}: webhooks.secret is written inline; use secret_env or secret_file",
                entry.path().display()
            );
        }
    }
    let hash_key = match redaction_hash_key(&settings) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Policies::load(&settings.policies.dir, &hash_key) {
        Ok(p) => {
            println!(
                "ok: {} and {} tenant(s) in {}: {}",
                config.display(),
                p.tenants.len(),
                settings.policies.dir.display(),
                p.tenants.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn keygen(tenant: &str) -> ExitCode {
    let key = format!("cg_{}", hex::encode(rand::random::<[u8; 24]>()));
    println!("tenant: {tenant}");
    println!("key:    {key}    (give this to the tenant; it is not stored anywhere)");
    println!();
    println!("Add the hash to policies/tenants/{tenant}.toml:");
    println!("key_sha256 = [\"{}\"]", hex::encode(key_hash(&key)));
    ExitCode::SUCCESS
}

async fn simulator(listen: SocketAddr, api_key: String) -> ExitCode {
    let _telemetry = callgate::telemetry::init(&LogSettings::default(), &Default::default());
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("callgate simulator: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sim = Simulator::spawn(listener, Default::default(), api_key);
    tracing::warn!(url = %sim.url(), "Ringyo simulator listening; no real calls are placed");
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
