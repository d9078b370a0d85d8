//! The accounting rules, backend-neutral: what a call holds, what it is charged, when a budget
//! starts afresh, and the live counters that admission decides from.
//!
//! Every backend keeps a [`Ledger`] (or its equivalent, in Redis, inside its scripts) and applies
//! these rules; the conformance suite (`tests/conformance/`) holds each backend to them:
//!
//! - a call is admitted only if the tenant's slots, the account's slots and the tenant's budget
//!   (credits - spent this period - holds of live calls) all have room for it; a refusal takes
//!   nothing;
//! - a call is settled once: the first ending (final event, reconciliation, lease expiry) counts,
//!   and nothing revives a settled call (a late bind keeps its status and its lease);
//! - the charge is the started increments of the actual duration times the price, never more
//!   than the hold; a lapsed lease is charged the whole hold;
//! - a budget starts afresh at the start of each period (day or month) in its own time zone.
//!
//! ```
//! use callgate::state::accounting::{Ending, Pricing, settlement_charge};
//! let pricing = Pricing { price: 2, increment_secs: 60 };
//! // 61 s are two started minutes at 2 credits each, within the hold of 20.
//! assert_eq!(settlement_charge(Ending::Final { duration: Some(61) }, pricing, 20), 4);
//! assert_eq!(settlement_charge(Ending::Expired, pricing, 20), 20);
//! ```

use super::{AdmitOutcome, AdmitRequest, BudgetTerms, Period, Usage};

/// How a call is charged, as fixed at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    /// Credits per started increment.
    pub price: i64,
    pub increment_secs: i64,
}

/// How a call's accounting ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The upstream said the call is over (final event or reconciliation).
    Final { duration: Option<i64> },
    /// The lease ran out with no word from the upstream: the call may have run to its limit.
    Expired,
    /// An operator ended it (a stuck call released by the admin API) at a stated charge.
    Stated { charge: i64 },
}

/// Credits charged for `duration` seconds: started increments times the price, capped by the hold.
pub fn charge_for(duration: i64, increment_secs: i64, price: i64, hold: i64) -> i64 {
    let increment = increment_secs.max(1);
    let increments = (duration.max(0) + increment - 1) / increment;
    (increments * price).min(hold)
}

/// What a call that ends this way is charged.
pub fn settlement_charge(ending: Ending, pricing: Pricing, hold: i64) -> i64 {
    match ending {
        Ending::Expired => hold,
        Ending::Stated { charge } => charge.max(0),
        Ending::Final { duration } => charge_for(
            duration.unwrap_or(0),
            pricing.increment_secs,
            pricing.price,
            hold,
        ),
    }
}

/// The status of a call the upstream accepted without naming one.
pub const QUEUED: &str = "queued";

/// The status the upstream's answer gives a call it accepted (`queued` when it names none).
pub fn answered_status(object: &serde_json::Value) -> &str {
    object
        .get("status")
        .and_then(serde_json::Value::as_str)
        .unwrap_or(QUEUED)
}

/// A call's status once the upstream's answer is bound to it: an event that arrived first (even
/// one that settled the call) wins over the answer's `queued`.
pub fn status_after_bind<'a>(current: &'a str, answered: &'a str) -> &'a str {
    if current == PENDING {
        answered
    } else {
        current
    }
}

/// A call's lease once bound: only a live call's lease moves; a settled call is never revived.
pub fn lease_after_bind(live: bool, current: i64, bound: i64) -> i64 {
    if live { bound } else { current }
}

/// The status of a reservation the upstream has not answered yet.
pub const PENDING: &str = "pending";
/// The status of a call whose lease ran out.
pub const EXPIRED: &str = "expired";

/// A tenant's spend in its current budget period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    pub period: Period,
    pub timezone: String,
    /// Start of the period `spent` belongs to (unix microseconds; 0 for `none`).
    pub period_start: i64,
    pub spent: i64,
    /// End of that period, when known: until then the period needs no recomputing.
    period_end: Option<i64>,
}

impl Default for Spend {
    fn default() -> Self {
        Spend::new(Period::None, "UTC".into(), 0, 0)
    }
}

impl Spend {
    pub fn new(period: Period, timezone: String, period_start: i64, spent: i64) -> Self {
        Spend {
            period,
            timezone,
            period_start,
            spent,
            period_end: None,
        }
    }

