//! The composition root: start-up wiring and graceful shutdown. The accept loop is in
//! [`crate::listen`], reloading in [`crate::reload`], the state store's opening in
//! [`crate::state::open`].
//!
//! [`Gateway::start`] loads the policies, starts the built-in simulator when the config asks for
//! it, binds the listener and serves [`crate::stack::app`] until [`Gateway::shutdown`]: then it
//! stops accepting, lets in-flight requests finish (up to `server.shutdown_grace_ms`), and returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::calls::CallReader;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{ConfigError, Secret, Settings, read_secret_file};
use crate::lifecycle::Lifecycle;
use crate::policy::{Policies, PolicyHandle};
use crate::relay::Relay;
pub use crate::reload::Reloader;
use crate::simulator::Simulator;
use crate::stack::{AppContext, app};
use crate::stages::admission::{AdmissionContext, RateLimits, RequestRates};
use crate::stages::idempotency::IdempotencyContext;
use crate::stages::limits::BodyLimits;
use crate::state::{StateStore, StoreError, Usage};
use crate::tls::ReloadableTls;
use crate::upstream::{ClientOptions, Upstream, build_client};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("invalid policies:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<ConfigError>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    simulator: Option<Simulator>,
    reloader: Arc<Reloader>,
    store: Arc<dyn StateStore>,
    lifecycle: Arc<Lifecycle>,
    clock: SharedClock,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    background: JoinHandle<()>,
    /// How long a shutdown waits for requests, then for the work they left behind.
    grace: Duration,
    audit: Arc<crate::audit::Audit>,
}

/// The key for the redaction hash: configured, or random for this process.
pub fn redaction_hash_key(settings: &Settings) -> Result<Vec<u8>, ConfigError> {
    let r = &settings.redaction;
    match (&r.hash_key, &r.hash_key_file) {
        (Some(k), _) => Ok(k.expose().as_bytes().to_vec()),
        (None, Some(file)) => Ok(read_secret_file(file)?.expose().as_bytes().to_vec()),
        (None, None) => {
            tracing::warn!(
                "no redaction.hash_key configured: hashed metadata values are stable only until restart"
            );
            Ok(rand::random::<[u8; 32]>().to_vec())
        }
    }
}

impl Gateway {
    /// Start on the configured listener with the system clock.
    pub async fn start(settings: Settings) -> Result<Gateway, StartupError> {
        Self::start_with(settings, Arc::new(SystemClock), None).await
    }

