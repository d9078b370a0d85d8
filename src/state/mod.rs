//! Durable state: concurrency slots, credit holds, spend, call records and idempotency records.
//!
//! One [`StateStore`] trait; the embedded SQLite backend ([`sqlite::SqliteStore`]) is the default.
//! Every operation that changes accounting is one atomic step in the store, so two requests can
//! never both take the last slot or the last credit, and each is durable before the gateway acts
//! on it. Times are passed in (from the injected clock), never read inside the store.
//!
//! A call's accounting life:
//!
//! ```text
//! admit ──> (forward) ──> bind ──> event(s) ──> settle (final event, reconciliation)
//!   │          │           │                └─> expire (lease ends: settled at the full hold)
//!   │          │           └── release (the upstream refused, or was never reached): nothing kept
//!   │          └── no answer (timeout, connection lost): kept pending; the first event binds
//!   │              it, or the lease ends it at the full hold
//!   └── refused: nothing taken
//! ```

pub mod accounting;
pub mod redis;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde_json::Value;

/// A boxed store future.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// An operation that is queued, in order behind everything queued before it: every later
/// operation sees it. Awaiting this waits until it is durable.
pub type Queued = StoreFuture<'static, ()>;

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The queue into the store is full: the request is refused (503, `Retry-After`) and
    /// nothing was taken.
    #[error("state store: too many operations waiting")]
    Busy,
    /// The store cannot be reached or did not answer in time (Redis down, a network fault): the
    /// request is refused (503 `state_unavailable`, `Retry-After`), failing closed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store has shut down.
    #[error("state store: closed")]
    Closed,
    /// The backend failed (I/O, corruption, a constraint). Requests that need it are answered 500.
    #[error("state store: {0}")]
    Backend(String),
    /// The operation breaks a rule of the records and was refused, changing nothing (a bind of an
    /// upstream id another call has, or of a call to a second id): trying again cannot help.
    #[error("state store: refused: {0}")]
    Refused(String),
    /// The live counters disagree with the records (a consistency check found it).
    #[error("state store: counters disagree with the records: {0}")]
    Inconsistent(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

impl From<StoreError> for crate::error::GatewayError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Busy => crate::error::GatewayError::Overloaded {
                message: "the gateway's state store is saturated; retry shortly".into(),
                retry_after: 1,
            },
            StoreError::Unavailable(detail) => crate::error::GatewayError::StateUnavailable {
                message: format!(
                    "the gateway's shared state store is unavailable ({detail}); nothing was admitted, retry shortly"
                ),
                retry_after: 1,
            },
            other => crate::error::GatewayError::Internal(other.to_string()),
        }
    }
}

/// How often a budget starts afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Never: a fixed allowance.
    #[default]
    None,
    Daily,
    Monthly,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::None => "none",
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }

    pub fn parse(s: &str) -> Period {
        match s {
            "daily" => Period::Daily,
            "monthly" => Period::Monthly,
            _ => Period::None,
        }
    }

    /// The start and end (unix microseconds) of the period containing `now`, in `tz`. `none` is
    /// one period from 0 to the end of time; an unknown zone likewise (checked at policy load).
    pub fn bounds(self, tz: &str, now_us: i64) -> (i64, i64) {
        let forever = (0, i64::MAX);
        let Ok(ts) = jiff::Timestamp::from_microsecond(now_us) else {
            return forever;
        };
        let Ok(zoned) = ts.in_tz(tz) else {
            return forever;
        };
        let bounds = match self {
            Period::None => return forever,
            Period::Daily => zoned
                .start_of_day()
                .and_then(|start| Ok((start.clone(), start.tomorrow()?.start_of_day()?))),
            Period::Monthly => zoned.first_of_month().and_then(|first| {
                let start = first.start_of_day()?;
                let end = first.last_of_month()?.tomorrow()?.start_of_day()?;
                Ok((start, end))
            }),
        };
        bounds
            .map(|(s, e)| {
                (
                    s.timestamp().as_microsecond(),
                    e.timestamp().as_microsecond(),
                )
            })
            .unwrap_or(forever)
    }
}