    /// This spend as of `now`: the same, or zero in a new period.
    pub fn at(&self, now: i64) -> Spend {
        if let Some(end) = self.period_end
            && now >= self.period_start
            && now < end
        {
            return self.clone();
        }
        let (start, end) = self.period.bounds(&self.timezone, now);
        let mut next = self.clone();
        if start > self.period_start {
            next.period_start = start;
            next.spent = 0;
        }
        // A clock that went back keeps the later period (spend is never handed back twice).
        next.period_end = (start == next.period_start).then_some(end);
        next
    }

    /// This spend under (possibly new) terms: a changed period or zone takes effect now.
    fn under(&self, terms: &BudgetTerms) -> Spend {
        if self.period == terms.period && self.timezone == terms.timezone {
            return self.clone();
        }
        let mut next = self.clone();
        next.period = terms.period;
        next.timezone = terms.timezone.clone();
        next.period_end = None;
        next
    }

    /// Whether `other` must be recorded to keep the stored spend in step with this one.
    pub fn differs_from(&self, other: &Spend) -> bool {
        self.period != other.period
            || self.timezone != other.timezone
            || self.period_start != other.period_start
            || self.spent != other.spent
    }
}

/// A tenant's live counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantBook {
    /// Concurrency slots held (live calls).
    pub slots: i64,
    /// Credits held by live calls.
    pub holds: i64,
    pub spend: Spend,
}

/// Admission's verdict and, when admitted, the tenant's spend to record (when it changed).
#[derive(Debug, Clone)]
pub struct AdmitPlan {
    pub outcome: AdmitOutcome,
    pub spend: Spend,
    /// The spend differs from what was stored: record it with the admission.
    pub spend_changed: bool,
}

/// The live counters: slots and holds per tenant and account-wide, spend per budget period.
/// Admission decides from them in O(1); the backend's records are the durable truth they are
/// rebuilt from at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    tenants: foldhash::HashMap<Box<str>, TenantBook>,
    account_slots: i64,
}

impl Ledger {
    /// Counters from the records: each tenant's live calls (slots, holds) and stored spend.
    pub fn rebuild(
        live: impl IntoIterator<Item = (String, i64, i64)>,
        spends: impl IntoIterator<Item = (String, Spend)>,
    ) -> Ledger {
        let mut ledger = Ledger::default();
        for (tenant, slots, holds) in live {
            let book = ledger.book_mut(&tenant);
            book.slots += slots;
            book.holds += holds;
            ledger.account_slots += slots;
        }
        for (tenant, spend) in spends {
            ledger.book_mut(&tenant).spend = spend;
        }
        ledger
    }

    fn book_mut(&mut self, tenant: &str) -> &mut TenantBook {
        if !self.tenants.contains_key(tenant) {
            self.tenants.insert(tenant.into(), TenantBook::default());
        }
        self.tenants.get_mut(tenant).expect("inserted above")
    }

    /// A tenant's counters (zero for a tenant never seen).
    pub fn book(&self, tenant: &str) -> TenantBook {
        self.tenants.get(tenant).cloned().unwrap_or_default()
    }

    /// Live calls across all tenants.
    pub fn account_slots(&self) -> i64 {
        self.account_slots
    }

    /// Decide an admission from the counters, changing nothing.
    pub fn plan_admit(&self, req: &AdmitRequest) -> AdmitPlan {
        let (slots, holds, stored) = match self.tenants.get(req.tenant.as_str()) {
            Some(b) => (b.slots, b.holds, b.spend.clone()),
            None => (0, 0, Spend::default()),
        };
        let spend = match &req.budget {
            Some(terms) => stored.under(terms).at(req.now),
            None => stored.at(req.now),
        };
        let spend_changed = req.budget.is_some() && spend.differs_from(&stored);
        let refuse = |outcome| AdmitPlan {
            outcome,
            spend: spend.clone(),
            spend_changed,
        };
        if let Some(limit) = req.tenant_max_concurrent
            && slots >= i64::from(limit)
        {
            return refuse(AdmitOutcome::TenantSlotsFull { limit });
        }
        if self.account_slots >= i64::from(req.account_max_concurrent) {
            return refuse(AdmitOutcome::AccountSlotsFull {
                limit: req.account_max_concurrent,
            });
        }
        if let Some(terms) = &req.budget {
            let available = terms.credits - spend.spent - holds;
            if req.hold > available {
                return refuse(AdmitOutcome::InsufficientCredits {
                    needed: req.hold,
                    available: available.max(0),
                });
            }
        }
        AdmitPlan {
            outcome: AdmitOutcome::Admitted,
            spend,
            spend_changed,
        }
    }

