//! The tenant policy model: loading and validating `policies/`.
//!
//! ```text
//! policies/
//!   schemas/create_call.json   JSON Schema 2020-12 of the POST /v1/calls body
//!   tenants/<id>.toml          one file per tenant (see `TenantFile`)
//!   lists/*.txt                shared lists, e.g. do-not-call numbers, one E.164 number a line
//! ```
//!
//! Files are parsed into serde structs (`deny_unknown_fields`, so a typo is an error, not a silently
//! ignored rule), then compiled into a [`Tenant`]: numbers parsed, patterns compiled, lists loaded.
//! Every problem is reported with its file, line and reason.

mod hours;
pub mod jurisdiction;
mod model;
pub mod numbers;
pub mod packs;
pub mod redaction;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use hours::CallingHours;
pub use model::*;
pub use numbers::NumberSet;
pub use redaction::Redaction;

use crate::config::{ConfigError, find_line, line_of};
use crate::phone::{self, NumberType};

/// A tenant's compiled policy. Its `Debug` shows no key hash and no secret.
pub struct Tenant {
    pub id: String,
    key_hashes: Vec<[u8; 32]>,
    /// Caller ids the tenant may use, in E.164.
    pub from_allow: Vec<String>,
    /// Caller id used when the request names none.
    pub from_default: Option<String>,
    /// Agents the tenant may use.
    pub agents: HashSet<String>,
    /// Upper bound on `max_duration`, seconds.
    pub max_duration: u32,
    /// `max_duration` injected when the request has none.
    pub default_max_duration: u32,
    pub record: RecordRule,
    pub destinations: Destinations,
    pub hours: Option<CallingHours>,
    pub webhooks: WebhookPolicy,
    pub metadata: MetadataPolicy,
    pub redaction: Redaction,
    pub limits: LimitsPolicy,
    pub budget: BudgetPolicy,
    /// Caps on calls to one destination: the tenant's own (or the default) and its packs'.
    pub attempts: Vec<AttemptRule>,
    /// Consent for AI-voice calls, when required.
    pub consent: Option<ConsentPolicy>,
    /// Jurisdiction packs inherited.
    pub packs: Vec<Arc<packs::Pack>>,
    /// Holidays added by the operator and by the tenant.
    pub extra_holidays: Vec<Arc<packs::ExtraHolidays>>,
    /// Signs events relayed to the tenant's webhook.
    pub webhook_secret: Option<crate::config::Secret>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .field("keys", &self.key_hashes.len())
            .field("from_allow", &self.from_allow)
            .field("agents", &self.agents)
            .field("max_duration", &self.max_duration)
            .field("redaction", &self.redaction)
            .field("limits", &self.limits)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// A compiled attempt cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRule {
    /// Where it was written, for refusals (`attempts`, `defaults/attempts`, `us-states/FL
    /// attempts`).
    pub name: String,
    pub max_calls: u32,
    pub window_secs: u64,
    pub scope: AttemptsScope,
    /// The regions it applies to (a pack rule's); empty: every destination.
    pub regions: Vec<String>,
}

impl AttemptRule {
    fn compile(name: &str, p: &AttemptsPolicy) -> Result<AttemptRule, String> {
        let max_window = (crate::state::MAX_ATTEMPT_WINDOW_US / 1_000_000) as u64;
        if p.max_calls == 0 {
            return Err("attempts.max_calls must be at least 1".into());
        }
        if !(1..=max_window).contains(&p.window_secs) {
            return Err(format!(
                "attempts.window_secs must be 1 to {max_window} (30 days)"
            ));
        }
        Ok(AttemptRule {
            name: name.to_string(),
            max_calls: p.max_calls,
            window_secs: p.window_secs,
            scope: p.scope,
            regions: Vec::new(),
        })
    }
}

/// Compiled destination rules.
#[derive(Debug, Default)]
pub struct Destinations {
    pub countries_allow: Option<HashSet<String>>,
    pub countries_deny: HashSet<String>,
    pub number_types_allow: Option<HashSet<NumberType>>,
    pub number_types_deny: HashSet<NumberType>,
    pub prefixes_deny: Vec<String>,
    pub do_not_call: Vec<Arc<NumberSet>>,
}

