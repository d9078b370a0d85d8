//! The shared backend: every replica on one Redis, still exact.
//!
//! Each step that changes accounting (admission, bind, release, an event, a settlement, lease
//! expiry, a budget period's reset, an idempotency claim, a request-rate check) is one Lua
//! script (`lua/`), loaded once and called by its SHA (`EVALSHA`, loaded again after a
//! `NOSCRIPT`), so it is atomic whichever replica runs it. The rules are those of
//! [`super::accounting`]; the scripts apply them to these keys (`<p>` is `state.redis_prefix`):
//!
//! | key                          | type   | what                                                    |
//! |------------------------------|--------|---------------------------------------------------------|
//! | `<p>:{<tenant>}:c:<res id>`  | hash   | a call: tenant, call id, status, object, live, hold, charge, lease, times, pricing, token hash |
//! | `<p>:{<tenant>}:live`        | zset   | the tenant's live calls by lease end: its slots          |
//! | `<p>:{<tenant>}:book`        | hash   | credits held by live calls; spend, its period and zone   |
//! | `<p>:{<tenant>}:cids`        | hash   | upstream call id -> reservation id                       |
//! | `<p>:{<tenant>}:list`        | zset   | bound reservations (lexical: UUIDv7 order) for listing   |
//! | `<p>:{<tenant>}:gone`        | zset   | `<res id> <call id>` of settled calls by the end of their record's retention: forgotten then (`cids`, `list`, the record) |
//! | `<p>:{<tenant>}:walked`      | string | set once a walk through `cids` has forgotten the entries of calls settled before `gone` was kept |
//! | `<p>:{<tenant>}:quiet`       | zset   | live bound calls by last update, for reconciliation      |
//! | `<p>:{<tenant>}:i:<key>`     | hash   | an idempotency key; `<p>:{<tenant>}:idem` indexes them by expiry |
//! | `<p>:{<tenant>}:rate`        | string | the tenant's GCRA theoretical arrival time               |
//! | `<p>:{#account}:live`        | zset   | `<tenant>/<res id>` by lease end: the account-wide cap   |
//! | `<p>:r:<res id>`             | string | the reservation's tenant and token hash, for the relay   |
//! | `<p>:tenants`                | set    | tenants that ever held state                             |
//! | `<p>:o:{<number>}`           | hash   | runtime opt-outs of a number: `*` (every tenant) or a tenant id -> source and time |
//! | `<p>:a:{<scope>\|<number>}`  | zset   | attempts to a number in a scope (tenant id or `#account`) by time |
//! | `<p>:k:{<id>}`               | hash   | a consent record (`rec`, JSON) and its `revoked_at`, `revoked_by` |
//! | `<p>:ks:{<number>}`          | set    | the ids of a number's consent records                    |
//! | `<p>:suspensions`            | hash   | region -> suspension (JSON)                              |
//!
//! Every tenant key carries the tenant's hash tag, so a tenant's scripts run in one slot on
//! Redis Cluster. The account-wide cap spans tenants, so it is its own step in its own slot:
//! admission takes an account slot first (counting only unlapsed leases), then the tenant's
//! slot and hold, and gives the account slot back if the tenant refuses. A replica that dies
//! between the two steps leaves an account slot that lapses at its lease end; the cap is never
//! exceeded, at the cost of one more round trip per admission and, under contention, a refusal
//! that an exact single step would have admitted.
//!
//! Slots are leases: a replica that dies holding them cannot leak them. The account set stops
//! counting a lease at its end; the tenant's scripts (admission, the sweeper's expiry) settle
//! lapsed calls at their full hold. Settlements check `live` inside the script, so several
//! replicas sweeping and reconciling at once never settle a call twice.
//!
//! Amounts and times are integers (credits, microseconds), kept by Redis as int64 and compared
//! exactly by Lua (below 2^53). Budget periods start in the tenant's time zone, which Lua cannot
//! compute: the gateway passes the bounds of the current period, and a script that finds the
//! stored period over without them answers `bounds` and is called again with them.
//!
//! Redis unreachable or slow: every operation fails within `state.redis_timeout_ms` with
//! [`StoreError::Unavailable`] (503 `state_unavailable`), failing closed: an admission whose
//! tenant step may or may not have run is released in the background. The connection manager
//! reconnects by itself.

mod rates;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, ErrorKind, RedisError, Script, ServerErrorKind, Value};
use serde_json::Value as Json;

pub use self::rates::SharedRateLimits;
use super::*;

/// How a settled call's record, and a reservation's pointer to its tenant, are kept.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often, at most, expired idempotency records are purged (Redis forgets them a day after
/// their expiry in any case).
const PURGE_EVERY_US: i64 = 60 * 1_000_000;
/// Calls past their retention forgotten per script run (`lua/forget.lua`), and entries of the
/// walk through `cids` looked at.
const FORGET_AT_ONCE: usize = 1000;
/// Script runs per tenant per round at most (a backlog drains over several rounds).
const FORGET_RUNS: usize = 10;
/// How often, at most, the sweeper visits every tenant rather than those the account set names.
const FULL_SWEEP_EVERY_US: i64 = 60 * 1_000_000;
/// Tenants swept or read at once.
const FAN_OUT: usize = 16;

/// How the store connects.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]` or `redis+unix:///path`; with `cluster`, the
    /// seed nodes of a Redis Cluster, separated by commas (`redis://a:6379,redis://b:6379`).
    pub url: String,
    /// Connect to a Redis Cluster (slots followed, `MOVED`/`ASK` handled by the crate).
    pub cluster: bool,
    /// Prefix of every key (several gateways' fleets may share one Redis).
    pub prefix: String,
    /// Longest wait for any operation before it fails with [`StoreError::Unavailable`].
    pub timeout: Duration,
}

/// The Lua scripts, each with the shared helpers (`lua/lib.lua`) in front.
struct Scripts {
    admit: Script,
    bind: Script,
    release: Script,
    event: Script,
    adjust: Script,
    expire: Script,
    read: Script,
    idempotency: Script,
    forget: Script,
    account: Script,
    rate: Script,
    attempt: Script,
    revoke: Script,
}

macro_rules! tenant_script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/lib.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            admit: tenant_script!("admit.lua"),
            bind: tenant_script!("bind.lua"),
            release: tenant_script!("release.lua"),
            event: tenant_script!("event.lua"),
            adjust: tenant_script!("adjust.lua"),
            expire: tenant_script!("expire.lua"),
            read: tenant_script!("read.lua"),
            idempotency: tenant_script!("idempotency.lua"),
            forget: tenant_script!("forget.lua"),
            account: Script::new(include_str!("lua/account.lua")),
            rate: Script::new(include_str!("lua/rate.lua")),
            attempt: Script::new(include_str!("lua/attempt.lua")),
            revoke: Script::new(include_str!("lua/revoke.lua")),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// One Redis, through the connection manager (reconnects by itself), or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl ::redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