    /// Take what an admitted plan decided: a slot (tenant and account) and the hold, and its
    /// spend (recorded with it). A refused plan's spend is kept only as a new period under the
    /// same terms (so it is computed once): new terms take effect with the first admission,
    /// which records them.
    pub fn apply_admit(&mut self, req: &AdmitRequest, plan: AdmitPlan) {
        let admitted = plan.outcome == AdmitOutcome::Admitted;
        let book = self.book_mut(&req.tenant);
        let same_terms =
            book.spend.period == plan.spend.period && book.spend.timezone == plan.spend.timezone;
        if admitted || same_terms {
            book.spend = plan.spend;
        }
        if admitted {
            book.slots += 1;
            book.holds += req.hold;
            self.account_slots += 1;
        }
    }

    /// A live call's slot and hold are given back without a charge (the call was not placed).
    pub fn release(&mut self, tenant: &str, hold: i64) {
        let book = self.book_mut(tenant);
        book.slots -= 1;
        book.holds -= hold;
        self.account_slots -= 1;
    }

    /// The spend a settlement of `charge` credits leaves, changing nothing.
    pub fn spend_after(&self, tenant: &str, charge: i64, now: i64) -> Spend {
        let mut spend = self
            .tenants
            .get(tenant)
            .map(|b| b.spend.at(now))
            .unwrap_or_default();
        spend.spent += charge;
        spend
    }

    /// A live call is settled: its slot and hold freed, `spend` (from [`Ledger::spend_after`]) kept.
    pub fn settle(&mut self, tenant: &str, hold: i64, spend: Spend) {
        self.release(tenant, hold);
        self.book_mut(tenant).spend = spend;
    }

    /// Adjust a tenant's spend in its current period (under `terms`, when it has a budget) by
    /// `delta` credits: negative tops the budget up, positive charges it. Returns the spend to
    /// record.
    pub fn adjust_spend(
        &mut self,
        tenant: &str,
        terms: Option<&BudgetTerms>,
        delta: i64,
        now: i64,
    ) -> Spend {
        let book = self.book_mut(tenant);
        let mut spend = match terms {
            Some(terms) => book.spend.under(terms).at(now),
            None => book.spend.at(now),
        };
        spend.spent += delta;
        book.spend = spend.clone();
        spend
    }

    /// A tenant's usage as of `now`.
    pub fn usage(&self, tenant: &str, now: i64) -> Usage {
        let book = self.book(tenant);
        let spend = book.spend.at(now);
        Usage {
            slots: book.slots,
            holds: book.holds,
            spent: spend.spent,
            period_start: spend.period_start,
        }
    }