impl Tenant {
    /// The attempt caps on calls to `to`, one per scope, with the name of the rule behind each
    /// of its limits. With `record_account` (some tenant counts every tenant's calls), a call
    /// is also recorded in the account scope when this tenant has no cap there.
    pub fn attempt_caps(
        &self,
        to: &crate::phone::Number,
        record_account: bool,
    ) -> Vec<(crate::state::AttemptCap, Vec<String>)> {
        use crate::state::{AttemptCap, AttemptLimit, AttemptScope};
        if self.attempts.is_empty() && !record_account {
            return Vec::new();
        }
        let jurisdiction = jurisdiction::Jurisdiction::of(to);
        let mut caps: Vec<(AttemptCap, Vec<String>)> = Vec::new();
        for rule in &self.attempts {
            if !rule.regions.is_empty() && !rule.regions.iter().any(|r| jurisdiction.is_in(r)) {
                continue;
            }
            let scope = match rule.scope {
                AttemptsScope::Tenant => AttemptScope::Tenant(self.id.clone()),
                AttemptsScope::Account => AttemptScope::Account,
            };
            let limit = AttemptLimit {
                max: rule.max_calls,
                window: rule.window_secs as i64 * 1_000_000,
            };
            match caps.iter_mut().find(|(cap, _)| cap.scope == scope) {
                Some((cap, names)) => {
                    cap.limits.push(limit);
                    names.push(rule.name.clone());
                }
                None => caps.push((
                    AttemptCap {
                        scope,
                        phone_number: to.e164.clone(),
                        limits: vec![limit],
                    },
                    vec![rule.name.clone()],
                )),
            }
        }
        if record_account && !caps.iter().any(|(c, _)| c.scope == AttemptScope::Account) {
            caps.push((
                AttemptCap {
                    scope: AttemptScope::Account,
                    phone_number: to.e164.clone(),
                    limits: Vec::new(),
                },
                Vec::new(),
            ));
        }
        caps
    }

    /// Whether `hash` is one of this tenant's key hashes, compared in constant time.
    pub fn has_key_hash(&self, hash: &[u8; 32]) -> bool {
        self.key_hashes
            .iter()
            .fold(0u8, |hit, h| hit | h.ct_eq(hash).unwrap_u8())
            == 1
    }
}

/// SHA-256 of a tenant key, as stored in policies.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// All tenants and the request schema.
pub struct Policies {
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    /// Some tenant caps calls across every tenant (`scope = "account"`): every tenant's calls
    /// are then recorded in that scope.
    pub account_attempts: bool,
    by_key: foldhash::HashMap<[u8; 32], Arc<Tenant>>,
    pub schema: jsonschema::Validator,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("tenants", &self.tenants.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Policies {
    /// The tenant owning `key`, if any. The lookup is by hash; the final comparison is in
    /// constant time.
    pub fn tenant_for_key(&self, key: &str) -> Option<Arc<Tenant>> {
        let hash = key_hash(key);
        let tenant = self.by_key.get(&hash)?;
        tenant.has_key_hash(&hash).then(|| tenant.clone())
    }

    /// Load and compile everything under `dir`. Returns every problem found, not just the first.
    pub fn load(dir: &Path, hash_key: &[u8]) -> Result<Policies, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let schema = load_schema(&dir.join("schemas/create_call.json")).map_err(|e| errors.push(e));
        let mut lists = ListCache::default();
        let defaults = load_defaults(&dir.join("defaults.toml")).unwrap_or_else(|e| {
            errors.push(e);
            DefaultsFile::default()
        });
        let default_holidays = match packs::extra_holidays(&defaults.holidays) {
            Ok(h) => Arc::new(h),
            Err(reason) => {
                errors.push(ConfigError::new(dir.join("defaults.toml"), None, reason));
                Arc::default()
            }
        };
        let shared = Shared {
            defaults: &defaults,
            holidays: default_holidays,
            packs: packs::load_packs(&dir.join("packs")).unwrap_or_else(|mut e| {
                errors.append(&mut e);
                HashMap::new()
            }),
        };
        let mut tenants = BTreeMap::new();
        let mut by_key: foldhash::HashMap<[u8; 32], Arc<Tenant>> = Default::default();
        let tenant_dir = dir.join("tenants");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&tenant_dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) => {
                errors.push(ConfigError::new(
                    &tenant_dir,
                    None,
                    format!("cannot read: {e}"),
                ));
                Vec::new()
            }
        };
        files.sort();
        if files.is_empty() && errors.is_empty() {
            errors.push(ConfigError::new(
                &tenant_dir,
                None,
                "no tenant policy (*.toml) found",
            ));
        }
        for file in files {
            match load_tenant(&file, dir, &mut lists, &shared, hash_key) {
                Ok(tenant) => {
                    let tenant = Arc::new(tenant);
                    if tenants.contains_key(&tenant.id) {
                        errors.push(ConfigError::new(
                            &file,
                            None,
                            format!("tenant id {:?} is used by another file", tenant.id),
                        ));
                        continue;
                    }
                    for hash in &tenant.key_hashes {
                        if let Some(other) = by_key.insert(*hash, tenant.clone()) {
                            errors.push(ConfigError::new(
                                &file,
                                None,
                                format!("a key hash is shared with tenant {:?}", other.id),
                            ));
                        }
                    }
                    tenants.insert(tenant.id.clone(), tenant);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        match schema {
            Ok(schema) if errors.is_empty() => Ok(Policies {
                account_attempts: tenants
                    .values()
                    .any(|t| t.attempts.iter().any(|a| a.scope == AttemptsScope::Account)),
                tenants,
                by_key,
                schema,
            }),
            _ => Err(errors),
        }
    }
}

/// What every tenant may inherit: the defaults, the operator's holidays, the packs.
struct Shared<'a> {
    defaults: &'a DefaultsFile,
    holidays: Arc<packs::ExtraHolidays>,
    packs: HashMap<String, Arc<packs::Pack>>,
}

/// The shared defaults, if the file exists.
fn load_defaults(path: &Path) -> Result<DefaultsFile, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DefaultsFile::default()),
        Err(e) => return Err(ConfigError::new(path, None, format!("cannot read: {e}"))),
    };
    let file: DefaultsFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start));
        ConfigError::new(path, line, e.message().trim().to_string())
    })?;
    if let Some(a) = &file.attempts {
        AttemptRule::compile("defaults/attempts", a)
            .map_err(|reason| ConfigError::new(path, find_line(&text, "[attempts]"), reason))?;
    }
    Ok(file)
}