struct Inner {
    conn: Conn,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
    /// Tenants this process has recorded in `<p>:tenants`.
    known: Mutex<HashSet<String>>,
    /// The `now` of the last idempotency purge.
    last_purge: Mutex<i64>,
    /// The `now` of the last purge of calls past their retention.
    last_call_purge: Mutex<i64>,
    /// Per tenant, where the walk through `cids` for entries whose record is gone goes on.
    cids_walk: Mutex<HashMap<String, String>>,
    /// The `now` of the last sweep of every tenant's leases.
    last_full_sweep: Mutex<i64>,
    /// `callgate_store_wait_seconds`: how long each write a caller waits for took.
    waited: metrics::Histogram,
}

/// Whether a round that runs at most once per `every` (microseconds) is due at `now`, given
/// when it last ran (`i64::MIN`: never); if it is, `now` becomes its last run. A clock that went
/// back makes it due.
fn due(last: &Mutex<i64>, now: i64, every: i64) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let due = *last == i64::MIN || now < *last || now - *last >= every;
    if due {
        *last = now;
    }
    due
}

/// What a Redis error means for the caller: the store is out of reach (fail closed, retry), or
/// something is wrong with what was asked.
fn store_error(e: RedisError) -> StoreError {
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::ResponseError
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NoPerm
            | ServerErrorKind::ExecAbort,
        )
        | ErrorKind::Parse
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Extension => StoreError::Backend(format!("redis: {e}")),
        _ => StoreError::Unavailable(format!("redis: {e}")),
    }
}

/// How an event finds its call.
#[derive(Clone, Copy)]
enum FoundBy<'a> {
    /// By the reservation id its relay token names.
    Reservation(&'a str),
    /// By the upstream's call id.
    CallId(&'a str),
}

/// The bounds of the period containing `now` for a budget's terms, as script arguments.
#[derive(Debug, Clone, Default)]
struct Hint {
    period: String,
    timezone: String,
    start: i64,
    end: i64,
}

impl Hint {
    fn for_terms(period: Period, timezone: &str, now: i64) -> Option<Hint> {
        // `none` too: an admission under it must adopt it (a budget switched to a fixed
        // allowance stops resetting at once).
        let (start, end) = period.bounds(timezone, now);
        Some(Hint {
            period: period.as_str().to_string(),
            timezone: timezone.to_string(),
            start,
            end,
        })
    }

    fn push(hint: &Option<Hint>, args: &mut Vec<Vec<u8>>) {
        match hint {
            Some(h) => {
                args.push(h.period.clone().into_bytes());
                args.push(h.timezone.clone().into_bytes());
                args.push(h.start.to_string().into_bytes());
                args.push(h.end.to_string().into_bytes());
            }
            None => args.extend(std::iter::repeat_n(Vec::new(), 4)),
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Backend(format!(
            "redis: unexpected reply {other:?}"
        ))),
    }
}

/// The reply's tag (its first element).
fn tag(items: &[Value]) -> String {
    items.first().and_then(text).unwrap_or_default()
}

/// A call record from its hash (a flat `HGETALL` list).
fn record(v: Value) -> Result<CallRecord, StoreError> {
    let items = array(v)?;
    let mut fields: HashMap<String, Value> = HashMap::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Some(k) = text(&k) {
            fields.insert(k, v);
        }
    }
    let s = |k: &str| fields.get(k).and_then(text).filter(|s| !s.is_empty());
    let n = |k: &str| fields.get(k).and_then(int);
    let reservation_id =
        s("rid").ok_or_else(|| StoreError::Backend("redis: call record without its id".into()))?;
    Ok(CallRecord {
        reservation_id,
        tenant: s("tenant").unwrap_or_default(),
        call_id: s("cid"),
        status: s("st").unwrap_or_default(),
        object: s("obj").and_then(|o| serde_json::from_str(&o).ok()),
        live: n("live") == Some(1),
        hold: n("hold").unwrap_or(0),
        charged: n("chg").unwrap_or(0),
        duration: n("dur"),
        max_duration: n("maxd").unwrap_or(0),
        lease_expires_at: n("lease").unwrap_or(0),
        created_at: n("ct").unwrap_or(0),
        updated_at: n("ut").unwrap_or(0),
        tenant_webhook: s("wh"),
    })
}

fn records(v: Value) -> Result<Vec<CallRecord>, StoreError> {
    array(v)?.into_iter().map(record).collect()
}

/// Milliseconds of a microsecond span, at least 1.
fn millis(us: i64) -> u64 {
    (us / 1_000).max(1) as u64
}

impl RedisStore {
    /// Connect lazily to the Redis at `options.url`: the gateway starts (and `/readyz` says why
    /// it is not ready) while Redis is away, and reconnects by itself.
    pub fn open(options: RedisOptions) -> Result<RedisStore, StoreError> {
        let conn = if options.cluster {
            let nodes: Vec<&str> = options.url.split(',').map(str::trim).collect();
            let client = ::redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(options.timeout.min(Duration::from_secs(2)))
                .response_timeout(options.timeout)
                .retries(2)
                .build()
                .map_err(|e| StoreError::Backend(format!("state.redis_url: {e}")))?;
            Conn::Cluster(client.get_pending_async_connection_with_config(
                ::redis::cluster::ClusterConfig::default(),
            ))
        } else {
            let client = ::redis::Client::open(options.url.as_str())
                .map_err(|e| StoreError::Backend(format!("state.redis_url: {e}")))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.timeout.min(Duration::from_secs(2))))
                .set_response_timeout(Some(options.timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(
                ConnectionManager::new_lazy_with_config(client, config).map_err(store_error)?,
            )
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: options.prefix,
                timeout: options.timeout,
                scripts: Scripts::new(),
                known: Mutex::new(HashSet::new()),
                last_purge: Mutex::new(i64::MIN),
                last_call_purge: Mutex::new(i64::MIN),
                cids_walk: Mutex::new(HashMap::new()),
                last_full_sweep: Mutex::new(i64::MIN),
                // Taken once: the recorder is installed before the store is opened.
                waited: metrics::histogram!(crate::metrics::STORE_WAIT),
            }),
        })
    }

    /// The request-rate limits, shared by every replica on this Redis.
    pub fn rate_limits(&self) -> SharedRateLimits {
        SharedRateLimits::new(self.clone())
    }

    /// Run `f` within the store's timeout.
    fn op<T, F, Fut>(&self, f: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move { inner.clone().within(f(inner)).await })
    }

    /// Run `f`, a write its caller waits for, within the store's timeout, and record how long
    /// it took when it succeeds (`callgate_store_wait_seconds`, as the SQLite backend does for
    /// the writes it commits). Not for the sweeper's rounds (nobody waits for them; most change
    /// nothing) nor for the steps of an admission before the admission itself (an idempotency
    /// claim, an attempt), which the SQLite backend answers without a commit of their own.
    fn write<T, F, Fut>(&self, f: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let since = std::time::Instant::now();
        let inner = self.inner.clone();
        let done = self.op(f);
        Box::pin(async move {
            let result = done.await;
            if result.is_ok() {
                inner.waited.record(since.elapsed());
            }
            result
        })
    }

    fn release_op(&self, reservation_id: &str) -> StoreFuture<'static, ()> {
        let id = reservation_id.to_string();
        self.write(move |inner| async move { inner.release(None, &id).await })
    }
}

/// Redis did not answer within `timeout`.
fn no_answer(timeout: Duration) -> StoreError {
    StoreError::Unavailable(format!(
        "redis did not answer within {} ms",
        timeout.as_millis()
    ))
}

