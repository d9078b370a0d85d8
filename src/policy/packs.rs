//! Jurisdiction rule packs: `policies/packs/<name>.toml`, inherited by a tenant with
//! `packs = ["us-federal", "us-states"]`.
//!
//! A pack is data, not legal advice: a list of rules, each for some regions (a country `US`, or
//! a subdivision `US-FL`), each holding any of
//!
//! - `hours = { start = "08:00", end = "20:00", days = [...] }`: on those days (default every
//!   day), a call must start within the window in the recipient's local time;
//! - `no_calls_on = ["sun"]`: no calls on those days;
//! - `no_calls_on_holidays = true`: no calls on the region's legal holidays (the generated
//!   table, plus the operator's and the tenant's `[holidays]`);
//! - `attempts = { max_calls = 3, window_secs = 86400 }`: an attempt cap on calls to one number.
//!
//! A call must satisfy every rule of every inherited pack that applies to the number's
//! jurisdiction ([`Jurisdiction::is_in`]: a number whose state is unknown takes every state's
//! rules). A refusal names the pack and rule: `us-states/FL hours`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use serde::Deserialize;

use super::hours::{parse_day, parse_hhmm};
use super::jurisdiction::{Jurisdiction, holiday_years, holidays_cover, is_listed_holiday};
use super::model::AttemptsPolicy;
use crate::config::{ConfigError, find_line, line_of};

/// A pack file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackFile {
    pub description: String,
    /// Where each rule comes from (statutes, regulations), to check before relying on it.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The pack's own caveat (packs are data, not legal advice).
    #[serde(default)]
    pub disclaimer: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
}

/// One rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// The rule's name within the pack (`FL hours`).
    pub id: String,
    /// Countries (`US`) or subdivisions (`US-FL`) it applies to.
    pub regions: Vec<String>,
    #[serde(default)]
    pub hours: Option<RuleHours>,
    #[serde(default)]
    pub no_calls_on: Vec<String>,
    #[serde(default)]
    pub no_calls_on_holidays: bool,
    #[serde(default)]
    pub attempts: Option<AttemptsPolicy>,
    /// Free text: the source or the caveat of this rule.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleHours {
    pub start: String,
    pub end: String,
    #[serde(default)]
    pub days: Option<Vec<String>>,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `<pack>/<id>`.
    pub name: String,
    pub regions: Vec<String>,
    /// Window, and the days it holds on (empty: every day).
    pub hours: Option<(Time, Time, Vec<Weekday>)>,
    pub banned_days: Vec<Weekday>,
    pub holidays: bool,
    pub attempts: Option<AttemptsPolicy>,
}

/// A compiled pack.
#[derive(Debug, Clone)]
pub struct Pack {
    pub name: String,
    pub description: String,
    pub rules: Vec<Rule>,
}

/// Holidays added by the operator (`defaults.toml`) or a tenant: dates by region.
pub type ExtraHolidays = HashMap<String, HashSet<Date>>;

/// Parse a `[holidays]` table: `"US-AL" = ["2026-12-24"]`.
pub fn extra_holidays(table: &BTreeMap<String, Vec<String>>) -> Result<ExtraHolidays, String> {
    let mut out = ExtraHolidays::new();
    for (region, dates) in table {
        check_region(region)?;
        for d in dates {
            let date: Date = d
                .parse()
                .map_err(|_| format!("holidays.{region}: {d:?} is not a YYYY-MM-DD date"))?;
            out.entry(region.clone()).or_default().insert(date);
        }
    }
    Ok(out)
}

/// Whether `region` is a country (`US`) or a subdivision (`US-FL`) code.
pub fn check_region(region: &str) -> Result<(), String> {
    let (country, sub) = match region.split_once('-') {
        Some((c, s)) => (c, Some(s)),
        None => (region, None),
    };
    let upper = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    if country.len() != 2 || !upper(country) || sub.is_some_and(|s| s.is_empty() || !upper(s)) {
        return Err(format!(
            "{region:?} is not a region (ISO 3166-1 `US` or ISO 3166-2 `US-FL`)"
        ));
    }
    Ok(())
}

/// Where a call stands with one rule.
pub struct Refusal {
    pub rule: String,
    pub reason: String,
}

impl Rule {
    fn compile(pack: &str, r: &RuleFile) -> Result<Rule, String> {
        let name = format!("{pack}/{}", r.id);
        let fail = |e: String| format!("rule {:?}: {e}", r.id);
        if r.regions.is_empty() {
            return Err(fail("regions is empty".into()));
        }
        for region in &r.regions {
            check_region(region).map_err(fail)?;
        }
        let hours = match &r.hours {
            None => None,
            Some(h) => {
                let (start, end) = (
                    parse_hhmm(&h.start).map_err(fail)?,
                    parse_hhmm(&h.end).map_err(fail)?,
                );
                if start >= end {
                    return Err(fail(format!(
                        "hours start {} must be before end {}",
                        h.start, h.end
                    )));
                }
                let days = match &h.days {
                    None => Vec::new(),
                    Some(d) => d
                        .iter()
                        .map(|d| parse_day(d))
                        .collect::<Result<_, _>>()
                        .map_err(fail)?,
                };
                Some((start, end, days))
            }
        };
        let banned_days = r
            .no_calls_on
            .iter()
            .map(|d| parse_day(d))
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        if hours.is_none()
            && r.no_calls_on.is_empty()
            && !r.no_calls_on_holidays
            && r.attempts.is_none()
        {
            return Err(fail(
                "the rule sets nothing (hours, no_calls_on, no_calls_on_holidays or attempts)"
                    .into(),
            ));
        }
        if let Some(a) = &r.attempts {
            super::AttemptRule::compile("", a).map_err(fail)?;
        }
        Ok(Rule {
            name,
            regions: r.regions.clone(),
            hours,
            banned_days,
            holidays: r.no_calls_on_holidays,
            attempts: r.attempts.clone(),
        })
    }