fn load_schema(path: &Path) -> Result<jsonschema::Validator, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ConfigError::new(path, Some(e.line()), e.to_string()))?;
    jsonschema::draft202012::meta::validate(&value).map_err(|e| {
        ConfigError::new(path, None, format!("not a valid JSON Schema 2020-12: {e}"))
    })?;
    jsonschema::draft202012::new(&value)
        .map_err(|e| ConfigError::new(path, None, format!("cannot compile schema: {e}")))
}

/// Shared lists, loaded once however many tenants name them.
#[derive(Default)]
struct ListCache {
    loaded: HashMap<PathBuf, Arc<NumberSet>>,
}

impl ListCache {
    fn number_list(&mut self, path: &Path) -> Result<Arc<NumberSet>, ConfigError> {
        if let Some(list) = self.loaded.get(path) {
            return Ok(list.clone());
        }
        let set = NumberSet::load(path)
            .map(Arc::new)
            .map_err(|e| ConfigError::new(path, e.line, e.reason))?;
        self.loaded.insert(path.to_path_buf(), set.clone());
        Ok(set)
    }
}

fn load_tenant(
    path: &Path,
    policy_dir: &Path,
    lists: &mut ListCache,
    shared: &Shared<'_>,
    hash_key: &[u8],
) -> Result<Tenant, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![ConfigError::new(path, None, format!("cannot read: {e}"))])?;
    let file: TenantFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start));
        vec![ConfigError::new(path, line, e.message().trim().to_string())]
    })?;
    let mut errors = Vec::new();
    let mut err = |needle: &str, reason: String| {
        errors.push(ConfigError::new(path, find_line(&text, needle), reason));
    };

    if file.id.is_empty()
        || !file
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        err(
            "id",
            format!(
                "tenant id {:?} must be letters, digits, '-' or '_'",
                file.id
            ),
        );
    }
    let mut key_hashes = Vec::new();
    for h in &file.key_sha256 {
        match hex::decode(h)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            Some(hash) => key_hashes.push(hash),
            None => err(h, format!("key_sha256 {h:?} is not 64 hex digits")),
        }
    }
    if key_hashes.is_empty() && file.key_sha256.is_empty() {
        err(
            "key_sha256",
            "no key_sha256: the tenant could never authenticate".into(),
        );
    }
    for n in &file.numbers.from_allow {
        if let Err(e) = phone::parse_e164(n) {
            err(n, format!("numbers.from_allow: {n:?} {e}"));
        }
    }
    if let Some(d) = &file.numbers.from_default
        && !file.numbers.from_allow.contains(d)
    {
        err(
            "from_default",
            format!("numbers.from_default {d:?} is not in numbers.from_allow"),
        );
    }
    if file.agents.allow.is_empty() {
        err(
            "[agents]",
            "agents.allow is empty: the tenant could place no call".into(),
        );
    }
    let calls = &file.calls;
    if !(1..=3600).contains(&calls.max_duration) {
        err(
            "max_duration",
            "calls.max_duration must be 1..3600 seconds".into(),
        );
    }
    let default_max_duration = calls.default_max_duration.unwrap_or(calls.max_duration);
    if default_max_duration == 0 || default_max_duration > calls.max_duration {
        err(
            "default_max_duration",
            "calls.default_max_duration must be 1..calls.max_duration".into(),
        );
    }

    let d = &file.destinations;
    let region_list = |codes: &[String], key: &str, errs: &mut Vec<(String, String)>| {
        codes
            .iter()
            .map(|c| {
                let up = c.to_ascii_uppercase();
                if up.len() != 2 || !up.bytes().all(|b| b.is_ascii_uppercase()) {
                    errs.push((
                        c.clone(),
                        format!("destinations.{key}: {c:?} is not an ISO 3166-1 alpha-2 code"),
                    ));
                }
                up
            })
            .collect::<HashSet<_>>()
    };
    let mut region_errs = Vec::new();
    let countries_allow = d
        .countries_allow
        .as_ref()
        .map(|c| region_list(c, "countries_allow", &mut region_errs));
    let countries_deny = region_list(&d.countries_deny, "countries_deny", &mut region_errs);
    for (needle, reason) in region_errs {
        err(&needle, reason);
    }
    for p in &d.prefixes_deny {
        let digits = p.strip_prefix('+').unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            err(
                p,
                format!("destinations.prefixes_deny: {p:?} must be '+' and digits"),
            );
        }
    }
    let mut do_not_call = Vec::new();
    for list in &d.do_not_call {
        let full = policy_dir.join(list);
        match lists.number_list(&full) {
            Ok(set) => do_not_call.push(set),
            Err(e) => errors_push(&mut err, list, e),
        }
    }

    let hours = match &file.hours {
        Some(h) => match CallingHours::compile(h) {
            Ok(h) => Some(h),
            Err(reason) => {
                err("[hours]", format!("hours: {reason}"));
                None
            }
        },
        None => None,
    };
    for host in &file.webhooks.allowed_hosts {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains(['/', ':', '*']) {
            err(
                host,
                format!(
                    "webhooks.allowed_hosts: {host:?} must be a host name, optionally '*.'-prefixed"
                ),
            );
        }
    }
    if let Some(l) = &file.limits.max_concurrent_calls
        && *l == 0
    {
        err(
            "max_concurrent_calls",
            "limits.max_concurrent_calls must be at least 1".into(),
        );
    }
    if file.limits.requests_per_minute == Some(0) || file.limits.burst == Some(0) {
        err(
            "[limits]",
            "limits.requests_per_minute and limits.burst must be at least 1".into(),
        );
    }
    let b = &file.budget;
    if b.credits.is_some_and(|c| c < 0) || b.price_per_increment < 0 || b.increment_secs == 0 {
        err(
            "[budget]",
            "budget: credits and prices must not be negative, increment_secs at least 1".into(),
        );
    }
    if b.price_by_country
        .iter()
        .any(|(c, p)| *p < 0 || c.len() != 2 || c.to_ascii_uppercase() != *c)
    {
        err(
            "price_by_country",
            "budget.price_by_country: ISO 3166-1 alpha-2 codes (upper case) to non-negative prices"
                .into(),
        );
    }
    if jiff::tz::TimeZone::get(&b.timezone).is_err() {
        err(
            "timezone",
            format!("budget.timezone {:?} is not an IANA time zone", b.timezone),
        );
    }
    let webhook_secret = match resolve_webhook_secret(&file.webhooks, policy_dir) {
        Ok(s) => s,
        Err(reason) => {
            err("[webhooks]", reason);
            None
        }
    };
    if webhook_secret.is_none() && !file.webhooks.allowed_hosts.is_empty() {
        err(
            "[webhooks]",
            "webhooks: a secret (secret_env, secret_file or secret) is required to sign relayed events".into(),
        );
    }
    let redaction = match Redaction::compile(&file.redaction, hash_key) {
        Ok(r) => r,
        Err(reason) => {
            err("redaction", reason);
            Redaction::default()
        }
    };
    let mut attempts = match (&file.attempts, &shared.defaults.attempts) {
        (Some(own), _) => match AttemptRule::compile("attempts", own) {
            Ok(rule) => vec![rule],
            Err(reason) => {
                err("[attempts]", reason);
                Vec::new()
            }
        },
        (None, Some(default)) => AttemptRule::compile("defaults/attempts", default)
            .into_iter()
            .collect(),
        (None, None) => Vec::new(),
    };
    let mut tenant_packs = Vec::new();
    for name in &file.packs {
        match shared.packs.get(name) {
            Some(pack) => {
                for rule in &pack.rules {
                    if let Some(a) = &rule.attempts
                        && let Ok(mut cap) = AttemptRule::compile(&rule.name, a)
                    {
                        cap.regions = rule.regions.clone();
                        attempts.push(cap);
                    }
                }
                tenant_packs.push(pack.clone());
            }
            None => err(
                name,
                format!(
                    "packs: no pack {name:?} in {}",
                    policy_dir.join("packs").display()
                ),
            ),
        }
    }
    let mut extra_holidays = vec![shared.holidays.clone()];
    match packs::extra_holidays(&file.holidays) {
        Ok(own) if !own.is_empty() => extra_holidays.push(Arc::new(own)),
        Ok(_) => {}
        Err(reason) => err("[holidays]", reason),
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Tenant {
        id: file.id,
        key_hashes,
        from_allow: file.numbers.from_allow,
        from_default: file.numbers.from_default,
        agents: file.agents.allow.into_iter().collect(),
        max_duration: calls.max_duration,
        default_max_duration,
        record: calls.record,
        destinations: Destinations {
            countries_allow,
            countries_deny,
            number_types_allow: d
                .number_types_allow
                .as_ref()
                .map(|t| t.iter().copied().collect()),
            number_types_deny: d.number_types_deny.iter().copied().collect(),
            prefixes_deny: d.prefixes_deny.clone(),
            do_not_call,
        },
        hours,
        webhooks: file.webhooks,
        metadata: file.metadata,
        redaction,
        limits: file.limits,
        budget: file.budget,
        attempts,
        consent: file.consent.filter(|c| c.required),
        packs: tenant_packs,
        extra_holidays,
        webhook_secret,
    })
}