impl Inner {
    /// `work`, or [`StoreError::Unavailable`] when Redis takes longer than the store's timeout.
    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(no_answer(self.timeout)))
    }

    fn tenant_prefix(&self, tenant: &str) -> String {
        format!("{}:{{{tenant}}}:", self.prefix)
    }

    /// The account-wide set. Its hash tag (`#account`) cannot be a tenant id (letters, digits,
    /// `-`, `_`), so no tenant's keys share its slot or its name.
    fn account_key(&self) -> String {
        format!("{}:{{#account}}:live", self.prefix)
    }

    fn reservation_key(&self, reservation_id: &str) -> String {
        format!("{}:r:{reservation_id}", self.prefix)
    }

    /// A number's runtime opt-outs: in the number's own slot.
    fn opt_out_key(&self, phone_number: &str) -> String {
        format!("{}:o:{{{phone_number}}}", self.prefix)
    }

    /// A number's attempts in a scope.
    fn attempts_key(&self, scope: &AttemptScope, phone_number: &str) -> String {
        format!("{}:a:{{{}|{phone_number}}}", self.prefix, scope.key())
    }

    fn consent_key(&self, id: &str) -> String {
        format!("{}:k:{{{id}}}", self.prefix)
    }

    fn consents_key(&self, phone_number: &str) -> String {
        format!("{}:ks:{{{phone_number}}}", self.prefix)
    }

    /// A consent record from its hash.
    async fn consent(&self, id: &str) -> Result<Option<ConsentRecord>, StoreError> {
        let fields: HashMap<String, String> = self
            .conn()
            .hgetall(self.consent_key(id))
            .await
            .map_err(store_error)?;
        let Some(rec) = fields.get("rec") else {
            return Ok(None);
        };
        let mut record: ConsentRecord = serde_json::from_str(rec)
            .map_err(|e| StoreError::Backend(format!("redis: consent record: {e}")))?;
        record.revoked_at = fields.get("revoked_at").and_then(|t| t.parse().ok());
        record.revoked_by = fields.get("revoked_by").cloned();
        Ok(Some(record))
    }

    /// Revoke a record; whether this revoked it.
    async fn revoke(&self, id: &str, now: i64, by: &str) -> Result<i64, StoreError> {
        let mut invocation = self.scripts.revoke.prepare_invoke();
        invocation
            .key(self.consent_key(id))
            .arg(now.to_string())
            .arg(by);
        invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)
    }

    fn tenants_key(&self) -> String {
        format!("{}:tenants", self.prefix)
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Run a tenant script: its prefix is the first argument, its book and live set the keys
    /// (which route it to the tenant's slot).
    async fn tenant_script(
        &self,
        script: &Script,
        tenant: &str,
        args: &[Vec<u8>],
    ) -> Result<Value, StoreError> {
        let prefix = self.tenant_prefix(tenant);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(format!("{prefix}book"))
            .key(format!("{prefix}live"))
            .arg(prefix.as_bytes());
        for a in args {
            invocation.arg(a.as_slice());
        }
        invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)
    }

    /// Run a tenant script that may ask for the bounds of the tenant's budget period (`{'bounds',
    /// period, zone}`), calling it again with them.
    async fn with_bounds(
        &self,
        script: &Script,
        tenant: &str,
        now: i64,
        mut hint: Option<Hint>,
        args: impl Fn(&Option<Hint>) -> Vec<Vec<u8>>,
    ) -> Result<Vec<Value>, StoreError> {
        for _ in 0..3 {
            let reply = array(self.tenant_script(script, tenant, &args(&hint)).await?)?;
            if tag(&reply) != "bounds" {
                return Ok(reply);
            }
            let period = reply.get(1).and_then(text).unwrap_or_default();
            let timezone = reply.get(2).and_then(text).unwrap_or_default();
            hint = Some(
                Hint::for_terms(Period::parse(&period), &timezone, now).unwrap_or(Hint {
                    period,
                    timezone,
                    start: 0,
                    end: i64::MAX,
                }),
            );
        }
        Err(StoreError::Backend(format!(
            "redis: {tenant}'s budget period could not be settled"
        )))
    }

    async fn account(&self, args: &[String]) -> Result<i64, StoreError> {
        let mut invocation = self.scripts.account.prepare_invoke();
        invocation
            .key(self.account_key())
            .key(format!("{}:{{#account}}:deciding", self.prefix));
        for a in args {
            invocation.arg(a.as_str());
        }
        invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)
    }

    /// Give account slots back.
    async fn free_account(&self, tenant: &str, reservations: &[String]) -> Result<(), StoreError> {
        if reservations.is_empty() {
            return Ok(());
        }
        let mut args = vec!["free".to_string()];
        args.extend(reservations.iter().map(|r| format!("{tenant}/{r}")));
        self.account(&args).await.map(drop)
    }

    /// Record that `tenant` holds state (once per process), so the sweeper and reads find it.
    async fn note_tenant(&self, tenant: &str) -> Result<(), StoreError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tenant)
        {
            return Ok(());
        }
        let _: i64 = self
            .conn()
            .sadd(self.tenants_key(), tenant)
            .await
            .map_err(store_error)?;
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string());
        Ok(())
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        self.conn()
            .smembers(self.tenants_key())
            .await
            .map_err(store_error)
    }

    /// The tenant a reservation belongs to and its token hash.
    async fn reservation(
        &self,
        reservation_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let value: Option<String> = self
            .conn()
            .get(self.reservation_key(reservation_id))
            .await
            .map_err(store_error)?;
        Ok(value.and_then(|v| {
            v.split_once('\n')
                .map(|(t, h)| (t.to_string(), h.to_string()))
        }))
    }

    async fn admit(self: &Arc<Self>, req: &AdmitRequest) -> Result<AdmitOutcome, StoreError> {
        self.note_tenant(&req.tenant).await?;
        let rid = &req.reservation_id;
        let member = format!("{}/{rid}", req.tenant);
        let pointer_ttl = millis(req.lease_expires_at - req.now) + RETENTION.as_millis() as u64;
        let take_args = [
            "take".into(),
            req.now.to_string(),
            req.account_max_concurrent.to_string(),
            member.clone(),
            req.lease_expires_at.to_string(),
        ];
        // The account is full only if it stays full once the admissions deciding now (their
        // tenant may refuse them) are done: ask again for up to ~100 ms.
        let take = async {
            for _ in 0..50 {
                match self.account(&take_args).await? {
                    -1 => tokio::time::sleep(Duration::from_millis(2)).await,
                    took => return Ok::<i64, StoreError>(took),
                }
            }
            Ok(0)
        };
        let mut conn = self.conn();
        let pointer = conn.set_ex::<_, _, ()>(
            self.reservation_key(rid),
            format!("{}\n{}", req.tenant, req.token_hash),
            pointer_ttl.div_ceil(1000),
        );
        let (took, pointer) = tokio::join!(take, pointer);
        let forget_pointer = || async {
            let _: Result<i64, _> = self.conn().del(self.reservation_key(rid)).await;
        };
        if took? != 1 {
            forget_pointer().await;
            return Ok(AdmitOutcome::AccountSlotsFull {
                limit: req.account_max_concurrent,
            });
        }
        if let Err(e) = pointer {
            let _ = self
                .free_account(&req.tenant, std::slice::from_ref(rid))
                .await;
            return Err(store_error(e));
        }
        let hint = req
            .budget
            .as_ref()
            .and_then(|b| Hint::for_terms(b.period, &b.timezone, req.now));
        let args = |hint: &Option<Hint>| {
            let mut a: Vec<Vec<u8>> = vec![
                rid.clone().into_bytes(),
                req.tenant.clone().into_bytes(),
                req.token_hash.clone().into_bytes(),
                req.tenant_max_concurrent
                    .map_or(-1, i64::from)
                    .to_string()
                    .into_bytes(),
                if req.budget.is_some() { b"1" } else { b"0" }.to_vec(),
                req.budget
                    .as_ref()
                    .map_or(0, |b| b.credits)
                    .to_string()
                    .into_bytes(),
            ];
            Hint::push(hint, &mut a);
            for n in [
                req.hold,
                req.price,
                i64::from(req.increment_secs),
                i64::from(req.max_duration),
                req.lease_expires_at,
                req.now,
            ] {
                a.push(n.to_string().into_bytes());
            }
            a.push(req.tenant_webhook.clone().unwrap_or_default().into_bytes());
            a
        };
        let reply = match self
            .with_bounds(&self.scripts.admit, &req.tenant, req.now, hint, args)
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                // The tenant step may have run: release what it may have taken, in the background.
                self.spawn_release(Some(req.tenant.clone()), rid);
                return Err(e);
            }
        };
        let reaped: Vec<String> = reply
            .get(3)
            .cloned()
            .map(array)
            .transpose()?
            .unwrap_or_default()
            .iter()
            .filter_map(text)
            .collect();
        for id in &reaped {
            tracing::warn!(
                target: "audit",
                tenant = %req.tenant,
                reservation = %id,
                "lease expired: settled at the full hold"
            );
        }
        let outcome = match tag(&reply).as_str() {
            "admitted" => AdmitOutcome::Admitted,
            "tenant_full" => AdmitOutcome::TenantSlotsFull {
                limit: reply.get(1).and_then(int).unwrap_or(0) as u32,
            },
            "credits" => AdmitOutcome::InsufficientCredits {
                needed: reply.get(1).and_then(int).unwrap_or(0),
                available: reply.get(2).and_then(int).unwrap_or(0),
            },
            other => {
                return Err(StoreError::Backend(format!(
                    "redis: unexpected admission reply {other:?}"
                )));
            }
        };
        let mut freed = reaped;
        if outcome == AdmitOutcome::Admitted {
            // Decided: the account slot no longer counts as deciding. Sent now, not waited for.
            let inner = self.clone();
            crate::tasks::spawn(async move {
                let _ = inner.account(&["confirm".into(), member]).await;
            });
        } else {
            freed.push(rid.clone());
            forget_pointer().await;
        }
        if let Err(e) = self.free_account(&req.tenant, &freed).await {
            // Those account slots lapse at their lease end.
            tracing::warn!(error = %e, "could not give account slots back");
        }
        Ok(outcome)
    }

    /// Release a reservation in the background, retrying while Redis is away (about a minute).
    fn spawn_release(self: &Arc<Self>, tenant: Option<String>, reservation_id: &str) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (inner, id) = (self.clone(), reservation_id.to_string());
        let gave_up = "release failed; the slot lapses at its lease end";
        let attempt = move || {
            let (inner, tenant, id) = (inner.clone(), tenant.clone(), id.clone());
            async move { inner.within(inner.release(tenant.as_deref(), &id)).await }
        };
        crate::tasks::spawn_on(
            tracing::Instrument::instrument(
                crate::tasks::retry(crate::tasks::First::Now, gave_up, attempt),
                tracing::warn_span!("release", reservation = %reservation_id),
            ),
            &handle,
        );
    }

    /// Release a reservation (of `tenant`, or found by its pointer): its tenant slot and hold if
    /// it is pending, its account slot unless it is bound to a placed call.
    async fn release(&self, tenant: Option<&str>, reservation_id: &str) -> Result<(), StoreError> {
        let tenant = match tenant {
            Some(t) => t.to_string(),
            None => match self.reservation(reservation_id).await? {
                Some((t, _)) => t,
                None => return Ok(()),
            },
        };
        let released = self
            .tenant_script(
                &self.scripts.release,
                &tenant,
                &[reservation_id.as_bytes().to_vec()],
            )
            .await?;
        if int(&released) != Some(-1) {
            // Released, or never admitted by the tenant, or no longer live: nothing holds the
            // account slot (an admission cut short after the account step leaves one).
            self.free_account(&tenant, &[reservation_id.to_string()])
                .await?;
            let _: i64 = self
                .conn()
                .del(self.reservation_key(reservation_id))
                .await
                .map_err(store_error)?;
        }
        Ok(())
    }

    /// Apply an event to a call found by reservation id (relayed) or call id (the upstream's
    /// view).
    async fn event(
        &self,
        tenant: &str,
        found_by: FoundBy<'_>,
        event: &CallEvent,
        object: Option<&Json>,
        now: i64,
        stated: Option<i64>,
    ) -> Result<EventOutcome, StoreError> {
        let object = object.map(Json::to_string).unwrap_or_default();
        let (mode, key) = match found_by {
            FoundBy::Reservation(id) => ("relay", id),
            FoundBy::CallId(id) => ("upstream", id),
        };
        let args = |hint: &Option<Hint>| {
            let mut a: Vec<Vec<u8>> = vec![
                mode.as_bytes().to_vec(),
                key.as_bytes().to_vec(),
                event.call_id.clone().unwrap_or_default().into_bytes(),
                event.status.clone().into_bytes(),
                event
                    .duration
                    .map(|d| d.to_string())
                    .unwrap_or_default()
                    .into_bytes(),
                if event.is_final { b"1" } else { b"0" }.to_vec(),
                object.clone().into_bytes(),
                now.to_string().into_bytes(),
            ];
            Hint::push(hint, &mut a);
            a.push(
                stated
                    .map(|c| c.to_string())
                    .unwrap_or_default()
                    .into_bytes(),
            );
            a
        };
        let reply = self
            .with_bounds(&self.scripts.event, tenant, now, None, args)
            .await?;
        match tag(&reply).as_str() {
            "unknown" => Ok(EventOutcome::UnknownToken),
            "mismatch" => Ok(EventOutcome::CallMismatch),
            "applied" => {
                let settled = reply.get(1).and_then(int) == Some(1);
                let rid = reply.get(2).and_then(text).unwrap_or_default();
                let record = record(reply.get(3).cloned().unwrap_or(Value::Nil))?;
                if settled && let Err(e) = self.free_account(tenant, &[rid]).await {
                    tracing::warn!(error = %e, "could not give an account slot back");
                }
                Ok(EventOutcome::Applied {
                    record: Box::new(record),
                    settled,
                })
            }
            other => Err(StoreError::Backend(format!(
                "redis: unexpected event reply {other:?}"
            ))),
        }
    }

    /// Settle a tenant's lapsed leases.
    /// Settle a tenant's lapsed leases; then, of `candidates` (reservations the account set
    /// holds past their lease), give back the account slots of those no longer live and move
    /// the others' to their call's lease (a lost lease move, repaired).
    async fn expire_tenant(
        &self,
        tenant: &str,
        now: i64,
        candidates: &[String],
    ) -> Result<Vec<CallRecord>, StoreError> {
        let reply = self
            .with_bounds(&self.scripts.expire, tenant, now, None, |hint| {
                let mut a = vec![now.to_string().into_bytes()];
                Hint::push(hint, &mut a);
                a.extend(candidates.iter().map(|c| c.as_bytes().to_vec()));
                a
            })
            .await?;
        let expired = records(reply.get(1).cloned().unwrap_or(Value::Nil))?;
        let mut ended: Vec<String> = expired.iter().map(|r| r.reservation_id.clone()).collect();
        for candidate in array(reply.get(2).cloned().unwrap_or(Value::Nil))? {
            let candidate = array(candidate)?;
            let (Some(rid), Some(lease)) = (
                candidate.first().and_then(text),
                candidate.get(1).and_then(int),
            ) else {
                continue;
            };
            if lease < 0 {
                ended.push(rid);
            } else {
                let set = ["set".into(), format!("{tenant}/{rid}"), lease.to_string()];
                self.account(&set).await?;
            }
        }
        ended.sort_unstable();
        ended.dedup();
        self.free_account(tenant, &ended).await?;
        Ok(expired)
    }

    async fn read(&self, tenant: &str, args: &[String]) -> Result<Vec<CallRecord>, StoreError> {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        records(
            self.tenant_script(&self.scripts.read, tenant, &args)
                .await?,
        )
    }

    async fn idempotency(&self, tenant: &str, args: Vec<Vec<u8>>) -> Result<Value, StoreError> {
        self.tenant_script(&self.scripts.idempotency, tenant, &args)
            .await
    }

    /// Run `f` for each tenant, [`FAN_OUT`] at a time; their results in tenant order.
    async fn per_tenant<T, F, Fut>(&self, tenants: Vec<String>, f: F) -> Result<Vec<T>, StoreError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut out = Vec::with_capacity(tenants.len());
        for chunk in tenants.chunks(FAN_OUT) {
            let results = futures_util::future::join_all(chunk.iter().cloned().map(&f)).await;
            for r in results {
                out.push(r?);
            }
        }
        Ok(out)
    }
}

