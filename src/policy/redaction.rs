//! Metadata redaction, compiled from a tenant's `[redaction]` policy: personal data in
//! `metadata` is dropped, masked or replaced by a keyed hash, by key and by pattern. Compiled
//! once per policy load (patterns shared by every tenant that uses them); applied by the
//! redaction stage (`stages::redact`).
//!
//! ```
//! use callgate::policy::{PatternAction, PatternKind, PatternRule, RedactionPolicy};
//! use callgate::policy::Redaction;
//! let policy = RedactionPolicy {
//!     drop_keys: vec!["ssn".into()],
//!     patterns: vec![PatternRule { kind: PatternKind::Email, pattern: None, label: None,
//!                                  action: PatternAction::Mask }],
//!     ..Default::default()
//! };
//! let redaction = Redaction::compile(&policy, b"key").unwrap();
//! let mut meta = serde_json::json!({"ssn": "123-45-6789", "note": "mail ann@example.com"});
//! redaction.apply(meta.as_object_mut().unwrap());
//! assert_eq!(meta, serde_json::json!({"note": "mail [redacted:email]"}));
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use regex::{Captures, Regex};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::{PatternAction, PatternKind, RedactionPolicy};

#[derive(Debug, Clone)]
struct CompiledPattern {
    /// Shared by every tenant using the same pattern (see [`shared_regex`]).
    regex: Arc<Regex>,
    kind: PatternKind,
    label: String,
    action: PatternAction,
}

/// A tenant's compiled redaction rules. Its `Debug` never shows the hash key.
#[derive(Clone, Default)]
pub struct Redaction {
    drop_keys: Vec<String>,
    hash_keys: Vec<String>,
    mask_keys: Vec<String>,
    patterns: Vec<CompiledPattern>,
    hash_key: Vec<u8>,
}

impl std::fmt::Debug for Redaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let patterns: Vec<&str> = self.patterns.iter().map(|p| p.label.as_str()).collect();
        f.debug_struct("Redaction")
            .field("drop_keys", &self.drop_keys)
            .field("hash_keys", &self.hash_keys)
            .field("mask_keys", &self.mask_keys)
            .field("patterns", &patterns)
            .field("hash_key", &"[redacted]")
            .finish()
    }
}

fn builtin(kind: PatternKind) -> &'static str {
    match kind {
        PatternKind::Email => r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b",
        // 13-19 digits, optionally grouped by single spaces or dashes; Luhn-checked on match.
        PatternKind::Card => r"\b\d(?:[ -]?\d){12,18}\b",
        PatternKind::UsSsn => r"\b\d{3}[- ]\d{2}[- ]\d{4}\b",
        PatternKind::Phone => r"\+\d(?:[ ().-]{0,2}\d){7,14}\b",
        PatternKind::Regex => "",
    }
}

/// Compiled patterns by source, shared by every tenant (and every reload) that uses them: a
/// compiled pattern costs up to 600 KB (the built-in card and SSN patterns, with Unicode `\b` and
/// `\d`), so ten thousand tenants compiling their own would take gigabytes. A pattern dropped
/// from every policy stays here: the distinct patterns ever configured are few.
fn shared_regex(source: &str) -> Result<Arc<Regex>, regex::Error> {
    static COMPILED: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut compiled = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(regex) = compiled.get(source) {
        return Ok(regex.clone());
    }
    let regex = Arc::new(Regex::new(source)?);
    compiled.insert(source.to_string(), regex.clone());
    Ok(regex)
}

