//! The `callgate` command: serve, check, keygen, simulator.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use callgate::config::{LogSettings, Settings};
use callgate::policy::{Policies, key_hash};
use callgate::server::{Gateway, redaction_hash_key};
use callgate::simulator::Simulator;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Dry run: would this create-call body be allowed for this tenant (at this instant)? Prints
    /// every stage's verdict as one JSON object; exit 0 allowed, 1 denied, 2 usage or config
    /// error. Reads the state store without changing it; consumes nothing.
    CheckRequest {
        #[arg(
            long,
            short,
            env = "CALLGATE_CONFIG",
            default_value = "config.example.toml"
        )]
        config: PathBuf,
        /// The tenant id the request is judged as.
        #[arg(long)]
        tenant: String,
        /// The create-call JSON body (`-`: standard input).
        #[arg(long)]
        body: PathBuf,
        /// The instant to judge at (RFC 3339), for calling hours and budget periods; default now.
        #[arg(long)]
        at: Option<String>,
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
        /// A TOML file of simulator settings (the `[simulator]` table's keys: timings, account,
        /// `keep_calls`, `[faults]`); the defaults when absent.
        #[arg(long)]
        settings: Option<PathBuf>,
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
        Command::CheckRequest {
            config,
            tenant,
            body,
            at,
        } => check_request(&config, &tenant, &body, at.as_deref()),
        Command::Serve { config } => {
            let settings = match Settings::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("callgate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            run_on_worker(settings.worker_threads(cores()), serve(settings))
        }
        Command::Simulator {
            listen,
            api_key,
            settings,
        } => {
            let settings = match settings.map(|path| {
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|text| {
                        toml::from_str::<callgate::config::SimulatorSettings>(&text)
                            .map_err(|e| format!("{}: {e}", path.display()))
                    })
            }) {
                None => Default::default(),
                Some(Ok(settings)) => settings,
                Some(Err(e)) => {
                    eprintln!("callgate simulator: {e}");
                    return ExitCode::from(2);
                }
            };
            run(simulator(listen, api_key, settings))
        }
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
    run_on(cores(), future)
}

