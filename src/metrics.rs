//! Prometheus metrics, in the text exposition format 0.0.4 (what Prometheus and `promtool check
//! metrics` read), served on the admin listener at `/metrics`.
//!
//! Recorded with the `metrics` facade where things happen (requests, the upstream, settlements,
//! webhook deliveries, policy reloads); the live gauges (slots, holds) are read from the state
//! store at scrape time, for the tenants of the loaded policies. Tenant label values are tenant
//! ids from the policy files only, never from a request.

use std::sync::{Once, OnceLock, RwLock};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::policy::Policies;
use crate::state::{CallRecord, StateStore, StoreError};

pub const REQUESTS: &str = "callgate_requests_total";
pub const REQUEST_DURATION: &str = "callgate_request_duration_seconds";
pub const UPSTREAM_DURATION: &str = "callgate_upstream_duration_seconds";
pub const SLOTS: &str = "callgate_slots_in_use";
pub const ACCOUNT_SLOTS: &str = "callgate_account_slots_in_use";
pub const CREDITS_HELD: &str = "callgate_credits_held";
pub const CREDITS_SPENT: &str = "callgate_credits_spent_total";
pub const CALLS: &str = "callgate_calls_total";
pub const CALL_DURATION: &str = "callgate_call_duration_seconds";
pub const WEBHOOK_DELIVERIES: &str = "callgate_webhook_deliveries_total";
pub const POLICY_RELOADS: &str = "callgate_policy_reloads_total";
pub const BUILD_INFO: &str = "callgate_build_info";
pub const STORE_WAIT: &str = "callgate_store_wait_seconds";
pub const STORE_SYNC: &str = "callgate_store_sync_seconds";
pub const STORE_BATCH: &str = "callgate_store_batch_operations";

/// Every metric callgate exports, for the dashboard's test.
pub const ALL: &[&str] = &[
    REQUESTS,
    REQUEST_DURATION,
    UPSTREAM_DURATION,
    SLOTS,
    ACCOUNT_SLOTS,
    CREDITS_HELD,
    CREDITS_SPENT,
    CALLS,
    CALL_DURATION,
    WEBHOOK_DELIVERIES,
    POLICY_RELOADS,
    BUILD_INFO,
    STORE_WAIT,
    STORE_SYNC,
    STORE_BATCH,
];

/// Request and upstream latency buckets, seconds.
const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// State store latency buckets, seconds: a commit and a sync are fractions of a millisecond on a
/// sound disk.
const STORE_LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Operations per group commit.
const BATCH_SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Call duration buckets, seconds (talk time).
const CALL_SECONDS: &[f64] = &[
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static UPKEEP: Once = Once::new();

/// Install the process's recorder (once; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(UPSTREAM_DURATION.into()), LATENCY)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(CALL_DURATION.into()), CALL_SECONDS)
            })
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_WAIT.into()), STORE_LATENCY))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_SYNC.into()), STORE_LATENCY))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_BATCH.into()), BATCH_SIZES))
            .expect("static bucket lists are valid")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics stays empty");
        }
        describe();
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// Drain histogram samples now and then (they would otherwise pile up between scrapes).
pub fn spawn_upkeep() {
    UPKEEP.call_once(|| {
        let handle = install().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    });
}

fn describe() {
    describe_counter!(
        REQUESTS,
        "Requests on the tenant API, by tenant (\"none\" before authentication), decision (allowed, denied, failed) and error code (\"ok\" when allowed)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from a request's arrival to its answer, on the tenant API."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        metrics::Unit::Seconds,
        "Time of each request to the upstream calls API, until its answer (or failure)."
    );
    describe_gauge!(
        SLOTS,
        "Concurrency slots a tenant holds now (its live calls)."
    );
    describe_gauge!(
        ACCOUNT_SLOTS,
        "Concurrency slots held now across all tenants (the account-wide cap counts these)."
    );
    describe_gauge!(CREDITS_HELD, "Credits held now by a tenant's live calls.");
    describe_counter!(
        CREDITS_SPENT,
        "Credits charged to a tenant by settled calls, since the gateway started."
    );
    describe_counter!(
        CALLS,
        "Calls that ended, by tenant and final status (\"expired\" when the lease ran out)."
    );
    describe_histogram!(
        CALL_DURATION,
        metrics::Unit::Seconds,
        "Talk time of calls that ended with a reported duration."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Deliveries of call events to tenants' webhooks, by outcome (delivered, refused, failed)."
    );
    describe_counter!(POLICY_RELOADS, "Policy reloads, by outcome (ok, error).");
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_histogram!(
        STORE_WAIT,
        metrics::Unit::Seconds,
        "Time from submitting a state-store write whose caller waits for it (an admission, a release, a settlement, an admin change) to its answer: the writer's queue, the group commit and, with synchronous = full, the log's sync (SQLite backend)."
    );
    describe_histogram!(
        STORE_SYNC,
        metrics::Unit::Seconds,
        "Time of each sync of the state file's log by the writer, whatever it carries (SQLite backend, synchronous = full)."
    );
    describe_histogram!(
        STORE_BATCH,
        "Operations run in one transaction by the state store's writer, writes and look-ups alike (SQLite backend): the group commit's size."
    );
}