fn resolve_webhook_secret(
    w: &WebhookPolicy,
    policy_dir: &Path,
) -> Result<Option<crate::config::Secret>, String> {
    let given = [
        w.secret.is_some(),
        w.secret_env.is_some(),
        w.secret_file.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err("webhooks: set one of secret, secret_env and secret_file".into());
    }
    if let Some(var) = &w.secret_env {
        return match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(crate::config::Secret::new(v))),
            _ => Err(format!(
                "webhooks.secret_env: environment variable {var} is not set"
            )),
        };
    }
    if let Some(file) = &w.secret_file {
        return crate::config::read_secret_file(&policy_dir.join(file))
            .map(Some)
            .map_err(|e| e.to_string());
    }
    Ok(w.secret.clone())
}

fn errors_push(err: &mut impl FnMut(&str, String), needle: &Path, e: ConfigError) {
    // A list's own line numbers matter more than the tenant file's reference to it.
    match e.line {
        Some(_) => err(&needle.display().to_string(), e.to_string()),
        None => err(&needle.display().to_string(), format!("do_not_call: {}", e)),
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// The live policy set, swapped whole on reload; each request takes one snapshot.
#[derive(Clone, Debug)]
pub struct PolicyHandle(Arc<std::sync::RwLock<Arc<Policies>>>);

impl PolicyHandle {
    pub fn new(policies: Policies) -> Self {
        PolicyHandle(Arc::new(std::sync::RwLock::new(Arc::new(policies))))
    }

    /// The policies in force now.
    pub fn current(&self) -> Arc<Policies> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Put a new policy set in force; requests already under way keep theirs.
    pub fn replace(&self, policies: Policies) {
        let mut guard = match self.0.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(policies);
    }
}