fn luhn_ok(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn lower(keys: &[String]) -> Vec<String> {
    keys.iter().map(|k| k.to_ascii_lowercase()).collect()
}

impl Redaction {
    /// Compile a policy's rules; `hash_key` keys the `hash` action.
    pub fn compile(policy: &RedactionPolicy, hash_key: &[u8]) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for rule in &policy.patterns {
            let source = match (rule.kind, &rule.pattern) {
                (PatternKind::Regex, Some(p)) => p.as_str(),
                (PatternKind::Regex, None) => {
                    return Err("redaction pattern of kind \"regex\" needs `pattern`".into());
                }
                (_, Some(_)) => {
                    return Err("`pattern` is only for redaction patterns of kind \"regex\"".into());
                }
                (kind, None) => builtin(kind),
            };
            let regex = shared_regex(source)
                .map_err(|e| format!("redaction pattern {source:?} does not compile: {e}"))?;
            let label = rule.label.clone().unwrap_or_else(|| {
                serde_json::to_value(rule.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            });
            patterns.push(CompiledPattern {
                regex,
                kind: rule.kind,
                label,
                action: rule.action,
            });
        }
        Ok(Redaction {
            drop_keys: lower(&policy.drop_keys),
            hash_keys: lower(&policy.hash_keys),
            mask_keys: lower(&policy.mask_keys),
            patterns,
            hash_key: hash_key.to_vec(),
        })
    }

    fn hash(&self, value: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.hash_key).unwrap_or_else(|_| {
                <Hmac<Sha256> as KeyInit>::new_from_slice(b"callgate").expect("static key")
            });
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("h:{}", crate::hexstr::lower(&digest[..8]))
    }

    /// Rewrite one string value; `None` means the whole key must go.
    fn redact_str<'a>(&self, value: &'a str) -> Option<Cow<'a, str>> {
        let mut out = Cow::Borrowed(value);
        for p in &self.patterns {
            // Most values match no pattern: a plain search says so without the capture groups
            // (allocated per call) that `replace_all` makes before it knows.
            if !p.regex.is_match(&out) {
                continue;
            }
            let mut found = false;
            let replaced = p.regex.replace_all(&out, |caps: &Captures| {
                let m = &caps[0];
                if p.kind == PatternKind::Card && !luhn_ok(m) {
                    return m.to_string();
                }
                found = true;
                match p.action {
                    PatternAction::Hash => self.hash(m),
                    PatternAction::Mask | PatternAction::DropKey => {
                        format!("[redacted:{}]", p.label)
                    }
                }
            });
            if found && p.action == PatternAction::DropKey {
                return None;
            }
            if let Cow::Owned(s) = replaced {
                out = Cow::Owned(s);
            }
        }
        Some(out)
    }

    fn redact_value(&self, value: &mut Value) -> bool {
        match value {
            Value::String(s) => match self.redact_str(s) {
                None => return false,
                Some(Cow::Owned(new)) => *s = new,
                Some(Cow::Borrowed(_)) => {}
            },
            Value::Array(items) => items.retain_mut(|v| self.redact_value(v)),
            Value::Object(map) => self.apply(map),
            _ => {}
        }
        true
    }

    /// Redact `metadata` in place.
    pub fn apply(&self, metadata: &mut Map<String, Value>) {
        metadata.retain(|key, value| {
            let key = key.to_ascii_lowercase();
            if self.drop_keys.contains(&key) {
                return false;
            }
            if self.mask_keys.contains(&key) {
                *value = Value::String("[redacted]".into());
                return true;
            }
            if self.hash_keys.contains(&key) {
                let plain = match &*value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                *value = Value::String(self.hash(&plain));
                return true;
            }
            self.redact_value(value)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PatternRule;
    use serde_json::json;

    fn rule(kind: PatternKind, action: PatternAction) -> PatternRule {
        PatternRule {
            kind,
            pattern: None,
            label: None,
            action,
        }
    }

    fn acme_like() -> Redaction {
        Redaction::compile(
            &RedactionPolicy {
                drop_keys: vec!["SSN".into()],
                patterns: vec![
                    rule(PatternKind::Email, PatternAction::Mask),
                    rule(PatternKind::Card, PatternAction::Mask),
                    rule(PatternKind::UsSsn, PatternAction::Mask),
                ],
                ..Default::default()
            },
            b"k",
        )
        .unwrap()
    }

    fn run(r: &Redaction, v: Value) -> Value {
        let mut v = v;
        r.apply(v.as_object_mut().unwrap());
        v
    }

    #[test]
    fn masks_emails_cards_and_ssns_and_drops_keys() {
        let out = run(
            &acme_like(),
            json!({
                "ssn": "078-05-1120",
                "contact": "Ann <ann.lee+x@mail.example.com>",
                "card": "pay with 4111 1111 1111 1111 today",
                "card2": "4111-1111-1111-1111",
                "not_card": "order 1234567890123",
                "tax": "ssn 078-05-1120 on file",
                "count": 3,
                "customer_id": "cust_456"
            }),
        );
        assert_eq!(
            out,
            json!({
                "contact": "Ann <[redacted:email]>",
                "card": "pay with [redacted:card] today",
                "card2": "[redacted:card]",
                "not_card": "order 1234567890123",
                "tax": "ssn [redacted:us_ssn] on file",
                "count": 3,
                "customer_id": "cust_456"
            })
        );
    }

    #[test]
    fn hashes_are_keyed_and_stable() {
        let policy = RedactionPolicy {
            hash_keys: vec!["email".into()],
            patterns: vec![rule(PatternKind::Phone, PatternAction::Hash)],
            ..Default::default()
        };
        let a = Redaction::compile(&policy, b"key-a").unwrap();
        let b = Redaction::compile(&policy, b"key-b").unwrap();
        let input = json!({"email": "ann@example.com", "note": "call +1 415 555 0123"});
        let out_a = run(&a, input.clone());
        assert_eq!(out_a, run(&a, input.clone()));
        assert_ne!(out_a, run(&b, input));
        assert!(out_a["email"].as_str().unwrap().starts_with("h:"));
        assert!(!out_a["note"].as_str().unwrap().contains("555"), "{out_a}");
    }

    #[test]
    fn tenants_share_their_compiled_patterns() {
        let policy = RedactionPolicy {
            patterns: vec![rule(PatternKind::Card, PatternAction::Mask)],
            ..Default::default()
        };
        let a = Redaction::compile(&policy, b"key-a").unwrap();
        let b = Redaction::compile(&policy, b"key-b").unwrap();
        assert!(Arc::ptr_eq(&a.patterns[0].regex, &b.patterns[0].regex));
    }

    #[test]
    fn drop_key_action_and_custom_regex() {
        let policy = RedactionPolicy {
            patterns: vec![
                PatternRule {
                    kind: PatternKind::Regex,
                    pattern: Some(r"\bDOB:\s*\d{4}-\d{2}-\d{2}".into()),
                    label: Some("dob".into()),
                    action: PatternAction::Mask,
                },
                rule(PatternKind::UsSsn, PatternAction::DropKey),
            ],
            ..Default::default()
        };
        let r = Redaction::compile(&policy, b"k").unwrap();
        let out = run(
            &r,
            json!({"a": "DOB: 1990-01-02", "b": "ssn 078-05-1120", "c": ["x", "078-05-1120"]}),
        );
        assert_eq!(out, json!({"a": "[redacted:dob]", "c": ["x"]}));
        let bad = RedactionPolicy {
            patterns: vec![PatternRule {
                kind: PatternKind::Regex,
                pattern: Some("(".into()),
                label: None,
                action: PatternAction::Mask,
            }],
            ..Default::default()
        };
        assert!(Redaction::compile(&bad, b"k").is_err());
    }
}