/// A tenant's budget terms, as its policy says now.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetTerms {
    /// Credits per period.
    pub credits: i64,
    pub period: Period,
    /// IANA zone in which periods start.
    pub timezone: String,
}

/// Everything admission needs, decided by the caller from the tenant's policy.
#[derive(Debug, Clone)]
pub struct AdmitRequest {
    /// The gateway's id for this reservation (a UUIDv7).
    pub reservation_id: String,
    pub tenant: String,
    /// SHA-256 (hex) of the secret of the call's relay token (see [`RelayToken`]).
    pub token_hash: String,
    /// The tenant's concurrency limit; `None`: only the account-wide cap applies.
    pub tenant_max_concurrent: Option<u32>,
    pub account_max_concurrent: u32,
    /// `None`: no budget (spend is still recorded).
    pub budget: Option<BudgetTerms>,
    /// Credits held: the worst-case cost.
    pub hold: i64,
    /// Credits per billing increment, and the increment, for settlement.
    pub price: i64,
    pub increment_secs: u32,
    pub max_duration: u32,
    /// When the slot and hold lapse if nothing else ends them.
    pub lease_expires_at: i64,
    pub now: i64,
    /// The tenant's own webhook, to relay events to.
    pub tenant_webhook: Option<String>,
}

/// Admission's verdict. A refusal took nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitOutcome {
    Admitted,
    TenantSlotsFull { limit: u32 },
    AccountSlotsFull { limit: u32 },
    InsufficientCredits { needed: i64, available: i64 },
}

/// A call as the gateway records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallRecord {
    pub reservation_id: String,
    pub tenant: String,
    /// The upstream's call id, once bound.
    pub call_id: Option<String>,
    /// `pending` until the upstream answers; then the upstream's status; `expired` when the lease
    /// ran out.
    pub status: String,
    /// The call object the upstream returned.
    pub object: Option<Value>,
    /// Whether the call still holds a concurrency slot (and its hold).
    pub live: bool,
    pub hold: i64,
    pub charged: i64,
    pub duration: Option<i64>,
    pub max_duration: i64,
    pub lease_expires_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub tenant_webhook: Option<String>,
}

impl CallRecord {
    /// The call object as a tenant sees it: the upstream's object with the current status.
    pub fn public_view(&self) -> Value {
        let mut object = self.object.clone().unwrap_or_else(|| serde_json::json!({}));
        if let Some(map) = object.as_object_mut() {
            if let Some(id) = &self.call_id {
                map.insert("id".into(), Value::String(id.clone()));
            }
            map.insert("status".into(), Value::String(self.status.clone()));
            if let Some(d) = self.duration {
                map.insert("duration".into(), Value::from(d));
            }
        }
        object
    }
}

/// A call's relay token, as handed to the upstream in its webhook URL: `<reservation id>.<secret>`.
/// The reservation id finds the call by its primary key (no index of tokens to keep up on every
/// admission); the secret (256 random bits, stored only as its SHA-256) proves the sender got
/// the URL from us.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayToken {
    pub reservation_id: String,
    /// SHA-256 (hex) of the secret part.
    pub secret_hash: String,
}

impl std::fmt::Debug for RelayToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayToken")
            .field("reservation_id", &self.reservation_id)
            .finish_non_exhaustive()
    }
}

impl RelayToken {
    /// A new token for a reservation: the token to hand out, and the hash of its secret to store.
    pub fn issue(reservation_id: &str) -> (String, String) {
        let secret = crate::hexstr::lower(rand::random::<[u8; 32]>());
        let hash = Self::hash(&secret);
        // Joined, not `format!`ed: the formatting machinery costs more than the copy (one token
        // per admission).
        ([reservation_id, ".", &secret].concat(), hash)
    }