impl StateStore for RedisStore {
    fn admit(&self, req: AdmitRequest) -> StoreFuture<'static, AdmitOutcome> {
        // The admission runs to its end in a task of its own, whatever becomes of the caller (a
        // timeout, a client gone): an admission nobody is told about is released.
        let inner = self.inner.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        crate::tasks::spawn(async move {
            let (tenant, rid) = (req.tenant.clone(), req.reservation_id.clone());
            let result = inner.admit(&req).await;
            if let Err(Ok(AdmitOutcome::Admitted)) = tx.send(result) {
                tracing::warn!(reservation = %rid, "admitted after its request gave up; releasing");
                inner.spawn_release(Some(tenant), &rid);
            }
        });
        let timeout = self.inner.timeout;
        let (since, waited) = (std::time::Instant::now(), self.inner.waited.clone());
        Box::pin(async move {
            let mut rx = rx;
            match tokio::time::timeout(timeout, &mut rx).await {
                Ok(result) => {
                    let outcome =
                        result.map_err(|_| StoreError::Backend("admission task failed".into()))?;
                    if outcome.is_ok() {
                        waited.record(since.elapsed());
                    }
                    outcome
                }
                Err(_) => {
                    // Closed first: an answer sent from now on is refused and released by the
                    // task; one that arrived just before is taken here.
                    rx.close();
                    rx.try_recv().unwrap_or_else(|_| Err(no_answer(timeout)))
                }
            }
        })
    }

    fn bind(
        &self,
        tenant: &str,
        reservation_id: &str,
        call_id: &str,
        answered: Answered,
        lease_expires_at: i64,
        now: i64,
    ) -> StoreFuture<'static, Queued> {
        let (tenant, rid, call_id) = (
            tenant.to_string(),
            reservation_id.to_string(),
            call_id.to_string(),
        );
        let done = self.op(move |inner| async move {
            let args: Vec<Vec<u8>> = vec![
                rid.clone().into_bytes(),
                call_id.clone().into_bytes(),
                answered.object.as_bytes().to_vec(),
                answered.status.into_bytes(),
                lease_expires_at.to_string().into_bytes(),
                now.to_string().into_bytes(),
            ];
            let bound = array(
                inner
                    .tenant_script(&inner.scripts.bind, &tenant, &args)
                    .await?,
            )?;
            match bound.first().and_then(int) {
                Some(1) => {}
                Some(2) => {
                    return Err(StoreError::Refused(format!(
                        "reservation {rid} is bound to another upstream id, not {call_id}"
                    )));
                }
                Some(3) => {
                    return Err(StoreError::Refused(format!(
                        "upstream call id {call_id} is already bound to another call"
                    )));
                }
                _ => return Err(StoreError::Backend(format!("no reservation {rid} to bind"))),
            }
            // A live call's account lease follows its tenant's.
            Ok((bound.get(1).and_then(int) == Some(1)).then(|| {
                let lease = bound.get(2).and_then(int).unwrap_or(lease_expires_at);
                (format!("{tenant}/{rid}"), lease)
            }))
        });
        let inner = self.inner.clone();
        Box::pin(async move {
            let account_lease = done.await?;
            // The bind is written; the account's lease is moved by the returned future, which
            // the answer does not wait for. Until it lands the account keeps the pending lease,
            // which still has the upstream timeout and `max_duration` to run: the account never
            // lets the slot go first. Lost (a crash), the account slot lapses at its end.
            Ok(Box::pin(async move {
                if let Some((member, lease)) = account_lease {
                    let set = ["set".into(), member, lease.to_string()];
                    inner.within(inner.account(&set)).await?;
                }
                Ok(())
            }) as Queued)
        })
    }

    fn release(&self, reservation_id: &str) -> StoreFuture<'static, ()> {
        self.release_op(reservation_id)
    }

    fn release_detached(&self, reservation_id: &str) {
        self.inner.spawn_release(None, reservation_id);
    }

    fn record_event(
        &self,
        token: &RelayToken,
        event: CallEvent,
        now: i64,
    ) -> StoreFuture<'static, EventOutcome> {
        let token = token.clone();
        self.write(move |inner| async move {
            if token.is_legacy() {
                return Ok(EventOutcome::UnknownToken);
            }
            let Some((tenant, hash)) = inner.reservation(&token.reservation_id).await? else {
                return Ok(EventOutcome::UnknownToken);
            };
            if !token.matches(&hash) {
                return Ok(EventOutcome::UnknownToken);
            }
            inner
                .event(
                    &tenant,
                    FoundBy::Reservation(&token.reservation_id),
                    &event,
                    None,
                    now,
                    None,
                )
                .await
        })
    }

    fn apply_upstream_state(
        &self,
        tenant: &str,
        call_id: &str,
        event: CallEvent,
        object: Option<Json>,
        now: i64,
    ) -> StoreFuture<'static, Option<(CallRecord, bool)>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        self.write(move |inner| async move {
            let outcome = inner
                .event(
                    &tenant,
                    FoundBy::CallId(&call_id),
                    &event,
                    object.as_ref(),
                    now,
                    None,
                )
                .await?;
            Ok(match outcome {
                EventOutcome::Applied { record, settled } => Some((*record, settled)),
                _ => None,
            })
        })
    }

    fn settle_stated(
        &self,
        tenant: &str,
        call_id: &str,
        charge: i64,
        now: i64,
    ) -> StoreFuture<'static, Option<(CallRecord, bool)>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        self.write(move |inner| async move {
            let event = CallEvent {
                call_id: Some(call_id.clone()),
                status: "released".into(),
                duration: None,
                is_final: true,
            };
            let outcome = inner
                .event(
                    &tenant,
                    FoundBy::CallId(&call_id),
                    &event,
                    None,
                    now,
                    Some(charge),
                )
                .await?;
            Ok(match outcome {
                EventOutcome::Applied { record, settled } => Some((*record, settled)),
                _ => None,
            })
        })
    }

    fn adjust_spend(
        &self,
        tenant: &str,
        terms: Option<BudgetTerms>,
        delta: i64,
        now: i64,
    ) -> StoreFuture<'static, Usage> {
        let tenant = tenant.to_string();
        let store = self.clone();
        self.write(move |inner| async move {
            inner.note_tenant(&tenant).await?;
            let hint = terms
                .as_ref()
                .and_then(|t| Hint::for_terms(t.period, &t.timezone, now));
            inner
                .with_bounds(&inner.scripts.adjust, &tenant, now, hint, |hint| {
                    let mut a = vec![delta.to_string().into_bytes(), now.to_string().into_bytes()];
                    Hint::push(hint, &mut a);
                    a
                })
                .await?;
            StateStore::usage(&store, &tenant, now).await
        })
    }

    fn expire_leases(&self, now: i64) -> StoreFuture<'static, Vec<CallRecord>> {
        self.op(move |inner| async move {
            // The account set names every lease, whichever replica took it: the lapsed ones say
            // which tenants to sweep.
            let lapsed: Vec<String> = inner
                .conn()
                .zrangebyscore_limit(inner.account_key(), "-inf", now, 0, 10_000)
                .await
                .map_err(store_error)?;
            let mut by_tenant: HashMap<String, Vec<String>> = HashMap::new();
            for member in lapsed {
                if let Some((tenant, rid)) = member.split_once('/') {
                    by_tenant
                        .entry(tenant.to_string())
                        .or_default()
                        .push(rid.to_string());
                }
            }
            // Now and then every tenant, in case a call lost its account slot (it would otherwise
            // be found only by its tenant's next admission).
            let full_pass = due(&inner.last_full_sweep, now, FULL_SWEEP_EVERY_US);
            if full_pass {
                for tenant in inner.tenants().await? {
                    by_tenant.entry(tenant).or_default();
                }
            }
            let tenants: Vec<String> = by_tenant.keys().cloned().collect();
            let expired = inner
                .per_tenant(tenants, |tenant| {
                    let inner = &inner;
                    let rids = by_tenant.get(&tenant).cloned().unwrap_or_default();
                    async move { inner.expire_tenant(&tenant, now, &rids).await }
                })
                .await?;
            Ok(expired.into_iter().flatten().collect())
        })
    }

    fn quiet_calls(
        &self,
        quiet_since: i64,
        lapsing_by: i64,
        limit: usize,
    ) -> StoreFuture<'static, Vec<CallRecord>> {
        self.op(move |inner| async move {
            let tenants = inner.tenants().await?;
            let args = [
                "quiet".to_string(),
                quiet_since.to_string(),
                limit.to_string(),
                lapsing_by.to_string(),
            ];
            let found = inner
                .per_tenant(tenants, |tenant| {
                    let (inner, args) = (&inner, &args);
                    async move { inner.read(&tenant, args).await }
                })
                .await?;
            let mut calls: Vec<CallRecord> = found.into_iter().flatten().collect();
            // Lapsing calls first, soonest lease first; then the quiet, longest quiet first.
            calls.sort_by_key(|c| match c.lease_expires_at <= lapsing_by {
                true => (false, c.lease_expires_at),
                false => (true, c.updated_at),
            });
            calls.truncate(limit);
            Ok(calls)
        })
    }

    fn get_call(&self, tenant: &str, call_id: &str) -> StoreFuture<'static, Option<CallRecord>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        self.op(move |inner| async move {
            let found = inner.read(&tenant, &["get".into(), call_id]).await?;
            Ok(found.into_iter().next().filter(|r| r.tenant == tenant))
        })
    }

    fn list_calls(
        &self,
        tenant: &str,
        limit: usize,
        before: Option<String>,
    ) -> StoreFuture<'static, Vec<CallRecord>> {
        let tenant = tenant.to_string();
        self.op(move |inner| async move {
            let args = [
                "list".to_string(),
                limit.to_string(),
                before.unwrap_or_default(),
            ];
            inner.read(&tenant, &args).await
        })
    }

    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage> {
        let tenant = tenant.to_string();
        self.op(move |inner| async move {
            let prefix = inner.tenant_prefix(&tenant);
            let ((slots,), book): ((i64,), Vec<Option<String>>) = {
                let mut pipe = ::redis::pipe();
                pipe.zcard(format!("{prefix}live"))
                    .cmd("HMGET")
                    .arg(format!("{prefix}book"))
                    .arg(&["holds", "spent", "period", "tz", "pstart"]);
                let (slots, book): (i64, Vec<Option<String>>) = pipe
                    .query_async(&mut inner.conn())
                    .await
                    .map_err(store_error)?;
                ((slots,), book)
            };
            let num = |i: usize| {
                book.get(i)
                    .cloned()
                    .flatten()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            let text = |i: usize, default: &str| {
                book.get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| default.to_string())
            };
            let spend = accounting::Spend::new(
                Period::parse(&text(2, "none")),
                text(3, "UTC"),
                num(4),
                num(1),
            )
            .at(now);
            Ok(Usage {
                slots,
                holds: num(0),
                spent: spend.spent,
                period_start: spend.period_start,
            })
        })
    }

    fn idempotency_begin(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreFuture<'static, IdempotencyBegin> {
        let (tenant, key, body_hash) = (tenant.to_string(), key.to_string(), body_hash.to_string());
        let claim_id = uuid::Uuid::new_v4().to_string();
        self.op(move |inner| async move {
            inner.note_tenant(&tenant).await?;
            let args = vec![
                b"begin".to_vec(),
                key.into_bytes(),
                body_hash.into_bytes(),
                now.to_string().into_bytes(),
                expires_at.to_string().into_bytes(),
                // A begin run twice (a reply lost, the command retried) proceeds as itself.
                claim_id.into_bytes(),
            ];
            let reply = array(inner.idempotency(&tenant, args).await?)?;
            Ok(match tag(&reply).as_str() {
                "proceed" => IdempotencyBegin::Proceed,
                "conflict" => IdempotencyBegin::Conflict,
                "in_flight" => IdempotencyBegin::InFlight,
                "replay" => IdempotencyBegin::Replay(StoredResponse {
                    status: reply.get(1).and_then(int).unwrap_or(200) as u16,
                    body: match reply.get(2) {
                        Some(Value::BulkString(b)) => b.clone(),
                        _ => Vec::new(),
                    },
                    content_type: reply
                        .get(3)
                        .and_then(text)
                        .unwrap_or_else(|| "application/json".into()),
                }),
                other => {
                    return Err(StoreError::Backend(format!(
                        "redis: unexpected idempotency reply {other:?}"
                    )));
                }
            })
        })
    }

    fn idempotency_complete(
        &self,
        tenant: &str,
        key: &str,
        claim: IdempotencyClaim,
        response: StoredResponse,
    ) -> StoreFuture<'static, Queued> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        let done = self.op(move |inner| async move {
            let args = vec![
                b"complete".to_vec(),
                key.into_bytes(),
                claim.body_hash.into_bytes(),
                claim.created_at.to_string().into_bytes(),
                claim.expires_at.to_string().into_bytes(),
                response.status.to_string().into_bytes(),
                response.body,
                response.content_type.into_bytes(),
            ];
            inner.idempotency(&tenant, args).await.map(drop)
        });
        Box::pin(async move {
            done.await?;
            Ok(Box::pin(std::future::ready(Ok(()))) as Queued)
        })
    }

    fn idempotency_abandon(&self, tenant: &str, key: &str) -> StoreFuture<'static, ()> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        self.write(move |inner| async move {
            let args = vec![b"abandon".to_vec(), key.into_bytes()];
            inner.idempotency(&tenant, args).await.map(drop)
        })
    }

    fn purge_idempotency(&self, now: i64) -> StoreFuture<'static, usize> {
        self.op(move |inner| async move {
            if !due(&inner.last_purge, now, PURGE_EVERY_US) {
                return Ok(0);
            }
            let tenants = inner.tenants().await?;
            let purged = inner
                .per_tenant(tenants, |tenant| {
                    let inner = &inner;
                    async move {
                        let args = vec![b"purge".to_vec(), now.to_string().into_bytes()];
                        Ok(int(&inner.idempotency(&tenant, args).await?).unwrap_or(0) as usize)
                    }
                })
                .await?;
            Ok(purged.into_iter().sum())
        })
    }

    fn purge_calls(&self, now: i64) -> StoreFuture<'static, usize> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if !due(&inner.last_call_purge, now, PURGE_EVERY_US) {
                return Ok(0);
            }
            let tenants = inner.within(inner.tenants()).await?;
            // Each script within the store's timeout, not the whole round in one (a round visits
            // every tenant); a tenant that fails is logged and tried again next round, the others
            // go on.
            let forgotten = inner
                .per_tenant(tenants, |tenant| {
                    let inner = &inner;
                    async move {
                        let mut forgotten = 0;
                        for _ in 0..FORGET_RUNS {
                            let cursor = inner
                                .cids_walk
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(&tenant)
                                .cloned()
                                .unwrap_or_else(|| "0".into());
                            let args = vec![
                                now.to_string().into_bytes(),
                                FORGET_AT_ONCE.to_string().into_bytes(),
                                cursor.into_bytes(),
                            ];
                            let ran = inner
                                .within(inner.tenant_script(&inner.scripts.forget, &tenant, &args))
                                .await
                                .and_then(array);
                            let out = match ran {
                                Ok(out) => out,
                                Err(e) => {
                                    tracing::warn!(tenant = %tenant, error = %e, "forgetting calls past their retention failed; tried again next round");
                                    break;
                                }
                            };
                            let due = out.first().and_then(int).unwrap_or(0) as usize;
                            let orphans = out.get(2).and_then(int).unwrap_or(0) as usize;
                            // The walk goes on from here at the next run.
                            if let Some(next) = out.get(1).and_then(text) {
                                inner
                                    .cids_walk
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(tenant.clone(), next);
                            }
                            forgotten += due + orphans;
                            if due < FORGET_AT_ONCE {
                                break;
                            }
                        }
                        Ok(forgotten)
                    }
                })
                .await?;
            Ok(forgotten.into_iter().sum())
        })
    }

    fn check_consistency(&self, now: i64) -> StoreFuture<'static, ()> {
        self.op(move |inner| async move {
            let mut differences = Vec::new();
            let account: Vec<(String, i64)> = inner
                .conn()
                .zrangebyscore_withscores(inner.account_key(), format!("({now}"), "+inf")
                .await
                .map_err(store_error)?;
            let mut account: HashMap<String, i64> = account.into_iter().collect();
            for tenant in inner.tenants().await? {
                let prefix = inner.tenant_prefix(&tenant);
                let live: Vec<(String, i64)> = inner
                    .conn()
                    .zrange_withscores(format!("{prefix}live"), 0, -1)
                    .await
                    .map_err(store_error)?;
                let holds: Option<i64> = inner
                    .conn()
                    .hget(format!("{prefix}book"), "holds")
                    .await
                    .map_err(store_error)?;
                let mut held = 0;
                for (rid, lease) in &live {
                    let call: HashMap<String, String> = inner
                        .conn()
                        .hgetall(format!("{prefix}c:{rid}"))
                        .await
                        .map_err(store_error)?;
                    if call.get("live").map(String::as_str) != Some("1") {
                        differences.push(format!("{tenant}: {rid} holds a slot but is not live"));
                    }
                    held += call.get("hold").and_then(|h| h.parse::<i64>().ok()).unwrap_or(0);
                    if *lease > now {
                        match account.remove(&format!("{tenant}/{rid}")) {
                            Some(account_lease) if account_lease >= *lease => {}
                            Some(account_lease) => differences.push(format!(
                                "{tenant}: {rid}'s account lease ends at {account_lease}, before its own ({lease})"
                            )),
                            None => differences
                                .push(format!("{tenant}: {rid} is live without an account slot")),
                        }
                    }
                }
                if holds.unwrap_or(0) != held {
                    differences.push(format!(
                        "{tenant}: holds counter {} records {held}",
                        holds.unwrap_or(0)
                    ));
                }
            }
            for member in account.keys() {
                differences.push(format!("account slot {member} has no live call"));
            }
            if differences.is_empty() {
                Ok(())
            } else {
                Err(StoreError::Inconsistent(differences.join("; ")))
            }
        })
    }

    fn add_opt_out(&self, entry: OptOut) -> StoreFuture<'static, bool> {
        self.write(move |inner| async move {
            let field = entry.tenant.clone().unwrap_or_else(|| "*".into());
            let value = serde_json::json!({"source": entry.source, "created_at": entry.created_at});
            let added: bool = inner
                .conn()
                .hset_nx(
                    inner.opt_out_key(&entry.phone_number),
                    field,
                    value.to_string(),
                )
                .await
                .map_err(store_error)?;
            Ok(added)
        })
    }

    fn remove_opt_out(
        &self,
        phone_number: &str,
        tenant: Option<&str>,
    ) -> StoreFuture<'static, bool> {
        let (number, field) = (phone_number.to_string(), tenant.unwrap_or("*").to_string());
        self.write(move |inner| async move {
            let removed: i64 = inner
                .conn()
                .hdel(inner.opt_out_key(&number), field)
                .await
                .map_err(store_error)?;
            Ok(removed == 1)
        })
    }

    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>> {
        let number = phone_number.to_string();
        self.op(move |inner| async move {
            let entries: HashMap<String, String> = inner
                .conn()
                .hgetall(inner.opt_out_key(&number))
                .await
                .map_err(store_error)?;
            let mut found: Vec<OptOut> = entries
                .into_iter()
                .map(|(scope, value)| {
                    let value: Json = serde_json::from_str(&value).unwrap_or_default();
                    OptOut {
                        phone_number: number.clone(),
                        tenant: (scope != "*").then_some(scope),
                        source: value["source"].as_str().unwrap_or_default().to_string(),
                        created_at: value["created_at"].as_i64().unwrap_or(0),
                    }
                })
                .collect();
            found.sort_by(|a, b| a.tenant.cmp(&b.tenant));
            Ok(found)
        })
    }

    fn take_attempt(
        &self,
        cap: &AttemptCap,
        attempt_id: &str,
        now: i64,
    ) -> StoreFuture<'static, AttemptOutcome> {
        let (cap, id) = (cap.clone(), attempt_id.to_string());
        self.op(move |inner| async move {
            let mut invocation = inner.scripts.attempt.prepare_invoke();
            invocation
                .key(inner.attempts_key(&cap.scope, &cap.phone_number))
                .arg(id)
                .arg(now.to_string())
                .arg((now - MAX_ATTEMPT_WINDOW_US).to_string())
                .arg(millis(MAX_ATTEMPT_WINDOW_US));
            for limit in &cap.limits {
                invocation
                    .arg((now - limit.window).to_string())
                    .arg(limit.max);
            }
            let reply = array(
                invocation
                    .invoke_async(&mut inner.conn())
                    .await
                    .map_err(store_error)?,
            )?;
            match tag(&reply).as_str() {
                "taken" => Ok(AttemptOutcome::Taken),
                "exceeded" => {
                    // The attempt times in the longest window, as Redis prints a double
                    // (integral below 2^53): the verdict's retry time is computed here.
                    let times: Vec<i64> = reply[1..]
                        .iter()
                        .filter_map(text)
                        .filter_map(|t| t.parse::<f64>().ok())
                        .map(|at| at as i64)
                        .collect();
                    Ok(cap.verdict(&times, now))
                }
                other => Err(StoreError::Backend(format!(
                    "redis: unexpected attempt reply {other:?}"
                ))),
            }
        })
    }

    fn return_attempt(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        attempt_id: &str,
    ) -> StoreFuture<'static, ()> {
        let key = self.inner.attempts_key(scope, phone_number);
        let id = attempt_id.to_string();
        self.write(move |inner| async move {
            let _: i64 = inner.conn().zrem(key, id).await.map_err(store_error)?;
            Ok(())
        })
    }

    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>> {
        let key = self.inner.attempts_key(scope, phone_number);
        self.op(move |inner| async move {
            // Scores are doubles: exact for times below 2^53 microseconds.
            let times: Vec<(String, f64)> = inner
                .conn()
                .zrangebyscore_withscores(key, format!("({since}"), "+inf")
                .await
                .map_err(store_error)?;
            Ok(times.into_iter().map(|(_, at)| at as i64).collect())
        })
    }

    fn suspend(&self, suspension: Suspension) -> StoreFuture<'static, ()> {
        self.write(move |inner| async move {
            let json = serde_json::to_string(&suspension)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let key = format!("{}:suspensions", inner.prefix);
            let _: i64 = inner
                .conn()
                .hset(key, &suspension.region, json)
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn lift_suspension(&self, region: &str) -> StoreFuture<'static, bool> {
        let region = region.to_string();
        self.write(move |inner| async move {
            let key = format!("{}:suspensions", inner.prefix);
            let removed: i64 = inner.conn().hdel(key, region).await.map_err(store_error)?;
            Ok(removed == 1)
        })
    }

    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>> {
        self.op(move |inner| async move {
            let key = format!("{}:suspensions", inner.prefix);
            let all: HashMap<String, String> =
                inner.conn().hgetall(key).await.map_err(store_error)?;
            let mut out: Vec<Suspension> = all
                .values()
                .filter_map(|json| serde_json::from_str(json).ok())
                .collect();
            out.sort_by(|a, b| a.region.cmp(&b.region));
            Ok(out)
        })
    }

    fn add_consent(&self, record: ConsentRecord) -> StoreFuture<'static, ()> {
        self.write(move |inner| async move {
            let mut clean = record.clone();
            clean.revoked_at = None;
            clean.revoked_by = None;
            let json =
                serde_json::to_string(&clean).map_err(|e| StoreError::Backend(e.to_string()))?;
            let _: i64 = inner
                .conn()
                .hset(inner.consent_key(&record.id), "rec", json)
                .await
                .map_err(store_error)?;
            let _: i64 = inner
                .conn()
                .sadd(inner.consents_key(&record.phone_number), &record.id)
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>> {
        let id = id.to_string();
        self.op(move |inner| async move { inner.consent(&id).await })
    }

    fn revoke_consent(
        &self,
        id: &str,
        now: i64,
        by: &str,
    ) -> StoreFuture<'static, Option<ConsentRecord>> {
        let (id, by) = (id.to_string(), by.to_string());
        self.write(move |inner| async move {
            inner.revoke(&id, now, &by).await?;
            inner.consent(&id).await
        })
    }

    fn revoke_consents_for(
        &self,
        phone_number: &str,
        tenant: Option<&str>,
        now: i64,
        by: &str,
    ) -> StoreFuture<'static, Vec<ConsentRecord>> {
        let (number, tenant, by) = (
            phone_number.to_string(),
            tenant.map(str::to_string),
            by.to_string(),
        );
        self.write(move |inner| async move {
            let ids: Vec<String> = inner
                .conn()
                .smembers(inner.consents_key(&number))
                .await
                .map_err(store_error)?;
            let mut revoked = Vec::new();
            for id in ids {
                let Some(record) = inner.consent(&id).await? else {
                    continue;
                };
                if tenant.as_deref().is_some_and(|t| t != record.tenant) {
                    continue;
                }
                if inner.revoke(&id, now, &by).await? == 1 {
                    revoked.push(ConsentRecord {
                        revoked_at: Some(now),
                        revoked_by: Some(by.clone()),
                        ..record
                    });
                }
            }
            Ok(revoked)
        })
    }

    fn purge_attempts(&self, _now: i64) -> StoreFuture<'static, usize> {
        // Each take forgets its number's old attempts, and a number's key lapses a window after
        // its last attempt: nothing to sweep.
        Box::pin(std::future::ready(Ok(0)))
    }

    fn flush(&self) -> StoreFuture<'static, ()> {
        // Every write is acknowledged by Redis before its operation resolves.
        Box::pin(std::future::ready(Ok(())))
    }

    fn ready(&self) -> StoreFuture<'static, ()> {
        self.op(move |inner| async move {
            let _: String = ::redis::cmd("PING")
                .query_async(&mut inner.conn())
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }
}