/// The handles every request records to, each resolved from the recorder once, so that a
/// request neither builds a key nor looks it up in the registry (about 2 600 instructions a
/// request otherwise). Taken only once [`install`] has run: a handle resolved before the recorder
/// is installed would record nowhere for good.
struct RequestHandles {
    duration: metrics::Histogram,
    upstream: metrics::Histogram,
    /// `callgate_requests_total` by tenant, then by decision and code (tenant ids from the
    /// policy files, and codes from a fixed set: the same series the registry holds).
    requests: RwLock<foldhash::HashMap<String, CountersByOutcome>>,
}

/// A tenant's request counters by decision and code.
type CountersByOutcome = foldhash::HashMap<(&'static str, &'static str), metrics::Counter>;

static REQUEST_HANDLES: OnceLock<RequestHandles> = OnceLock::new();

fn request_handles() -> Option<&'static RequestHandles> {
    HANDLE.get()?;
    Some(REQUEST_HANDLES.get_or_init(|| RequestHandles {
        duration: histogram!(REQUEST_DURATION),
        upstream: histogram!(UPSTREAM_DURATION),
        requests: RwLock::default(),
    }))
}

fn requests_counter(tenant: &str, decision: &'static str, code: &'static str) -> metrics::Counter {
    counter!(REQUESTS, "tenant" => tenant.to_string(), "decision" => decision, "code" => code)
}

/// A request on the tenant API was answered.
pub fn request(tenant: &str, status: u16, code: &'static str, elapsed: Duration) {
    let decision = match status {
        200..=399 => "allowed",
        500.. => "failed",
        _ => "denied",
    };
    let Some(handles) = request_handles() else {
        requests_counter(tenant, decision, code).increment(1);
        histogram!(REQUEST_DURATION).record(elapsed.as_secs_f64());
        return;
    };
    handles.duration.record(elapsed.as_secs_f64());
    {
        let requests = handles.requests.read().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = requests
            .get(tenant)
            .and_then(|codes| codes.get(&(decision, code)))
        {
            counter.increment(1);
            return;
        }
    }
    let counter = requests_counter(tenant, decision, code);
    counter.increment(1);
    handles
        .requests
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(tenant.to_string())
        .or_default()
        .insert((decision, code), counter);
}

/// A request to the upstream ended.
pub fn upstream(elapsed: Duration) {
    match request_handles() {
        Some(handles) => handles.upstream.record(elapsed.as_secs_f64()),
        None => histogram!(UPSTREAM_DURATION).record(elapsed.as_secs_f64()),
    }
}

/// A call's accounting ended (final event, reconciliation, lease expiry).
pub fn settled(record: &CallRecord) {
    counter!(CALLS, "tenant" => record.tenant.clone(), "status" => record.status.clone())
        .increment(1);
    counter!(CREDITS_SPENT, "tenant" => record.tenant.clone())
        .increment(record.charged.max(0) as u64);
    if let Some(duration) = record.duration {
        histogram!(CALL_DURATION, "tenant" => record.tenant.clone()).record(duration as f64);
    }
}

/// A webhook delivery ended.
pub fn delivery(tenant: &str, outcome: &'static str) {
    counter!(WEBHOOK_DELIVERIES, "tenant" => tenant.to_string(), "outcome" => outcome).increment(1);
}

/// A policy reload ended.
pub fn reload(ok: bool) {
    counter!(POLICY_RELOADS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

/// The scrape: the live gauges read from the store for every tenant of `policies`, then the
/// text exposition.
pub async fn render(
    policies: &Policies,
    store: &dyn StateStore,
    now: i64,
) -> Result<String, StoreError> {
    let handle = install();
    let mut account = 0;
    for tenant in policies.tenants.values() {
        let usage = store.usage(&tenant.id, now).await?;
        account += usage.slots;
        gauge!(SLOTS, "tenant" => tenant.id.clone()).set(usage.slots as f64);
        gauge!(CREDITS_HELD, "tenant" => tenant.id.clone()).set(usage.holds as f64);
    }
    gauge!(ACCOUNT_SLOTS).set(account as f64);
    Ok(handle.render())
}