    /// Read a token from a relay URL; `None` if it is not one we could have issued.
    pub fn parse(token: &str) -> Option<RelayToken> {
        let Some((reservation_id, secret)) = token.split_once('.') else {
            // Issued before tokens named their reservation: 64 hex digits, found by their hash.
            let legacy = token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit());
            return legacy.then(|| RelayToken {
                reservation_id: String::new(),
                secret_hash: Self::hash(token),
            });
        };
        let plausible = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !plausible(reservation_id, 64) || !plausible(secret, 128) {
            return None;
        }
        Some(RelayToken {
            reservation_id: reservation_id.to_string(),
            secret_hash: Self::hash(secret),
        })
    }

    /// Whether this token was issued before tokens named their reservation (only its hash finds
    /// its call).
    pub fn is_legacy(&self) -> bool {
        self.reservation_id.is_empty()
    }

    /// SHA-256 (hex) of a secret, as stored.
    pub fn hash(secret: &str) -> String {
        use sha2::Digest;
        crate::hexstr::lower(sha2::Sha256::digest(secret.as_bytes()))
    }

    /// Whether `stored` (the hash kept at admission) is this token's, in constant time.
    pub fn matches(&self, stored: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.secret_hash.as_bytes().ct_eq(stored.as_bytes()).into()
    }
}

/// A call event, read from the upstream's webhook payload.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEvent {
    pub call_id: Option<String>,
    pub status: String,
    /// Talk time, seconds.
    pub duration: Option<i64>,
    /// Whether `status` ends the call.
    pub is_final: bool,
}

/// What an event did.
#[derive(Debug, Clone, PartialEq)]
pub enum EventOutcome {
    /// No call has this token (or its secret is wrong): refused, nothing changed.
    UnknownToken,
    /// The event names another call than the token's: refused, nothing changed.
    CallMismatch,
    /// Applied; `settled` when this event ended the call's accounting.
    Applied {
        record: Box<CallRecord>,
        settled: bool,
    },
}

/// A tenant's live usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Concurrency slots held.
    pub slots: i64,
    /// Credits held by live calls.
    pub holds: i64,
    /// Credits spent in the current period.
    pub spent: i64,
    /// Start of the current period (unix microseconds; 0 for `none`).
    pub period_start: i64,
}

/// A stored answer to replay for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: String,
}

/// What a key was claimed with: the request's body hash and the key's lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    pub body_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// The state of an idempotency key when a request arrives with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// New (or expired): this request owns the key now.
    Proceed,
    /// Done before: replay this.
    Replay(StoredResponse),
    /// Another request with the key is in flight.
    InFlight,
    /// The key was used with a different body.
    Conflict,
}

/// A do-not-call entry recorded at run time: an opt-out a tenant captured during a call, or an
/// operator's entry. It stops calls to the number at once, on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OptOut {
    /// The number, in E.164.
    pub phone_number: String,
    /// `None`: every tenant's calls (the company is one caller for the person); else only
    /// this tenant's.
    pub tenant: Option<String>,
    /// Who recorded it: `tenant:<id>` or `admin`.
    pub source: String,
    /// When (unix microseconds).
    pub created_at: i64,
}

/// A consent record: the called person's prior express consent to AI-voice calls, as a tenant
/// registered it. Kept after revocation, as evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ConsentRecord {
    pub id: String,
    pub tenant: String,
    pub phone_number: String,
    pub scope: String,
    /// When the consent was given (unix microseconds).
    pub captured_at: i64,
    /// Where (a web form, a call recording).
    pub source: String,
    /// The seller the consent names.
    pub seller: String,
    /// The consent text as shown, if given, and its SHA-256 (hex).
    pub text: Option<String>,
    pub text_sha256: String,
    pub created_at: i64,
    /// When it was revoked, and why (`tenant`, `opt_out`, `admin`).
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<String>,
}

