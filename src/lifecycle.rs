//! What ends calls when events do not: the lease sweeper and the reconciler.
//!
//! The sweeper settles every call whose lease (`max_duration` + grace) has run out, at its full
//! hold, and frees its slot; it also forgets expired idempotency records. It runs at start-up
//! (settling what lapsed while the gateway was down) and every `state.sweep_interval_ms`.
//!
//! The reconciler, where the upstream has `GET /v1/calls/{id}` (`reconcile.enabled`), asks the
//! upstream about live calls that have had no event for `reconcile.quiet_after_secs`, and about
//! those whose lease ends within its next two rounds, and applies its answer: a call the
//! upstream says has ended is settled from that answer (what it used, where the lease would
//! charge its full hold). It asks about [`RECONCILE_CONCURRENCY`] calls at a time.
//!
//! The two run independently: an upstream that hangs on every look-up slows reconciliation
//! (each look-up is bounded by the upstream timeout), never lease expiry.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::Value;

use crate::clock::SharedClock;
use crate::config::{ReconcileSettings, RelaySettings};
use crate::error::GatewayError;
use crate::state::{CallEvent, CallRecord, StateStore, StoreError};
use crate::upstream::Upstream;

/// Upstream look-ups the reconciler has in flight at once.
pub const RECONCILE_CONCURRENCY: usize = 8;

/// See the module docs.
pub struct Lifecycle {
    pub store: Arc<dyn StateStore>,
    pub clock: SharedClock,
    pub upstream: Arc<Upstream>,
    pub reconcile: ReconcileSettings,
    pub final_statuses: Vec<String>,
    /// The audit trail settlements are written to.
    pub audit: Arc<crate::audit::Audit>,
}

impl Lifecycle {
    pub fn new(
        store: Arc<dyn StateStore>,
        clock: SharedClock,
        upstream: Arc<Upstream>,
        reconcile: ReconcileSettings,
        relay: &RelaySettings,
    ) -> Self {
        Lifecycle {
            store,
            clock,
            upstream,
            reconcile,
            final_statuses: relay.final_statuses.clone(),
            audit: Arc::new(crate::audit::Audit::off()),
        }
    }

    /// Settle lapsed leases and purge expired idempotency records, attempts and calls past their
    /// retention; returns the calls settled.
    pub async fn sweep(&self) -> Result<Vec<CallRecord>, StoreError> {
        let now = self.clock.now().as_microsecond();
        let expired = self.store.expire_leases(now).await?;
        for record in &expired {
            crate::metrics::settled(record);
            self.audit.settlement(record, "lease");
            tracing::warn!(
                target: "audit",
                tenant = %record.tenant,
                call_id = record.call_id.as_deref().unwrap_or(""),
                reservation = %record.reservation_id,
                charged = record.charged,
                "lease expired: settled at the full hold"
            );
        }
        self.store.purge_idempotency(now).await?;
        self.store.purge_attempts(now).await?;
        self.store.purge_calls(now).await?;
        Ok(expired)
    }

    /// Read a call object's status and duration (the call object's own field names).
    pub fn event_from_object(&self, object: &Value) -> Option<CallEvent> {
        let status = object.get("status")?.as_str()?.to_string();
        Some(CallEvent {
            call_id: object.get("id").and_then(Value::as_str).map(str::to_string),
            is_final: self.final_statuses.iter().any(|f| f == &status),
            duration: object.get("duration").and_then(Value::as_i64),
            status,
        })
    }

    /// Ask the upstream about one of a tenant's calls and apply its answer: the call as it is
    /// now, and whether this settled it.
    pub async fn refresh(
        &self,
        tenant: &str,
        call_id: &str,
    ) -> Result<Option<(CallRecord, bool)>, GatewayError> {
        let path = format!("/v1/calls/{call_id}");
        let response = self
            .upstream
            .send(Method::GET, &path, None, &crate::hexstr::uuid_v7())
            .await?;
        if !response.status().is_success() {
            return Ok(None);
        }
        let object: Value = serde_json::from_slice(response.body()).unwrap_or_default();
        let Some(event) = self.event_from_object(&object) else {
            return Ok(None);
        };
        let now = self.clock.now().as_microsecond();
        let applied = self
            .store
            .apply_upstream_state(tenant, call_id, event, Some(object), now)
            .await?;
        if let Some((record, true)) = &applied {
            crate::metrics::settled(record);
            self.audit.settlement(record, "reconciliation");
        }
        Ok(applied)
    }

    /// Look up quiet calls at the upstream, [`RECONCILE_CONCURRENCY`] at a time; returns how many
    /// were settled.
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize, StoreError> {
        if !self.reconcile.enabled {
            return Ok(0);
        }
        let now = self.clock.now().as_microsecond();
        let quiet_since = now - (self.reconcile.quiet_after_secs as i64) * 1_000_000;
        // Calls whose lease ends before the next two rounds are asked about too, quiet or not:
        // the lease would settle them at the full hold, where the upstream's answer charges
        // what they really used (a call whose final event was lost near `max_duration`).
        let lapsing_by = now + 2 * (self.reconcile.interval_ms.max(100) as i64) * 1_000;
        let calls = self.store.quiet_calls(quiet_since, lapsing_by, 100).await?;
        let mut lookups = tokio::task::JoinSet::new();
        let mut settled = 0;
        for (tenant, call_id) in calls
            .into_iter()
            .filter_map(|c| Some((c.tenant, c.call_id?)))
        {
            while lookups.len() >= RECONCILE_CONCURRENCY {
                settled += usize::from(
                    lookups
                        .join_next()
                        .await
                        .unwrap_or(Ok(false))
                        .unwrap_or(false),
                );
            }
            let lifecycle = self.clone();
            lookups.spawn(async move { lifecycle.reconcile_one(&tenant, &call_id).await });
        }
        while let Some(done) = lookups.join_next().await {
            settled += usize::from(done.unwrap_or(false));
        }
        Ok(settled)
    }

    /// Ask the upstream about one quiet call; whether that settled it.
    async fn reconcile_one(&self, tenant: &str, call_id: &str) -> bool {
        match self.refresh(tenant, call_id).await {
            Ok(Some((record, true))) => {
                tracing::info!(
                    target: "audit",
                    tenant = %record.tenant,
                    call_id,
                    status = %record.status,
                    charged = record.charged,
                    "settled by reconciliation"
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(call_id, error = %e, "reconciliation failed");
                false
            }
        }
    }

    /// Run the sweeper and the reconciler, each on its own schedule and neither waiting for the
    /// other, until the returned handle is aborted.
    pub fn spawn(self: Arc<Self>, sweep_every: Duration) -> tokio::task::JoinHandle<()> {
        let sweeper = self.clone();
        let sweeping = async move {
            let mut sweep = tokio::time::interval(sweep_every);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                sweep.tick().await;
                if let Err(e) = sweeper.sweep().await {
                    tracing::error!(error = %e, "lease sweep failed");
                }
            }
        };
        let reconciler = self;
        let reconciling = async move {
            let every = Duration::from_millis(reconciler.reconcile.interval_ms.max(100));
            let mut reconcile = tokio::time::interval(every);
            reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                reconcile.tick().await;
                if let Err(e) = reconciler.reconcile().await {
                    tracing::error!(error = %e, "reconciliation failed");
                }
            }
        };
        tokio::spawn(async move {
            // Two tasks, so that a slow upstream look-up never holds up a sweep; aborting this
            // one aborts both.
            let mut both = tokio::task::JoinSet::new();
            both.spawn(sweeping);
            both.spawn(reconciling);
            while both.join_next().await.is_some() {}
        })
    }
}