/// The cores this process may run on (1 when unknown).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Run `future` on a runtime of `workers` threads.
fn run_on(workers: usize, future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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

/// Run `future` as a task on a runtime of `workers` threads, not on the main thread: the gateway
/// starts on a request thread. The phone library's and the redaction patterns' regexes keep a
/// cache for the first thread that searches with them and share the others behind a lock; the
/// policies' own numbers (checked as they load) are their first search, and a request thread
/// should be the one that owns them. With one request thread (the default with SQLite on two
/// cores) that is every request's thread; with more, one of them. Reloads load on a blocking
/// thread and leave the request threads as they are (`reload::Reloader::reload_audited`).
fn run_on_worker(
    workers: usize,
    future: impl std::future::Future<Output = ExitCode> + Send + 'static,
) -> ExitCode {
    run_on(workers, async move {
        // A panic goes on as if `block_on` had run the future itself (exit code 101). The task
        // cannot be cancelled (nothing aborts it, and the runtime outlives `block_on`), so an
        // error here is a panic.
        tokio::spawn(future)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    })
}

async fn serve(settings: Settings) -> ExitCode {
    let telemetry = callgate::telemetry::init(&settings.log, &settings.telemetry);
    // Before the gateway listens: from then on a signal is handled, not the default (a SIGTERM
    // or a log rotation's SIGHUP while it starts would otherwise end it without draining).
    let signals = signals();
    let gateway = match Gateway::start(settings).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("callgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signals(&gateway, signals).await;
    gateway.shutdown().await;
    tracing::info!("stopped");
    telemetry.shutdown().await;
    ExitCode::SUCCESS
}

/// `SIGINT`, `SIGTERM` and `SIGHUP`, each a stream made once: a signal that comes while a
/// reload runs is kept and seen when it ends (a `ctrl_c()` made afresh each time round would
/// miss it). `None` if they cannot be had: then `SIGINT` alone stops the gateway.
#[cfg(unix)]
type Signals = Option<[tokio::signal::unix::Signal; 3]>;

#[cfg(unix)]
fn signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    Some([
        signal(SignalKind::interrupt()).ok()?,
        signal(SignalKind::terminate()).ok()?,
        signal(SignalKind::hangup()).ok()?,
    ])
}

#[cfg(unix)]
async fn wait_for_signals(gateway: &Gateway, signals: Signals) {
    let Some([mut int, mut term, mut hup]) = signals else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            // A stop pending beside a reload stops, rather than reloading first.
            biased;
            _ = int.recv() => return,
            _ = term.recv() => return,
            _ = hup.recv() => {
                match gateway.reload_policies().await {
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
type Signals = ();

#[cfg(not(unix))]
fn signals() -> Signals {}

#[cfg(not(unix))]
async fn wait_for_signals(_gateway: &Gateway, _signals: Signals) {
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
    // The account key, where one is configured: readable, and sendable in a header (`serve`
    // refuses to start otherwise).
    if let Err(e) = settings
        .upstream_key()
        .and_then(|key| key.as_ref().map(callgate::upstream::bearer).transpose())
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
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

/// A usage or configuration error of `check-request`: exit 2.
fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("callgate check-request: {message}");
    ExitCode::from(2)
}

fn check_request(config: &Path, tenant: &str, body: &Path, at: Option<&str>) -> ExitCode {
    use std::io::Read;
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    let hash_key = match redaction_hash_key(&settings) {
        Ok(k) => k,
        Err(e) => return usage_error(e),
    };
    let policies = match Policies::load(&settings.policies.dir, &hash_key) {
        Ok(p) => std::sync::Arc::new(p),
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            return usage_error("the policies do not load");
        }
    };
    let Some(tenant) = policies.tenants.get(tenant).cloned() else {
        return usage_error(format!(
            "no tenant {tenant:?} in {}",
            settings.policies.dir.display()
        ));
    };
    let body = if body == Path::new("-") {
        let mut text = Vec::new();
        std::io::stdin().read_to_end(&mut text).map(|_| text)
    } else {
        std::fs::read(body)
    };
    let body = match body {
        Ok(b) => bytes::Bytes::from(b),
        Err(e) => return usage_error(format!("cannot read the body: {e}")),
    };
    let at = match at {
        None => jiff::Timestamp::now(),
        Some(text) => match text.parse::<jiff::Timestamp>() {
            Ok(t) => t,
            Err(e) => return usage_error(format!("--at {text:?} is not an RFC 3339 time: {e}")),
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return usage_error(format!("cannot start the runtime: {e}")),
    };
    let depth = settings.server.max_json_depth;
    let verdict = runtime.block_on(async {
        use callgate::config::StateBackend;
        use callgate::state::StateView;
        let state: Box<dyn StateView> = match settings.state.backend {
            StateBackend::Sqlite => Box::new(
                callgate::state::sqlite::SqliteSnapshot::open(&settings.state.path)
                    .map_err(|e| e.to_string())?,
            ),
            StateBackend::Redis => {
                let (store, _) =
                    callgate::state::open(&settings.state).map_err(|e| e.to_string())?;
                Box::new(store)
            }
        };
        Ok::<_, String>(
            callgate::dryrun::check_request(&policies, &*state, &tenant, body, at, depth).await,
        )
    });
    let verdict = match verdict {
        Ok(v) => v,
        Err(e) => return usage_error(format!("cannot read the state store: {e}")),
    };
    println!("{verdict}");
    match verdict["decision"].as_str() {
        Some("allowed") => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn keygen(tenant: &str) -> ExitCode {
    let key = format!("cg_{}", callgate::hexstr::lower(rand::random::<[u8; 24]>()));
    println!("tenant: {tenant}");
    println!("key:    {key}    (give this to the tenant; it is not stored anywhere)");
    println!();
    println!("Add the hash to policies/tenants/{tenant}.toml:");
    println!(
        "key_sha256 = [\"{}\"]",
        callgate::hexstr::lower(key_hash(&key))
    );
    ExitCode::SUCCESS
}

async fn simulator(
    listen: SocketAddr,
    api_key: String,
    settings: callgate::config::SimulatorSettings,
) -> ExitCode {
    let _telemetry = callgate::telemetry::init(&LogSettings::default(), &Default::default());
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("callgate simulator: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sim = Simulator::spawn(listener, settings, api_key);
    tracing::warn!(url = %sim.url(), "Ringyo simulator listening; no real calls are placed");
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