/// Calls to a region suspended until a time (a declared emergency), by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Suspension {
    /// A country (`US`) or subdivision (`US-LA`).
    pub region: String,
    /// Unix microseconds.
    pub until: i64,
    pub reason: String,
    pub created_at: i64,
}

/// The longest attempt window a policy may set (30 days); attempts older than this are
/// forgotten by [`StateStore::purge_attempts`].
pub const MAX_ATTEMPT_WINDOW_US: i64 = 30 * 24 * 3_600 * 1_000_000;

/// Which calls an attempt cap counts: one tenant's, or every tenant's (`scope = "account"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptScope {
    Tenant(String),
    Account,
}

impl AttemptScope {
    /// The scope's name in the store: the tenant id, or `#account` (which no tenant id can be).
    pub fn key(&self) -> &str {
        match self {
            AttemptScope::Tenant(t) => t,
            AttemptScope::Account => "#account",
        }
    }
}

/// At most `max` attempts within `window` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptLimit {
    pub max: u32,
    pub window: i64,
}

/// The caps on calls to one destination in one scope, as admission applies them: every limit
/// must hold, and one attempt counts against them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptCap {
    pub scope: AttemptScope,
    pub phone_number: String,
    pub limits: Vec<AttemptLimit>,
}

/// What [`StateStore::take_attempt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Counted.
    Taken,
    /// A limit is reached; nothing was counted. A call can be placed again at `retry_at` (unix
    /// microseconds), when enough attempts have left the windows; `limit` is the index in
    /// [`AttemptCap::limits`] of the limit that holds longest.
    Exceeded { retry_at: i64, limit: usize },
}

impl AttemptCap {
    /// The longest window of the limits.
    pub fn longest_window(&self) -> i64 {
        self.limits.iter().map(|l| l.window).max().unwrap_or(0)
    }

    /// The verdict at `now` for these attempt times (oldest first; at least those within the
    /// longest window).
    pub fn verdict(&self, times: &[i64], now: i64) -> AttemptOutcome {
        let mut retry_at: Option<(i64, usize)> = None;
        for (index, limit) in self.limits.iter().enumerate() {
            let max = limit.max as usize;
            let counted: Vec<i64> = times
                .iter()
                .copied()
                .filter(|&at| at > now - limit.window)
                .collect();
            if counted.len() >= max {
                // The attempt whose leaving brings the count under this limit (`max` 0: never).
                let at = match max {
                    0 => i64::MAX - limit.window,
                    _ => counted[counted.len() - max],
                };
                let candidate = (at + limit.window, index);
                if retry_at.is_none_or(|(r, _)| candidate.0 > r) {
                    retry_at = Some(candidate);
                }
            }
        }
        match retry_at {
            Some((retry_at, limit)) => AttemptOutcome::Exceeded { retry_at, limit },
            None => AttemptOutcome::Taken,
        }
    }
}

/// The upstream's answer to a call it accepted, as a bind records it: the call object as the
/// upstream sent it (JSON text, stored as it is: never parsed and written out again on the
/// request path) and the status it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answered {
    /// The call object, JSON text.
    pub object: std::sync::Arc<str>,
    /// The status the answer names ([`accounting::answered_status`]: `queued` when none).
    pub status: String,
}

impl From<Value> for Answered {
    fn from(object: Value) -> Self {
        Answered {
            status: accounting::answered_status(&object).to_string(),
            object: object.to_string().into(),
        }
    }
}