    /// Start with an injected clock and, optionally, an already bound listener (tests bind
    /// `127.0.0.1:0`).
    pub async fn start_with(
        settings: Settings,
        clock: SharedClock,
        listener: Option<TcpListener>,
    ) -> Result<Gateway, StartupError> {
        crate::metrics::install();
        crate::metrics::spawn_upkeep();
        let hash_key = redaction_hash_key(&settings)?;
        let policies =
            Policies::load(&settings.policies.dir, &hash_key).map_err(StartupError::Policies)?;
        tracing::info!(
            tenants = policies.tenants.len(),
            dir = %settings.policies.dir.display(),
            "policies loaded"
        );
        let policies = PolicyHandle::new(policies);

        // The account key (the simulator's own when none is configured), checked before anything
        // starts: a key that cannot be sent in a header stops the gateway here.
        let key = match settings.upstream_key()? {
            Some(key) => key,
            None if settings.upstream.is_simulator() => {
                Secret::new(format!("sim_{}", uuid::Uuid::new_v4().simple()))
            }
            None => {
                return Err(ConfigError::new(
                    "upstream",
                    None,
                    "no upstream account key configured",
                )
                .into());
            }
        };
        let authorization = crate::upstream::bearer(&key)?;
        let (base, simulator) = if settings.upstream.is_simulator() {
            let bind = SocketAddr::from(([127, 0, 0, 1], 0));
            let sim_listener = TcpListener::bind(bind)
                .await
                .map_err(|source| StartupError::Bind { addr: bind, source })?;
            let sim = Simulator::spawn(
                sim_listener,
                settings.simulator.clone(),
                key.expose().to_string(),
            );
            tracing::warn!(
                simulator = %sim.url(),
                "upstream.url = \"simulator\": calls go to the built-in Ringyo simulator; NO REAL CALLS ARE PLACED"
            );
            (sim.url(), Some(sim))
        } else {
            (settings.upstream.url.clone(), None)
        };
        let (store, shared_rates) = crate::state::open(&settings.state)?;
        let rate_limits = match shared_rates {
            Some(shared) => RequestRates::Shared(shared),
            None => RequestRates::Local(RateLimits::new(clock.clone())),
        };
        let client_options = ClientOptions::from_settings(&settings.upstream)?;
        let client = build_client(&client_options);
        let upstream = Arc::new(Upstream::new(
            &base,
            authorization,
            client,
            settings.upstream.request_timeout(),
        ));

        let tls = match &settings.server.tls {
            Some(t) => Some(Arc::new(ReloadableTls::load(&t.cert_file, &t.key_file)?)),
            None => None,
        };
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(settings.server.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.server.listen,
                    source,
                })?,
        };
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: settings.server.listen,
            source,
        })?;
        let audit = Arc::new(crate::audit::Audit::open(&settings.audit).map_err(|e| {
            ConfigError::new(
                "audit",
                None,
                format!("cannot open the audit trail {:?}: {e}", settings.audit.path),
            )
        })?);
        let lifecycle = Arc::new(Lifecycle {
            audit: audit.clone(),
            ..Lifecycle::new(
                store.clone(),
                clock.clone(),
                upstream.clone(),
                settings.reconcile.clone(),
                &settings.relay,
            )
        });
        // Settle what lapsed while the gateway was down before taking any request. A shared
        // store that is away now is swept once it is back (`/readyz` says why until then).
        let lapsed = match lifecycle.sweep().await {
            Err(StoreError::Unavailable(reason)) => {
                tracing::warn!(%reason, "the state store is unavailable; starting anyway, not ready");
                Vec::new()
            }
            other => other?,
        };
        if !lapsed.is_empty() {
            tracing::warn!(
                calls = lapsed.len(),
                "settled leases that lapsed while stopped"
            );
        }
        let grace = Duration::from_secs(settings.admission.lease_grace_secs);
        let relay_base = settings.relay.public_url.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{addr}")
        });
        let suspensions = Arc::new(crate::suspensions::Suspensions::new(
            store.clone(),
            clock.clone(),
            audit.clone(),
        ));
        let optouts = crate::optouts::OptOutApi {
            store: store.clone(),
            policies: policies.clone(),
            clock: clock.clone(),
            audit: audit.clone(),
        };
        let service = app::<hyper::body::Incoming>(AppContext {
            policies: policies.clone(),
            upstream: upstream.clone(),
            clock: clock.clone(),
            body_limits: BodyLimits {
                max_bytes: settings.server.max_body_bytes,
                read_timeout: Duration::from_millis(settings.server.body_read_timeout_ms),
            },
            max_json_depth: settings.server.max_json_depth,
            admission: AdmissionContext {
                store: store.clone(),
                clock: clock.clone(),
                rate_limits: Arc::new(rate_limits),
                account_max_concurrent: settings.admission.account_max_concurrent_calls,
                suspensions: suspensions.clone(),
                pending_lease_extra: grace + settings.upstream.request_timeout(),
            },
            idempotency: IdempotencyContext {
                store: store.clone(),
                clock: clock.clone(),
                ttl: Duration::from_secs(settings.idempotency.ttl_secs),
                wait: settings.upstream.request_timeout() + Duration::from_secs(2),
            },
            lease_grace: grace,
            relay_base,
            relay: Relay::new(
                store.clone(),
                clock.clone(),
                policies.clone(),
                settings.relay.clone(),
                &client_options,
            )
            .with_audit(audit.clone()),
            reader: CallReader {
                policies: policies.clone(),
                lifecycle: lifecycle.clone(),
            },
            max_requests_in_flight: settings.server.max_requests_in_flight,
            audit: audit.clone(),
            optouts: optouts.clone(),
            consents: crate::consents::ConsentApi {
                store: store.clone(),
                clock: clock.clone(),
                audit: audit.clone(),
            },
        });
        let background = lifecycle.clone().spawn(Duration::from_millis(
            settings.state.sweep_interval_ms.max(10),
        ));
        let (stop, stopped) = oneshot::channel();
        let timeouts = crate::listen::ConnectionLimits {
            header_read: Duration::from_millis(settings.server.header_read_timeout_ms),
            keepalive_idle: Duration::from_millis(settings.server.keepalive_idle_timeout_ms),
            max_connections: settings.server.max_connections,
        };
        let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
        let task = tokio::spawn(crate::listen::serve(
            listener,
            service,
            tls.clone(),
            timeouts,
            grace,
            stopped,
        ));
        let mut stops = vec![stop];
        let mut tasks = vec![task];
        let mut tls_listeners: Vec<Arc<ReloadableTls>> = tls.iter().cloned().collect();
        let reloader_policies = policies.clone();
        let mut admin_addr = None;
        let mut admin_pending = None;
        if let Some(admin_listen) = settings.admin.listen {
            let token = settings.admin_token()?.ok_or_else(|| {
                ConfigError::new("admin", None, "admin.listen needs an admin token")
            })?;
            let admin_tls = match &settings.admin.tls {
                Some(t) => Some(Arc::new(ReloadableTls::load(&t.cert_file, &t.key_file)?)),
                None => None,
            };
            tls_listeners.extend(admin_tls.iter().cloned());
            let admin_listener =
                TcpListener::bind(admin_listen)
                    .await
                    .map_err(|source| StartupError::Bind {
                        addr: admin_listen,
                        source,
                    })?;
            admin_addr = admin_listener.local_addr().ok();
            admin_pending = Some((admin_listener, token, admin_tls));
        }
        let reloader = Arc::new(Reloader {
            policies: reloader_policies,
            policy_dir: settings.policies.dir.clone(),
            hash_key: hash_key.clone(),
            tls: tls_listeners,
            in_order: Arc::default(),
            tls_in_order: std::sync::Mutex::default(),
        });
        if let Some((admin_listener, token, admin_tls)) = admin_pending {
            let service =
                crate::admin::admin_app::<hyper::body::Incoming>(crate::admin::AdminContext {
                    token,
                    reloader: reloader.clone(),
                    store: store.clone(),
                    clock: clock.clone(),
                    audit: audit.clone(),
                    optouts: optouts.clone(),
                    max_json_depth: settings.server.max_json_depth,
                    suspensions: suspensions.clone(),
                });
            let (admin_stop, admin_stopped) = oneshot::channel();
            stops.push(admin_stop);
            tasks.push(tokio::spawn(crate::listen::serve(
                admin_listener,
                service,
                admin_tls,
                timeouts,
                grace,
                admin_stopped,
            )));
            tracing::info!(addr = ?admin_addr, "admin API listening");
        }
        tracing::info!(%addr, upstream = %base, "callgate listening");
        Ok(Gateway {
            addr,
            admin_addr,
            simulator,
            reloader,
            store,
            lifecycle,
            clock,
            stop: stops,
            tasks,
            background,
            grace: Duration::from_millis(settings.server.shutdown_grace_ms),
            audit,
        })
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// A tenant's slots, holds and spend now.
    pub async fn usage(&self, tenant: &str) -> Result<Usage, StoreError> {
        self.store
            .usage(tenant, self.clock.now().as_microsecond())
            .await
    }

    /// Run the lease sweeper once now (tests move the clock, then call this).
    pub async fn sweep_now(&self) -> Result<usize, StoreError> {
        Ok(self.lifecycle.sweep().await?.len())
    }

    /// Run the reconciler once now.
    pub async fn reconcile_now(&self) -> Result<usize, StoreError> {
        self.lifecycle.reconcile().await
    }

    /// The address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The in-process simulator, when `upstream.url = "simulator"`.
    pub fn simulator(&self) -> Option<&Simulator> {
        self.simulator.as_ref()
    }

    /// The admin listener's address, when it is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Reload the policies from disk; on any error the old policies stay in force.
    pub async fn reload_policies(&self) -> Result<usize, Vec<ConfigError>> {
        self.reloader.reload_audited(&self.audit).await
    }

    /// Reopen the audit file at its path (`SIGHUP`, after logrotate moved it).
    pub fn reopen_audit(&self) -> std::io::Result<()> {
        self.audit.reopen()
    }

    /// Reload the listener's certificate and key from their files, for new connections; open
    /// connections carry on. On error the old certificate stays. Without TLS, does nothing.
    pub fn reload_tls(&self) -> Result<bool, ConfigError> {
        self.reloader.reload_tls().map(|n| n > 0)
    }

    /// Stop accepting, drain in-flight requests, and return.
    pub async fn shutdown(mut self) {
        for stop in self.stop.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        // The work requests left behind (the detached half of call requests whose clients
        // left, binds, releases, idempotent answers, webhook deliveries): waited for, within
        // the grace period.
        if !crate::tasks::drain(self.grace).await {
            tracing::warn!(
                pending = crate::tasks::pending(),
                "shutdown grace period over with background work unfinished"
            );
        }
        self.background.abort();
        // Ended, so that nothing of it reaches the store after it is closed (a read it had begun
        // still finishes, and the store's close waits for it).
        let _ = (&mut self.background).await;
        // Binds and idempotent answers are queued, not awaited, on the request path: make them
        // durable, and let the store close its files (SQLite: fold the log into the file and
        // remove it) before the process exits.
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "state store: close at shutdown failed");
        }
    }
}