    /// Whether the rule applies to a number of this jurisdiction.
    pub fn applies(&self, j: &Jurisdiction) -> bool {
        self.regions.iter().any(|r| j.is_in(r))
    }

    /// Whether a call may start at `now` to a number of jurisdiction `j` that may ring in any of
    /// `zones` (every zone must allow it; with no zone known, the rule's days and hours cannot be
    /// told and the call is refused).
    pub fn check(
        &self,
        now: Timestamp,
        zones: &[TimeZone],
        j: &Jurisdiction,
        extra: &[&ExtraHolidays],
    ) -> Result<(), String> {
        if self.hours.is_none() && self.banned_days.is_empty() && !self.holidays {
            return Ok(());
        }
        if zones.is_empty() {
            return Err("the recipient's time zone is unknown".into());
        }
        for tz in zones {
            let local = now.to_zoned_datetime(tz.clone());
            let zone = tz.iana_name().unwrap_or("local");
            let day = local.weekday();
            if self.banned_days.contains(&day) {
                return Err(format!("no calls on {day:?} in {}", self.where_(j)));
            }
            if self.holidays && !holidays_cover(local.date()) {
                // Unknown holidays: refused rather than called on one (regenerate the table).
                return Err(format!(
                    "no holiday data for {} (data/holidays.tsv covers {}; regenerate it with scripts/gen_holidays.py)",
                    local.date().year(),
                    holiday_years()
                ));
            }
            if self.holidays && self.is_holiday(local.date(), j, extra) {
                return Err(format!(
                    "{} is a legal holiday in {}",
                    local.date(),
                    self.where_(j)
                ));
            }
            if let Some((start, end, days)) = &self.hours
                && (days.is_empty() || days.contains(&day))
                && (local.time() < *start || local.time() >= *end)
            {
                return Err(format!(
                    "it is {} in {zone}, outside {}-{} in {}",
                    local.strftime("%H:%M"),
                    start.strftime("%H:%M"),
                    end.strftime("%H:%M"),
                    self.where_(j)
                ));
            }
        }
        Ok(())
    }

    /// The jurisdiction as a refusal names it.
    fn where_(&self, j: &Jurisdiction) -> String {
        j.subdivision
            .map_or_else(|| j.country.clone(), str::to_string)
    }

    fn is_holiday(&self, date: Date, j: &Jurisdiction, extra: &[&ExtraHolidays]) -> bool {
        // The holidays of each of the rule's regions the number may be in.
        self.regions.iter().filter(|r| j.is_in(r)).any(|region| {
            is_listed_holiday(region, date)
                || extra
                    .iter()
                    .any(|e| e.get(region.as_str()).is_some_and(|d| d.contains(&date)))
        })
    }

    /// The local times at which the rule may start allowing calls (for the next allowed time).
    pub fn openings(&self) -> Vec<Time> {
        let mut out = vec![Time::midnight()];
        if let Some((start, ..)) = &self.hours {
            out.push(*start);
        }
        out
    }
}

/// Load every pack under `dir` (none if it does not exist).
pub fn load_packs(dir: &Path) -> Result<HashMap<String, Arc<Pack>>, Vec<ConfigError>> {
    let mut packs = HashMap::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(packs);
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for path in files {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ConfigError::new(&path, None, format!("cannot read: {e}")));
                continue;
            }
        };
        let file: PackFile = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                let line = e.span().map(|s| line_of(&text, s.start));
                errors.push(ConfigError::new(
                    &path,
                    line,
                    e.message().trim().to_string(),
                ));
                continue;
            }
        };
        let mut rules = Vec::new();
        let mut seen = HashSet::new();
        for r in &file.rules {
            if !seen.insert(r.id.clone()) {
                errors.push(ConfigError::new(
                    &path,
                    find_line(&text, &r.id),
                    format!("rule id {:?} is used twice", r.id),
                ));
            }
            match Rule::compile(&name, r) {
                Ok(rule) => rules.push(rule),
                Err(reason) => {
                    errors.push(ConfigError::new(&path, find_line(&text, &r.id), reason))
                }
            }
        }
        packs.insert(
            name.clone(),
            Arc::new(Pack {
                name,
                description: file.description,
                rules,
            }),
        );
    }
    if errors.is_empty() {
        Ok(packs)
    } else {
        Err(errors)
    }
}