/// The durable state behind admission, the lifecycle and idempotency.
pub trait StateStore: Send + Sync + 'static {
    /// Atomically take a slot (tenant and account-wide) and hold credits, or refuse and take nothing.
    fn admit(&self, req: AdmitRequest) -> StoreFuture<'static, AdmitOutcome>;
    /// The upstream accepted the call: bind the tenant's reservation to its id, object and lease. Resolves
    /// once the bind is queued (so the answer can go out without waiting for a commit); the
    /// [`Queued`] it gives resolves once it is durable. An upstream id names one call (within
    /// the tenant at least; account-wide on SQLite) and a call keeps its id: a bind that would
    /// break either is refused, at either step, and changes nothing; the same bind again is
    /// harmless.
    fn bind(
        &self,
        tenant: &str,
        reservation_id: &str,
        call_id: &str,
        answered: Answered,
        lease_expires_at: i64,
        now: i64,
    ) -> StoreFuture<'static, Queued>;
    /// The call was not placed: free the slot and the hold, charge nothing, forget the reservation.
    fn release(&self, reservation_id: &str) -> StoreFuture<'static, ()>;
    /// [`StateStore::release`] without waiting, for drop guards.
    fn release_detached(&self, reservation_id: &str);
    /// Apply an event received on the relay with this token.
    fn record_event(
        &self,
        token: &RelayToken,
        event: CallEvent,
        now: i64,
    ) -> StoreFuture<'static, EventOutcome>;
    /// Apply the upstream's view of one of a tenant's calls (reconciliation, refresh on read):
    /// the call as it is now, and whether this settled it; `None` if the tenant has no such call.
    fn apply_upstream_state(
        &self,
        tenant: &str,
        call_id: &str,
        event: CallEvent,
        object: Option<Value>,
        now: i64,
    ) -> StoreFuture<'static, Option<(CallRecord, bool)>>;
    /// Release a stuck call of a tenant (found by its upstream id) by settling it now at a
    /// stated charge: the call as it is now and whether this settled it (`false`: it had already
    /// ended); `None` if the tenant has no such call.
    fn settle_stated(
        &self,
        tenant: &str,
        call_id: &str,
        charge: i64,
        now: i64,
    ) -> StoreFuture<'static, Option<(CallRecord, bool)>>;
    /// Adjust a tenant's spend in its current budget period by `delta` credits (negative: a top
    /// up); returns its usage after.
    fn adjust_spend(
        &self,
        tenant: &str,
        terms: Option<BudgetTerms>,
        delta: i64,
        now: i64,
    ) -> StoreFuture<'static, Usage>;
    /// Settle every call whose lease ended by `now` at its full hold; returns them.
    fn expire_leases(&self, now: i64) -> StoreFuture<'static, Vec<CallRecord>>;
    /// Live calls bound to an upstream id that were not updated since `quiet_since`, or whose
    /// lease ends by `lapsing_by` (those first): what the reconciler asks the upstream about.
    fn quiet_calls(
        &self,
        quiet_since: i64,
        lapsing_by: i64,
        limit: usize,
    ) -> StoreFuture<'static, Vec<CallRecord>>;
    /// One of a tenant's calls by upstream id.
    fn get_call(&self, tenant: &str, call_id: &str) -> StoreFuture<'static, Option<CallRecord>>;
    /// A tenant's bound calls, newest first, after the reservation id `before` if given.
    fn list_calls(
        &self,
        tenant: &str,
        limit: usize,
        before: Option<String>,
    ) -> StoreFuture<'static, Vec<CallRecord>>;
    /// A tenant's slots, holds and spend.
    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage>;
    /// Claim or look up an idempotency key.
    fn idempotency_begin(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreFuture<'static, IdempotencyBegin>;
    /// Store the answer for a key (claimed, or its claim lost to a failed commit), queued like
    /// [`StateStore::bind`].
    fn idempotency_complete(
        &self,
        tenant: &str,
        key: &str,
        claim: IdempotencyClaim,
        response: StoredResponse,
    ) -> StoreFuture<'static, Queued>;
    /// Give a claimed key up (the request failed in a way worth retrying).
    fn idempotency_abandon(&self, tenant: &str, key: &str) -> StoreFuture<'static, ()>;
    /// Forget idempotency records that expired by `now`.
    fn purge_idempotency(&self, now: i64) -> StoreFuture<'static, usize>;
    /// Check the live counters against the records (`StoreError::Inconsistent` if they differ).
    fn check_consistency(&self, now: i64) -> StoreFuture<'static, ()>;
    /// Record an opt-out; `false` if the number already had an entry of this scope (the first
    /// is kept).
    fn add_opt_out(&self, entry: OptOut) -> StoreFuture<'static, bool>;
    /// Remove a number's entry of this scope (`None`: the shared one); `false` if there was none.
    fn remove_opt_out(
        &self,
        phone_number: &str,
        tenant: Option<&str>,
    ) -> StoreFuture<'static, bool>;
    /// Every entry for a number (shared, and any tenant's).
    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>>;
    /// Count one attempt (`attempt_id`: the reservation's id) under `cap` at `now`, or refuse
    /// and count nothing, atomically.
    fn take_attempt(
        &self,
        cap: &AttemptCap,
        attempt_id: &str,
        now: i64,
    ) -> StoreFuture<'static, AttemptOutcome>;
    /// Forget a counted attempt: its call was never placed.
    fn return_attempt(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        attempt_id: &str,
    ) -> StoreFuture<'static, ()>;
    /// The times (oldest first) of the attempts to a number in a scope after `since`.
    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>>;
    /// Forget attempts older than the longest window ([`MAX_ATTEMPT_WINDOW_US`]) before `now`.
    fn purge_attempts(&self, now: i64) -> StoreFuture<'static, usize>;
    /// Forget settled calls whose record's retention has ended by `now`, with their upstream
    /// ids; how many. Redis keeps a settled call 30 days; SQLite keeps every call (its file is
    /// the record), so it forgets none.
    fn purge_calls(&self, now: i64) -> StoreFuture<'static, usize>;
    /// Record a consent.
    fn add_consent(&self, record: ConsentRecord) -> StoreFuture<'static, ()>;
    /// A consent record by id (revoked ones too).
    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>>;
    /// Revoke a record (it is kept); the record after, `None` if there is none. A record
    /// already revoked stays as it was.
    fn revoke_consent(
        &self,
        id: &str,
        now: i64,
        by: &str,
    ) -> StoreFuture<'static, Option<ConsentRecord>>;
    /// Revoke every live record for a number (only `tenant`'s if given); the records revoked.
    fn revoke_consents_for(
        &self,
        phone_number: &str,
        tenant: Option<&str>,
        now: i64,
        by: &str,
    ) -> StoreFuture<'static, Vec<ConsentRecord>>;
    /// Suspend calls to a region (replacing its suspension, if any).
    fn suspend(&self, suspension: Suspension) -> StoreFuture<'static, ()>;
    /// Lift a region's suspension; `false` if there was none.
    fn lift_suspension(&self, region: &str) -> StoreFuture<'static, bool>;
    /// Every suspension recorded (lapsed ones too, until lifted).
    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>>;
    /// Wait until everything queued so far is durable (graceful shutdown).
    fn flush(&self) -> StoreFuture<'static, ()>;
    /// The end of graceful shutdown: everything queued so far is made durable and this resolves
    /// once the store has let go of its files and threads, so that the process may exit. A
    /// backend that closes (SQLite) then refuses later operations ([`StoreError::Closed`]). By
    /// default (Redis: every write is acknowledged when it resolves), a [`StateStore::flush`].
    fn close(&self) -> StoreFuture<'static, ()> {
        self.flush()
    }
    /// Whether the store answers (`/readyz`).
    fn ready(&self) -> StoreFuture<'static, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What a dry run reads: usage, opt-outs and attempts, never changing anything. Every store is