    /// Where two ledgers disagree (the counters against a rebuild from the records), if anywhere.
    pub fn differences(&self, records: &Ledger, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        if self.account_slots != records.account_slots {
            out.push(format!(
                "account slots: counters {} records {}",
                self.account_slots, records.account_slots
            ));
        }
        let mut tenants: Vec<&str> = self
            .tenants
            .keys()
            .chain(records.tenants.keys())
            .map(|t| &**t)
            .collect();
        tenants.sort_unstable();
        tenants.dedup();
        for tenant in tenants {
            let (a, b) = (self.usage(tenant, now), records.usage(tenant, now));
            if a != b {
                out.push(format!("{tenant}: counters {a:?} records {b:?}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JAN_5: i64 = 1_767_650_400_000_000; // 2026-01-05T22:00Z

    fn request(tenant: &str, hold: i64, budget: Option<i64>) -> AdmitRequest {
        AdmitRequest {
            reservation_id: "r".into(),
            tenant: tenant.into(),
            token_hash: "h".into(),
            tenant_max_concurrent: Some(2),
            account_max_concurrent: 3,
            budget: budget.map(|credits| BudgetTerms {
                credits,
                period: Period::Daily,
                timezone: "America/New_York".into(),
            }),
            hold,
            price: 1,
            increment_secs: 60,
            max_duration: 600,
            lease_expires_at: JAN_5 + 1,
            now: JAN_5,
            tenant_webhook: None,
        }
    }

    fn admit(ledger: &mut Ledger, req: &AdmitRequest) -> AdmitOutcome {
        let plan = ledger.plan_admit(req);
        let outcome = plan.outcome.clone();
        ledger.apply_admit(req, plan);
        outcome
    }

    #[test]
    fn charges_round_up_to_the_increment_and_stop_at_the_hold() {
        assert_eq!(charge_for(0, 60, 2, 100), 0);
        assert_eq!(charge_for(1, 60, 2, 100), 2);
        assert_eq!(charge_for(60, 60, 2, 100), 2);
        assert_eq!(charge_for(61, 60, 2, 100), 4);
        assert_eq!(charge_for(10_000, 60, 2, 20), 20);
        assert_eq!(charge_for(7, 1, 3, 100), 21);
    }

    #[test]
    fn slots_are_limited_per_tenant_and_account_wide() {
        let mut ledger = Ledger::default();
        assert_eq!(
            admit(&mut ledger, &request("a", 1, None)),
            AdmitOutcome::Admitted
        );
        assert_eq!(
            admit(&mut ledger, &request("a", 1, None)),
            AdmitOutcome::Admitted
        );
        assert_eq!(
            admit(&mut ledger, &request("a", 1, None)),
            AdmitOutcome::TenantSlotsFull { limit: 2 }
        );
        assert_eq!(
            admit(&mut ledger, &request("b", 1, None)),
            AdmitOutcome::Admitted
        );
        assert_eq!(
            admit(&mut ledger, &request("b", 1, None)),
            AdmitOutcome::AccountSlotsFull { limit: 3 }
        );
        assert_eq!(ledger.account_slots(), 3);
        ledger.release("a", 1);
        assert_eq!(
            admit(&mut ledger, &request("b", 1, None)),
            AdmitOutcome::Admitted
        );
    }

    #[test]
    fn holds_and_spend_count_against_the_budget_until_the_period_ends() {
        let mut ledger = Ledger::default();
        assert_eq!(
            admit(&mut ledger, &request("a", 6, Some(10))),
            AdmitOutcome::Admitted
        );
        assert_eq!(
            admit(&mut ledger, &request("a", 6, Some(10))),
            AdmitOutcome::InsufficientCredits {
                needed: 6,
                available: 4
            }
        );
        let spend = ledger.spend_after("a", 5, JAN_5);
        ledger.settle("a", 6, spend);
        assert_eq!(ledger.usage("a", JAN_5).spent, 5);
        assert_eq!(
            admit(&mut ledger, &request("a", 6, Some(10))),
            AdmitOutcome::InsufficientCredits {
                needed: 6,
                available: 5
            }
        );
        // The next New York day (05:00Z on the 6th) starts afresh.
        let mut next_day = request("a", 6, Some(10));
        next_day.now = JAN_5 + 7 * 3_600_000_000;
        assert_eq!(admit(&mut ledger, &next_day), AdmitOutcome::Admitted);
        assert_eq!(ledger.usage("a", next_day.now).spent, 0);
    }

    #[test]
    fn a_rebuild_from_records_matches_the_counters() {
        let mut ledger = Ledger::default();
        admit(&mut ledger, &request("a", 6, Some(100)));
        admit(&mut ledger, &request("b", 2, None));
        let rebuilt = Ledger::rebuild(
            [("a".to_string(), 1, 6), ("b".to_string(), 1, 2)],
            [("a".to_string(), ledger.book("a").spend.clone())],
        );
        assert!(ledger.differences(&rebuilt, JAN_5).is_empty());
        let wrong = Ledger::rebuild([("a".to_string(), 1, 5)], []);
        assert_eq!(ledger.differences(&wrong, JAN_5).len(), 3);
    }

    #[test]
    fn a_settled_call_is_never_revived_by_its_bind() {
        assert_eq!(status_after_bind(PENDING, "queued"), "queued");
        assert_eq!(
            answered_status(&serde_json::json!({"status": "ringing"})),
            "ringing"
        );
        assert_eq!(answered_status(&serde_json::json!({"id": "c"})), "queued");
        assert_eq!(status_after_bind("completed", "queued"), "completed");
        assert_eq!(lease_after_bind(true, 1, 2), 2);
        assert_eq!(lease_after_bind(false, 1, 2), 1);
    }
}
