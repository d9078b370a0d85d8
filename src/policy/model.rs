//! The on-disk shape of a tenant policy file (`policies/tenants/<id>.toml`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::phone::NumberType;

/// One tenant's policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantFile {
    /// Stable tenant id (letters, digits, `-`, `_`), used in logs, metrics and the tenant tag.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: Option<String>,
    /// SHA-256 (hex) of each accepted API key; `callgate keygen` prints one. Keys themselves are
    /// never stored. Several entries allow rotation.
    pub key_sha256: Vec<String>,
    #[serde(default)]
    pub numbers: NumbersPolicy,
    pub agents: AgentsPolicy,
    #[serde(default)]
    pub calls: CallsPolicy,
    #[serde(default)]
    pub destinations: DestinationsPolicy,
    /// Calling hours in the recipient's local time; none means any time.
    #[serde(default)]
    pub hours: Option<HoursPolicy>,
    #[serde(default)]
    pub webhooks: WebhookPolicy,
    #[serde(default)]
    pub metadata: MetadataPolicy,
    #[serde(default)]
    pub redaction: RedactionPolicy,
    #[serde(default)]
    pub limits: LimitsPolicy,
    #[serde(default)]
    pub budget: BudgetPolicy,
    /// A cap on calls to one destination; none: the shared default's (`defaults.toml`), if any.
    #[serde(default)]
    pub attempts: Option<AttemptsPolicy>,
    /// Consent for AI-voice calls: the tenant's own switch (no pack turns it on).
    #[serde(default)]
    pub consent: Option<ConsentPolicy>,
    /// Jurisdiction packs (`policies/packs/<name>.toml`) the tenant inherits.
    #[serde(default)]
    pub packs: Vec<String>,
    /// Legal holidays to add, by region: `"US-AL" = ["2026-12-24"]`.
    #[serde(default)]
    pub holidays: std::collections::BTreeMap<String, Vec<String>>,
}

/// What every tenant inherits where its own file is silent (`policies/defaults.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsFile {
    #[serde(default)]
    pub attempts: Option<AttemptsPolicy>,
    /// Legal holidays the operator adds for every tenant, by region.
    #[serde(default)]
    pub holidays: std::collections::BTreeMap<String, Vec<String>>,
}

/// Prior express consent for AI-voice calls (FCC 24-17): each call cites a consent record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentPolicy {
    /// Calls must cite a consent record.
    #[serde(default)]
    pub required: bool,
    /// The record's scope must be one of these; empty: any scope serves.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The metadata key that holds the record's id.
    #[serde(default = "consent_key")]
    pub metadata_key: String,
    /// A consent captured longer ago than this no longer serves.
    #[serde(default)]
    pub max_age_days: Option<u32>,
}

fn consent_key() -> String {
    "consent_id".into()
}

/// At most `max_calls` calls to the same destination in a rolling window of `window_secs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptsPolicy {
    pub max_calls: u32,
    /// 1 second to 30 days.
    pub window_secs: u64,
    /// `tenant` (default): this tenant's calls count; `account`: every tenant's calls to the
    /// number count (debt-collection and state rules count per person, not per team).
    #[serde(default)]
    pub scope: AttemptsScope,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptsScope {
    #[default]
    Tenant,
    Account,
}

/// Concurrency and request rate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPolicy {
    /// Calls the tenant may have in flight at once; none: only the account-wide cap applies.
    #[serde(default)]
    pub max_concurrent_calls: Option<u32>,
    /// Sustained `POST /v1/calls` rate; none: no rate limit.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Requests allowed in a burst above the sustained rate (default: one minute's worth / 6,
    /// at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Credits: budget, period and price.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetPolicy {
    /// Credits per period; none: unlimited (spend is still recorded).
    #[serde(default)]
    pub credits: Option<i64>,
    /// `none` (a fixed allowance), `daily` or `monthly`.
    #[serde(default)]
    pub period: crate::state::Period,
    /// IANA zone in which periods start (default `UTC`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// Credits per started billing increment.
    #[serde(default = "one")]
    pub price_per_increment: i64,
    /// The billing increment, seconds (default 60: per started minute).
    #[serde(default = "sixty")]
    pub increment_secs: u32,
    /// Price per increment by destination region (ISO 3166-1 alpha-2), overriding the default.
    #[serde(default)]
    pub price_by_country: std::collections::BTreeMap<String, i64>,
}

fn utc() -> String {
    "UTC".into()
}
fn one() -> i64 {
    1
}
fn sixty() -> u32 {
    60
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy {
            credits: None,
            period: crate::state::Period::None,
            timezone: utc(),
            price_per_increment: one(),
            increment_secs: sixty(),
            price_by_country: Default::default(),
        }
    }
}

impl BudgetPolicy {
    /// Price per increment for a destination region.
    pub fn price_for(&self, region: Option<&str>) -> i64 {
        region
            .and_then(|r| self.price_by_country.get(r))
            .copied()
            .unwrap_or(self.price_per_increment)
    }

    /// The worst-case cost of a call of `max_duration` seconds.
    pub fn hold_for(&self, max_duration: u32, region: Option<&str>) -> i64 {
        let increment = i64::from(self.increment_secs.max(1));
        let increments = (i64::from(max_duration) + increment - 1) / increment;
        increments * self.price_for(region)
    }
}

/// Caller ids.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumbersPolicy {
    /// `from_number` values the tenant may use. Empty: the tenant may not set `from_number`
    /// (the account's primary number is used).
    #[serde(default)]
    pub from_allow: Vec<String>,
    /// Injected as `from_number` when the request has none; must be in `from_allow`.
    #[serde(default)]
    pub from_default: Option<String>,
}

/// Agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsPolicy {
    /// `agent_id` values the tenant may use; any other is answered `agent_not_found`.
    pub allow: Vec<String>,
}

/// Call parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallsPolicy {
    /// Largest `max_duration` the tenant may ask for, seconds (1..3600).
    #[serde(default = "default_cap")]
    pub max_duration: u32,
    /// `max_duration` injected when the request has none (the upstream's own default is 3600).
    /// Defaults to `max_duration`.
    #[serde(default)]
    pub default_max_duration: Option<u32>,
    /// Recording rule.
    #[serde(default)]
    pub record: RecordRule,
}

fn default_cap() -> u32 {
    3600
}

impl Default for CallsPolicy {
    fn default() -> Self {
        CallsPolicy {
            max_duration: default_cap(),
            default_max_duration: None,
            record: RecordRule::default(),
        }
    }
}

/// What the tenant may say about recording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordRule {
    /// Passed through as asked (upstream default: recorded).
    #[default]
    Any,
    /// Always recorded: `record: false` is refused, a missing `record` is set to `true`.
    Always,
    /// Never recorded: `record: true` is refused, a missing `record` is set to `false`.
    Never,
}

/// Destination rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationsPolicy {
    /// ISO 3166-1 alpha-2 regions that may be called; none means any.
    #[serde(default)]
    pub countries_allow: Option<Vec<String>>,
    /// Regions that may never be called.
    #[serde(default)]
    pub countries_deny: Vec<String>,
    /// Number types that may be called (`mobile`, `fixed_line`, `fixed_line_or_mobile`, ...);
    /// none means any.
    #[serde(default)]
    pub number_types_allow: Option<Vec<NumberType>>,
    /// Number types that may never be called (`premium_rate`, `shared_cost`, ...).
    #[serde(default)]
    pub number_types_deny: Vec<NumberType>,
    /// E.164 prefixes that may never be called (`+1900`).
    #[serde(default)]
    pub prefixes_deny: Vec<String>,
    /// Do-not-call lists, paths relative to `policies/`, one E.164 number a line.
    #[serde(default)]
    pub do_not_call: Vec<PathBuf>,
}

/// Calling hours, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoursPolicy {
    /// Local start time, `HH:MM`, inclusive.
    pub start: String,
    /// Local end time, `HH:MM`, exclusive.
    pub end: String,
    /// Days calls may be placed (`mon` .. `sun`); default Monday to Friday.
    #[serde(default)]
    pub days: Option<Vec<String>>,
    /// When the recipient's zone cannot be told from the number: `deny` (default) or `allow`.
    #[serde(default)]
    pub unknown_zone: UnknownZone,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownZone {
    #[default]
    Deny,
    Allow,
}

/// Where the tenant's webhook may point.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookPolicy {
    /// Hosts `webhook_url` may name (`hooks.acme.example`, or `*.acme.example` for subdomains).
    /// Empty: the tenant may not set `webhook_url`.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Allow plain `http://` webhook URLs (default: HTTPS only).
    #[serde(default)]
    pub allow_http: bool,
    /// Secret that signs relayed events (`Callgate-Signature`). Prefer `secret_env` or
    /// `secret_file`; required when `allowed_hosts` is not empty.
    #[serde(default)]
    pub secret: Option<crate::config::Secret>,
    /// Environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the secret (relative to `policies/`).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

impl WebhookPolicy {
    /// Whether `host` is allowed by `allowed_hosts`.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed_hosts.iter().any(|allowed| {
            let allowed = allowed.to_ascii_lowercase();
            match allowed.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                None => host == allowed,
            }
        })
    }
}

/// Metadata rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataPolicy {
    /// Keys every request must carry in `metadata`.
    #[serde(default)]
    pub required: Vec<String>,
    /// Key under which the gateway writes the tenant id into `metadata` (default
    /// `callgate_tenant`); a request may not set it itself.
    #[serde(default)]
    pub tenant_tag_key: Option<String>,
}

impl MetadataPolicy {
    pub fn tag_key(&self) -> &str {
        self.tenant_tag_key.as_deref().unwrap_or("callgate_tenant")
    }
}

/// Redaction of personal data in `metadata`, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionPolicy {
    /// Keys removed whatever their value (case-insensitive).
    #[serde(default)]
    pub drop_keys: Vec<String>,
    /// Keys whose whole value is replaced by a keyed hash (joinable, not reversible).
    #[serde(default)]
    pub hash_keys: Vec<String>,
    /// Keys whose whole value is replaced by `[redacted]`.
    #[serde(default)]
    pub mask_keys: Vec<String>,
    /// Patterns looked for inside every string value.
    #[serde(default)]
    pub patterns: Vec<PatternRule>,
}

/// A pattern to find in metadata values, and what to do with each match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRule {
    pub kind: PatternKind,
    /// For `kind = "regex"`: the pattern (Rust `regex` syntax).
    #[serde(default)]
    pub pattern: Option<String>,
    /// Label used in the mask (`[redacted:<label>]`); defaults to the kind.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub action: PatternAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternKind {
    /// E-mail addresses.
    Email,
    /// Payment card numbers (13-19 digits, spaces or dashes allowed, Luhn-checked).
    Card,
    /// US social security numbers (`123-45-6789`, `123 45 6789`).
    UsSsn,
    /// Phone numbers in international form (`+` and 8-15 digits, separators allowed).
    Phone,
    /// A custom regular expression.
    Regex,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternAction {
    /// Replace the match with `[redacted:<label>]`.
    #[default]
    Mask,
    /// Replace the match with a keyed hash, `h:<16 hex>`.
    Hash,
    /// Remove the whole key.
    DropKey,
}