/// one; so is a read-only snapshot of a state file ([`sqlite::SqliteSnapshot`]).
pub trait StateView: Send + Sync {
    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage>;
    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>>;
    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>>;
    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>>;
    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>>;
}

impl<S: StateStore + ?Sized> StateView for S {
    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage> {
        StateStore::usage(self, tenant, now)
    }
    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>> {
        StateStore::suspensions(self)
    }
    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>> {
        StateStore::get_consent(self, id)
    }
    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>> {
        StateStore::opt_outs(self, phone_number)
    }
    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>> {
        StateStore::attempts(self, scope, phone_number, since)
    }
}

impl<S: StateStore + ?Sized> StateView for std::sync::Arc<S> {
    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage> {
        StateStore::usage(&**self, tenant, now)
    }
    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>> {
        StateStore::suspensions(&**self)
    }
    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>> {
        StateStore::get_consent(&**self, id)
    }
    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>> {
        StateStore::opt_outs(&**self, phone_number)
    }
    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>> {
        StateStore::attempts(&**self, scope, phone_number, since)
    }
}

pub use accounting::charge_for;

/// Open the configured backend: the store, and for a shared one its request-rate limits (one
/// allowance across replicas).
pub fn open(
    settings: &crate::config::StateSettings,
) -> Result<
    (
        std::sync::Arc<dyn StateStore>,
        Option<redis::SharedRateLimits>,
    ),
    StoreError,
> {
    use crate::config::StateBackend;
    Ok(match settings.backend {
        StateBackend::Sqlite => {
            let store = sqlite::SqliteStore::open_with(
                &settings.path,
                sqlite::SqliteOptions {
                    synchronous: settings.synchronous,
                    queue_capacity: settings.queue_capacity,
                    ..sqlite::SqliteOptions::default()
                },
            )?;
            (std::sync::Arc::new(store), None)
        }
        StateBackend::Redis => {
            let store = redis::RedisStore::open(redis::RedisOptions {
                url: settings.redis_url.clone().unwrap_or_default(),
                cluster: settings.redis_cluster,
                prefix: settings.redis_prefix.clone(),
                timeout: std::time::Duration::from_millis(settings.redis_timeout_ms),
            })?;
            let rates = store.rate_limits();
            (std::sync::Arc::new(store), Some(rates))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_tokens_name_their_reservation_and_prove_their_secret() {
        let (token, stored) = RelayToken::issue("0190-abc");
        let parsed = RelayToken::parse(&token).unwrap();
        assert_eq!(parsed.reservation_id, "0190-abc");
        assert!(parsed.matches(&stored));
        let forged = RelayToken::parse("0190-abc.00ff").unwrap();
        assert!(!forged.matches(&stored));
        let legacy = RelayToken::parse(&"ab".repeat(32)).unwrap();
        assert!(legacy.is_legacy());
        assert!(legacy.matches(&RelayToken::hash(&"ab".repeat(32))));
        for bad in ["", "no-dot", ".secret", "res.", "a/b.c", "a.b c"] {
            assert!(RelayToken::parse(bad).is_none(), "{bad:?}");
        }
        assert!(!format!("{parsed:?}").contains(&parsed.secret_hash));
    }

    #[test]
    fn periods_start_in_their_zone() {
        let now = jiff::Timestamp::from_second(1_767_650_400).unwrap(); // 2026-01-05T22:00Z
        let us = now.as_microsecond();
        let day_ny = Period::Daily.bounds("America/New_York", us).0;
        assert_eq!(
            jiff::Timestamp::from_microsecond(day_ny)
                .unwrap()
                .to_string(),
            "2026-01-05T05:00:00Z"
        );
        let month_tokyo = Period::Monthly.bounds("Asia/Tokyo", us).0;
        // 07:00 on the 6th in Tokyo: still January there; the month began at 2025-12-31T15:00Z.
        assert_eq!(
            jiff::Timestamp::from_microsecond(month_tokyo)
                .unwrap()
                .to_string(),
            "2025-12-31T15:00:00Z"
        );
        assert_eq!(Period::None.bounds("UTC", us), (0, i64::MAX));
        let (start, end) = Period::Monthly.bounds("Asia/Tokyo", us);
        assert_eq!((start, end), (month_tokyo, 1_769_871_600_000_000)); // 2026-01-31T15:00Z
    }
}
