//! The `StateStore` contract, backend-neutral: every backend runs every case here.
//!
//! A backend provides a [`Backend`] (a way to open its store, and to open the same state again
//! as a restarted gateway would) and calls [`conformance_suite!`] with it. Each case drives the
//! store through the trait only and ends by checking the live counters against the records.
#![allow(dead_code)]

use std::sync::Arc;

use callgate::state::{
    AdmitOutcome, AdmitRequest, AttemptCap, AttemptLimit, AttemptOutcome, AttemptScope,
    BudgetTerms, CallEvent, ConsentRecord, EventOutcome, IdempotencyBegin, IdempotencyClaim,
    OptOut, Period, RelayToken, StateStore, StoreError, StoredResponse, Suspension, Usage,
};
use serde_json::json;

/// Opens a backend's store; a second `open` sees the same state (a restart).
pub trait Backend {
    fn open(&self) -> Arc<dyn StateStore>;
}

/// 2026-01-05T22:00Z (17:00 in New York), in microseconds.
pub const NOW: i64 = 1_767_650_400_000_000;
pub const SEC: i64 = 1_000_000;

/// An admission request: `hold` credits at 1 credit per started minute.
pub fn request(tenant: &str, id: &str, hold: i64) -> AdmitRequest {
    AdmitRequest {
        reservation_id: id.to_string(),
        tenant: tenant.to_string(),
        token_hash: format!("token-{id}"),
        tenant_max_concurrent: None,
        account_max_concurrent: 1_000,
        budget: None,
        hold,
        price: 1,
        increment_secs: 60,
        max_duration: (hold * 60) as u32,
        lease_expires_at: NOW + 3_600 * SEC,
        now: NOW,
        tenant_webhook: None,
    }
}

/// The relay token of the reservation `id` made by [`request`].
pub fn token(id: &str) -> RelayToken {
    RelayToken {
        reservation_id: id.to_string(),
        secret_hash: format!("token-{id}"),
    }
}

fn budget(credits: i64, period: Period) -> Option<BudgetTerms> {
    Some(BudgetTerms {
        credits,
        period,
        timezone: "America/New_York".into(),
    })
}

fn event(call_id: Option<&str>, status: &str, duration: Option<i64>, is_final: bool) -> CallEvent {
    CallEvent {
        call_id: call_id.map(str::to_string),
        status: status.to_string(),
        duration,
        is_final,
    }
}

fn usage(slots: i64, holds: i64, spent: i64) -> (i64, i64, i64) {
    (slots, holds, spent)
}

async fn counters(store: &Arc<dyn StateStore>, tenant: &str, now: i64) -> (i64, i64, i64) {
    let Usage {
        slots,
        holds,
        spent,
        ..
    } = store.usage(tenant, now).await.unwrap();
    (slots, holds, spent)
}

async fn consistent(store: &Arc<dyn StateStore>, now: i64) {
    store.check_consistency(now).await.unwrap();
}

async fn admit_and_bind(store: &Arc<dyn StateStore>, req: AdmitRequest, call_id: &str) {
    let id = req.reservation_id.clone();
    let req_tenant = req.tenant.clone();
    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    let tenant = req_tenant.clone();
    let bound = store
        .bind(
            &tenant,
            &id,
            call_id,
            json!({"id": call_id, "status": "queued"}).into(),
            NOW + 900 * SEC,
            NOW,
        )
        .await
        .unwrap();
    bound.await.unwrap();
}

pub async fn tenant_slots_are_exact_and_a_refusal_takes_nothing(b: &impl Backend) {
    let store = b.open();
    for i in 0..2 {
        let mut req = request("a", &format!("r{i}"), 5);
        req.tenant_max_concurrent = Some(2);
        assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    }
    let mut req = request("a", "r2", 5);
    req.tenant_max_concurrent = Some(2);
    assert_eq!(
        store.admit(req).await.unwrap(),
        AdmitOutcome::TenantSlotsFull { limit: 2 }
    );
    assert_eq!(counters(&store, "a", NOW).await, usage(2, 10, 0));
    // The refused reservation left nothing behind: its token is unknown.
    let outcome = store
        .record_event(&token("r2"), event(None, "completed", Some(1), true), NOW)
        .await
        .unwrap();
    assert_eq!(outcome, EventOutcome::UnknownToken);
    consistent(&store, NOW).await;
}

pub async fn the_account_cap_spans_tenants(b: &impl Backend) {
    let store = b.open();
    let cap = |mut r: AdmitRequest| {
        r.account_max_concurrent = 3;
        r
    };
    for (tenant, id) in [("a", "r0"), ("a", "r1"), ("b", "r2")] {
        let outcome = store.admit(cap(request(tenant, id, 1))).await.unwrap();
        assert_eq!(outcome, AdmitOutcome::Admitted);
    }
    assert_eq!(
        store.admit(cap(request("b", "r3", 1))).await.unwrap(),
        AdmitOutcome::AccountSlotsFull { limit: 3 }
    );
    store.release("r0").await.unwrap();
    assert_eq!(
        store.admit(cap(request("b", "r3", 1))).await.unwrap(),
        AdmitOutcome::Admitted
    );
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 1, 0));
    assert_eq!(counters(&store, "b", NOW).await, usage(2, 2, 0));
    consistent(&store, NOW).await;
}

pub async fn holds_and_spend_count_against_the_budget(b: &impl Backend) {
    let store = b.open();
    let with_budget = |id: &str| {
        let mut r = request("a", id, 10);
        r.budget = budget(25, Period::Monthly);
        r
    };
    admit_and_bind(&store, with_budget("r0"), "c0").await;
    assert_eq!(
        store.admit(with_budget("r1")).await.unwrap(),
        AdmitOutcome::Admitted
    );
    assert_eq!(
        store.admit(with_budget("r2")).await.unwrap(),
        AdmitOutcome::InsufficientCredits {
            needed: 10,
            available: 5
        }
    );
    // 61 s are two started minutes: 2 credits charged, 8 of the hold returned.
    let outcome = store
        .record_event(
            &token("r0"),
            event(Some("c0"), "completed", Some(61), true),
            NOW,
        )
        .await
        .unwrap();
    let EventOutcome::Applied { record, settled } = outcome else {
        panic!("not applied: {outcome:?}");
    };
    assert!(settled);
    assert_eq!((record.charged, record.live, record.hold), (2, false, 0));
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 10, 2));
    assert_eq!(
        store.admit(with_budget("r2")).await.unwrap(),
        AdmitOutcome::Admitted
    );
    consistent(&store, NOW).await;
}

pub async fn a_release_frees_everything_and_charges_nothing(b: &impl Backend) {
    let store = b.open();
    let mut req = request("a", "r0", 10);
    req.budget = budget(100, Period::Daily);
    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    store.release("r0").await.unwrap();
    store.release("r0").await.unwrap();
    store.release("never-admitted").await.unwrap();
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 0));
    // A bound call is not the gateway's to release: its slot and hold stay until it ends.
    admit_and_bind(&store, request("a", "r1", 10), "c1").await;
    store.release("r1").await.unwrap();
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 10, 0));
    // The drop guard's release, without waiting, still lands.
    assert_eq!(
        store.admit(request("a", "r2", 5)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    store.release_detached("r2");
    for _ in 0..100 {
        if counters(&store, "a", NOW).await == usage(1, 10, 0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 10, 0));
    let outcome = store
        .record_event(&token("r0"), event(None, "completed", Some(30), true), NOW)
        .await
        .unwrap();
    assert_eq!(outcome, EventOutcome::UnknownToken);
    consistent(&store, NOW).await;
}

pub async fn a_call_is_settled_once(b: &impl Backend) {
    let store = b.open();
    admit_and_bind(&store, request("a", "r0", 10), "c0").await;
    let ringing = store
        .record_event(
            &token("r0"),
            event(Some("c0"), "ringing", None, false),
            NOW + SEC,
        )
        .await
        .unwrap();
    let EventOutcome::Applied { record, settled } = ringing else {
        panic!("{ringing:?}");
    };
    assert!(!settled);
    assert_eq!((record.status.as_str(), record.live), ("ringing", true));
    let done = event(Some("c0"), "completed", Some(120), true);
    let first = store
        .record_event(&token("r0"), done.clone(), NOW + 2 * SEC)
        .await
        .unwrap();
    assert!(matches!(first, EventOutcome::Applied { settled: true, .. }));
    let again = store
        .record_event(&token("r0"), done, NOW + 3 * SEC)
        .await
        .unwrap();
    let EventOutcome::Applied { record, settled } = again else {
        panic!("{again:?}");
    };
    assert!(!settled);
    assert_eq!(record.charged, 2);
    // Nor does the lease, nor the upstream's late view, settle it again.
    assert!(
        store
            .expire_leases(NOW + 10_000 * SEC)
            .await
            .unwrap()
            .is_empty()
    );
    let late = event(Some("c0"), "completed", Some(600), true);
    let (record, settled) = store
        .apply_upstream_state("a", "c0", late, None, NOW + 4 * SEC)
        .await
        .unwrap()
        .unwrap();
    assert!(!settled, "settled once, by the first ending");
    assert_eq!((record.charged, record.duration), (2, Some(120)));
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 2));
    consistent(&store, NOW).await;
}

pub async fn a_late_bind_never_revives_a_settled_call(b: &impl Backend) {
    let store = b.open();
    let req = request("a", "r0", 10);
    let lease = req.lease_expires_at;
    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    // The final event outruns the upstream's answer.
    let outcome = store
        .record_event(
            &token("r0"),
            event(Some("c0"), "completed", Some(30), true),
            NOW,
        )
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        EventOutcome::Applied { settled: true, .. }
    ));
    let bound = store
        .bind(
            "a",
            "r0",
            "c0",
            json!({"id": "c0", "status": "queued"}).into(),
            NOW + 99_999 * SEC,
            NOW,
        )
        .await
        .unwrap();
    bound.await.unwrap();
    let record = store.get_call("a", "c0").await.unwrap().unwrap();
    assert_eq!(record.status, "completed");
    assert!(!record.live);
    assert_eq!(record.lease_expires_at, lease);
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 1));
    consistent(&store, NOW).await;
}

pub async fn a_lapsed_lease_is_charged_the_full_hold(b: &impl Backend) {
    let store = b.open();
    let mut req = request("a", "r0", 10);
    req.budget = budget(100, Period::None);
    admit_and_bind(&store, req, "c0").await;
    assert!(
        store
            .expire_leases(NOW + 899 * SEC)
            .await
            .unwrap()
            .is_empty()
    );
    let expired = store.expire_leases(NOW + 900 * SEC).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (
            expired[0].status.as_str(),
            expired[0].charged,
            expired[0].live
        ),
        ("expired", 10, false)
    );
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 10));
    // The call's own final event, arriving after, changes nothing.
    let late = event(Some("c0"), "completed", Some(30), true);
    let outcome = store
        .record_event(&token("r0"), late, NOW + 901 * SEC)
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        EventOutcome::Applied { settled: false, .. }
    ));
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 10));
    consistent(&store, NOW).await;
}

pub async fn events_for_another_call_are_refused(b: &impl Backend) {
    let store = b.open();
    admit_and_bind(&store, request("a", "r0", 10), "c0").await;
    let forged = event(Some("c1"), "completed", Some(1), true);
    assert_eq!(
        store.record_event(&token("r0"), forged, NOW).await.unwrap(),
        EventOutcome::CallMismatch
    );
    assert_eq!(
        store
            .record_event(&token("r9"), event(None, "completed", None, true), NOW)
            .await
            .unwrap(),
        EventOutcome::UnknownToken
    );
    // The right reservation with a wrong secret is no better.
    let wrong_secret = RelayToken {
        reservation_id: "r0".into(),
        secret_hash: "token-r1".into(),
    };
    assert_eq!(
        store
            .record_event(
                &wrong_secret,
                event(Some("c0"), "completed", Some(1), true),
                NOW
            )
            .await
            .unwrap(),
        EventOutcome::UnknownToken
    );
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 10, 0));
    consistent(&store, NOW).await;
}

pub async fn reconciliation_settles_from_the_upstreams_view(b: &impl Backend) {
    let store = b.open();
    admit_and_bind(&store, request("a", "r0", 10), "c0").await;
    let object = json!({"id": "c0", "status": "failed", "duration": 0});
    let (record, settled) = store
        .apply_upstream_state(
            "a",
            "c0",
            event(Some("c0"), "failed", Some(0), true),
            Some(object.clone()),
            NOW,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(settled);
    assert_eq!(
        (record.status.as_str(), record.live, record.charged),
        ("failed", false, 0)
    );
    assert_eq!(record.object, Some(object));
    let unknown = event(Some("zz"), "completed", None, true);
    assert!(
        store
            .apply_upstream_state("a", "zz", unknown, None, NOW)
            .await
            .unwrap()
            .is_none()
    );
    // Another tenant's call id finds nothing.
    admit_and_bind(&store, request("a", "r1", 10), "c1").await;
    let foreign = event(Some("c1"), "completed", Some(60), true);
    assert!(
        store
            .apply_upstream_state("b", "c1", foreign, None, NOW)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 10, 0));
    consistent(&store, NOW).await;
}

pub async fn a_budget_starts_afresh_each_period(b: &impl Backend) {
    let store = b.open();
    let at = |id: &str, now: i64| {
        let mut r = request("a", id, 10);
        r.budget = budget(10, Period::Daily);
        r.now = now;
        r.lease_expires_at = now + 900 * SEC;
        r
    };
    admit_and_bind(&store, at("r0", NOW), "c0").await;
    store
        .record_event(
            &token("r0"),
            event(Some("c0"), "completed", Some(600), true),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 10));
    assert!(matches!(
        store.admit(at("r1", NOW + 60 * SEC)).await.unwrap(),
        AdmitOutcome::InsufficientCredits { available: 0, .. }
    ));
    // New York's next day begins at 05:00Z, seven hours on.
    let tomorrow = NOW + 7 * 3_600 * SEC;
    assert_eq!(counters(&store, "a", tomorrow).await, usage(0, 0, 0));
    assert_eq!(
        store.admit(at("r2", tomorrow)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    consistent(&store, tomorrow).await;
}

pub async fn concurrent_admissions_never_exceed_a_limit(b: &impl Backend) {
    let store = b.open();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut req = request("a", &format!("r{i:03}"), 2);
                req.tenant_max_concurrent = Some(7);
                req.budget = budget(1_000, Period::Monthly);
                store.admit(req).await.unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        if task.await.unwrap() == AdmitOutcome::Admitted {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 7);
    assert_eq!(counters(&store, "a", NOW).await, usage(7, 14, 0));
    consistent(&store, NOW).await;
}

pub async fn the_counters_survive_a_restart(b: &impl Backend) {
    {
        let store = b.open();
        for i in 0..3 {
            let mut req = request("a", &format!("r{i}"), 10);
            req.budget = budget(100, Period::Monthly);
            admit_and_bind(&store, req, &format!("c{i}")).await;
        }
        assert_eq!(
            store.admit(request("b", "r9", 4)).await.unwrap(),
            AdmitOutcome::Admitted
        );
        store
            .record_event(
                &token("r0"),
                event(Some("c0"), "completed", Some(90), true),
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(counters(&store, "a", NOW).await, usage(2, 20, 2));
    }
    let store = b.open();
    assert_eq!(counters(&store, "a", NOW).await, usage(2, 20, 2));
    assert_eq!(counters(&store, "b", NOW).await, usage(1, 4, 0));
    consistent(&store, NOW).await;
    let mut req = request("a", "r5", 80);
    req.budget = budget(100, Period::Monthly);
    assert_eq!(
        store.admit(req).await.unwrap(),
        AdmitOutcome::InsufficientCredits {
            needed: 80,
            available: 78
        }
    );
    let expired = store.expire_leases(NOW + 3_600 * SEC).await.unwrap();
    assert_eq!(expired.len(), 3);
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 22));
    consistent(&store, NOW).await;
}

pub async fn an_event_recovers_a_lost_bind(b: &impl Backend) {
    let store = b.open();
    assert_eq!(
        store.admit(request("a", "r0", 10)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    // No bind (the gateway died before it was recorded); the upstream's event names the call.
    let ringing = event(Some("c0"), "ringing", None, false);
    store
        .record_event(&token("r0"), ringing, NOW)
        .await
        .unwrap();
    let record = store.get_call("a", "c0").await.unwrap().unwrap();
    assert_eq!((record.status.as_str(), record.live), ("ringing", true));
    consistent(&store, NOW).await;
}

/// Bind `id` to `call_id` and wait until it is durable; a refusal may come at either step.
async fn try_bind(
    store: &Arc<dyn StateStore>,
    tenant: &str,
    id: &str,
    call_id: &str,
) -> Result<(), StoreError> {
    let queued = store
        .bind(
            tenant,
            id,
            call_id,
            json!({"id": call_id, "status": "queued"}).into(),
            NOW + 900 * SEC,
            NOW,
        )
        .await?;
    queued.await
}

pub async fn an_upstream_id_names_one_call_and_a_call_keeps_its_id(b: &impl Backend) {
    let store = b.open();
    admit_and_bind(&store, request("a", "r1", 5), "c1").await;
    assert_eq!(
        store.admit(request("a", "r2", 5)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    // The same bind again (a retry) is harmless.
    try_bind(&store, "a", "r1", "c1").await.unwrap();
    // A bound call refuses a second id, and an id bound to one call refuses another: neither
    // refusal changes anything.
    for (id, call) in [("r1", "c2"), ("r2", "c1")] {
        let refused = try_bind(&store, "a", id, call).await;
        assert!(
            matches!(refused, Err(StoreError::Refused(_))),
            "{id} to {call}: {refused:?}"
        );
    }
    assert!(store.get_call("a", "c2").await.unwrap().is_none());
    let first = store.get_call("a", "c1").await.unwrap().unwrap();
    assert_eq!(first.reservation_id, "r1");
    // An event that names an id bound to another call does not move it, and still applies.
    let ringing = event(Some("c1"), "ringing", None, false);
    store
        .record_event(&token("r2"), ringing, NOW)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_call("a", "c1")
            .await
            .unwrap()
            .unwrap()
            .reservation_id,
        "r1"
    );
    // The second call still binds an id of its own, and its events settle it.
    try_bind(&store, "a", "r2", "c2").await.unwrap();
    let second = store.get_call("a", "c2").await.unwrap().unwrap();
    assert_eq!(
        (second.reservation_id.as_str(), second.status.as_str()),
        ("r2", "ringing")
    );
    let done = event(Some("c2"), "completed", Some(60), true);
    store.record_event(&token("r2"), done, NOW).await.unwrap();
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 5, 1));
    // A restart keeps both bindings.
    drop(store);
    let store = b.open();
    assert_eq!(
        store
            .get_call("a", "c1")
            .await
            .unwrap()
            .unwrap()
            .reservation_id,
        "r1"
    );
    assert_eq!(
        store
            .get_call("a", "c2")
            .await
            .unwrap()
            .unwrap()
            .reservation_id,
        "r2"
    );
    consistent(&store, NOW).await;
}

pub async fn reads_are_per_tenant_and_paged(b: &impl Backend) {
    let store = b.open();
    for i in 0..3 {
        admit_and_bind(&store, request("a", &format!("r{i}"), 1), &format!("c{i}")).await;
    }
    admit_and_bind(&store, request("b", "r9", 1), "c9").await;
    assert!(store.get_call("b", "c0").await.unwrap().is_none());
    assert!(store.get_call("a", "nope").await.unwrap().is_none());
    let page = store.list_calls("a", 2, None).await.unwrap();
    let ids: Vec<_> = page.iter().map(|r| r.call_id.clone().unwrap()).collect();
    assert_eq!(ids, ["c2", "c1"]);
    let rest = store
        .list_calls("a", 2, Some(page[1].reservation_id.clone()))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].call_id.as_deref(), Some("c0"));
    let quiet = store.quiet_calls(NOW, NOW, 10).await.unwrap();
    assert_eq!(quiet.len(), 4);
    assert!(
        store
            .quiet_calls(NOW - 1, NOW, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Not quiet, but lapsing (leases end at NOW + 900 s): due all the same, each once.
    let lapsing = store
        .quiet_calls(NOW - 1, NOW + 900 * SEC, 10)
        .await
        .unwrap();
    assert_eq!(lapsing.len(), 4);
    let lapsing = store.quiet_calls(NOW, NOW + 900 * SEC, 10).await.unwrap();
    assert_eq!(lapsing.len(), 4);
    assert_eq!(
        store
            .quiet_calls(NOW, NOW + 900 * SEC, 3)
            .await
            .unwrap()
            .len(),
        3
    );
    // A pending call (admitted, not bound) is never asked about: it has no upstream id.
    assert_eq!(
        store.admit(request("a", "r-pending", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    assert_eq!(
        store
            .quiet_calls(NOW, NOW + 7_200 * SEC, 10)
            .await
            .unwrap()
            .len(),
        4
    );
    consistent(&store, NOW).await;
}

pub async fn idempotency_keys_answer_once(b: &impl Backend) {
    let store = b.open();
    let expires = NOW + 60 * SEC;
    let begin = |key: &'static str, hash: &'static str, now: i64| {
        let store = store.clone();
        async move {
            store
                .idempotency_begin("a", key, hash, now, now + 60 * SEC)
                .await
                .unwrap()
        }
    };
    assert_eq!(begin("k", "h1", NOW).await, IdempotencyBegin::Proceed);
    assert_eq!(begin("k", "h1", NOW).await, IdempotencyBegin::InFlight);
    assert_eq!(begin("k", "h2", NOW).await, IdempotencyBegin::Conflict);
    // Keys are per tenant.
    let other = store
        .idempotency_begin("b", "k", "h2", NOW, expires)
        .await
        .unwrap();
    assert_eq!(other, IdempotencyBegin::Proceed);
    let answer = StoredResponse {
        status: 200,
        body: b"{\"id\":\"c0\"}".to_vec(),
        content_type: "application/json".into(),
    };
    let claim = IdempotencyClaim {
        body_hash: "h1".into(),
        created_at: NOW,
        expires_at: expires,
    };
    let stored = store
        .idempotency_complete("a", "k", claim.clone(), answer.clone())
        .await
        .unwrap();
    stored.await.unwrap();
    assert_eq!(
        begin("k", "h1", NOW).await,
        IdempotencyBegin::Replay(answer.clone())
    );
    // An abandoned claim frees the key; a completed one is not abandoned.
    assert_eq!(begin("j", "h1", NOW).await, IdempotencyBegin::Proceed);
    store.idempotency_abandon("a", "j").await.unwrap();
    store.idempotency_abandon("a", "k").await.unwrap();
    assert_eq!(begin("j", "h2", NOW).await, IdempotencyBegin::Proceed);
    assert!(matches!(
        begin("k", "h1", NOW).await,
        IdempotencyBegin::Replay(_)
    ));
    // Expired keys start afresh and are purged.
    assert_eq!(begin("k", "h2", expires).await, IdempotencyBegin::Proceed);
    assert!(store.purge_idempotency(expires + 120 * SEC).await.unwrap() >= 2);
    // An answer whose claim was lost (a failed commit) is still kept: a retry replays it.
    let stored = store
        .idempotency_complete("a", "lost", claim, answer.clone())
        .await
        .unwrap();
    stored.await.unwrap();
    assert_eq!(
        begin("lost", "h1", NOW).await,
        IdempotencyBegin::Replay(answer)
    );
    consistent(&store, NOW).await;
}

pub async fn issued_relay_tokens_find_their_call(b: &impl Backend) {
    let store = b.open();
    let (token, stored) = RelayToken::issue("r0");
    let mut req = request("a", "r0", 10);
    req.token_hash = stored;
    admit_and_bind(&store, req, "c0").await;
    let parsed = RelayToken::parse(&token).unwrap();
    let outcome = store
        .record_event(&parsed, event(Some("c0"), "completed", Some(60), true), NOW)
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        EventOutcome::Applied { settled: true, .. }
    ));
    // Another reservation's id with this secret, or this id with another secret: unknown.
    let (_, secret) = token.split_once('.').unwrap();
    for forged in [format!("r1.{secret}"), format!("r0.{}", "0".repeat(64))] {
        let forged = RelayToken::parse(&forged).unwrap();
        let outcome = store
            .record_event(&forged, event(Some("c0"), "completed", Some(1), true), NOW)
            .await
            .unwrap();
        assert_eq!(outcome, EventOutcome::UnknownToken);
    }
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 1));
    consistent(&store, NOW).await;
}

pub async fn free_calls_and_a_budget_made_fixed(b: &impl Backend) {
    let store = b.open();
    // Free calls (price 0, hold 0), of a tenant whose id is a word the store might use itself.
    for id in ["r0", "r1"] {
        let mut req = request("account", id, 0);
        req.price = 0;
        assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    }
    assert_eq!(counters(&store, "account", NOW).await, usage(2, 0, 0));
    let done = event(Some("c0"), "completed", Some(30), true);
    let outcome = store.record_event(&token("r0"), done, NOW).await.unwrap();
    assert!(matches!(
        outcome,
        EventOutcome::Applied { settled: true, .. }
    ));
    store.release("r1").await.unwrap();
    assert_eq!(counters(&store, "account", NOW).await, usage(0, 0, 0));

    // A daily budget made a fixed allowance: what was spent stays spent, no reset at midnight.
    let mut req = request("b", "r2", 10);
    req.budget = budget(100, Period::Daily);
    admit_and_bind(&store, req, "c2").await;
    let done = event(Some("c2"), "completed", Some(300), true);
    store.record_event(&token("r2"), done, NOW).await.unwrap();
    assert_eq!(counters(&store, "b", NOW).await, usage(0, 0, 5));
    let tomorrow = NOW + 24 * 3_600 * SEC;
    let fixed = |id: &str, hold: i64| {
        let mut req = request("b", id, hold);
        req.budget = budget(100, Period::None);
        req.now = tomorrow;
        req.lease_expires_at = tomorrow + 3_600 * SEC;
        req
    };
    assert_eq!(
        store.admit(fixed("r3", 10)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    assert_eq!(counters(&store, "b", tomorrow).await, usage(1, 10, 5));
    assert_eq!(
        store.admit(fixed("r4", 86)).await.unwrap(),
        AdmitOutcome::InsufficientCredits {
            needed: 86,
            available: 85
        }
    );
    consistent(&store, tomorrow).await;
}

pub async fn an_operator_releases_a_stuck_call_and_tops_up_a_budget(b: &impl Backend) {
    let store = b.open();
    let terms = budget(100, Period::Daily);
    let mut req = request("a", "r0", 10);
    req.budget = terms.clone();
    admit_and_bind(&store, req, "c0").await;
    // Released by an operator at a stated charge: settled once, and only the tenant's own call.
    assert!(
        store
            .settle_stated("b", "c0", 3, NOW)
            .await
            .unwrap()
            .is_none()
    );
    let (record, settled) = store
        .settle_stated("a", "c0", 3, NOW)
        .await
        .unwrap()
        .unwrap();
    assert!(settled);
    assert_eq!(
        (record.status.as_str(), record.charged, record.live),
        ("released", 3, false)
    );
    let (_, again) = store
        .settle_stated("a", "c0", 9, NOW)
        .await
        .unwrap()
        .unwrap();
    assert!(!again);
    assert_eq!(counters(&store, "a", NOW).await, usage(0, 0, 3));
    // A top-up of 20 this period: the budget holds a call of 110 now.
    let topped = store
        .adjust_spend("a", terms.clone(), -20, NOW)
        .await
        .unwrap();
    assert_eq!(topped.spent, -17);
    let mut req = request("a", "r1", 110);
    req.budget = terms.clone();
    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    assert_eq!(counters(&store, "a", NOW).await, usage(1, 110, -17));
    let charged = store.adjust_spend("a", terms, 7, NOW).await.unwrap();
    assert_eq!((charged.slots, charged.holds, charged.spent), (1, 110, -10));
    consistent(&store, NOW).await;
}

/// One `#[tokio::test]` per case, for the backend `$backend` (an expression of a [`Backend`]).
pub async fn opt_outs_are_kept_per_scope_and_survive_a_restart(b: &impl Backend) {
    let number = "+14155550123";
    let entry = |tenant: Option<&str>, source: &str| OptOut {
        phone_number: number.into(),
        tenant: tenant.map(str::to_string),
        source: source.into(),
        created_at: NOW,
    };
    {
        let store = b.open();
        assert!(store.opt_outs(number).await.unwrap().is_empty());
        assert!(store.add_opt_out(entry(None, "tenant:a")).await.unwrap());
        // The first entry of a scope is kept.
        assert!(!store.add_opt_out(entry(None, "admin")).await.unwrap());
        assert!(store.add_opt_out(entry(Some("b"), "admin")).await.unwrap());
        let mut found = store.opt_outs(number).await.unwrap();
        found.sort_by(|x, y| x.tenant.cmp(&y.tenant));
        assert_eq!(
            found,
            vec![entry(None, "tenant:a"), entry(Some("b"), "admin")]
        );
        assert!(store.opt_outs("+14155550124").await.unwrap().is_empty());
        store.flush().await.unwrap();
    }
    let store = b.open();
    let found = store.opt_outs(number).await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(store.remove_opt_out(number, None).await.unwrap());
    assert!(!store.remove_opt_out(number, None).await.unwrap());
    assert_eq!(
        store.opt_outs(number).await.unwrap(),
        vec![entry(Some("b"), "admin")]
    );
    assert!(store.remove_opt_out(number, Some("b")).await.unwrap());
    assert!(store.opt_outs(number).await.unwrap().is_empty());
}

pub async fn attempts_are_capped_in_a_rolling_window(b: &impl Backend) {
    let number = "+14155550123";
    let cap = |scope: AttemptScope| AttemptCap {
        scope,
        phone_number: number.into(),
        limits: vec![AttemptLimit {
            max: 2,
            window: 3_600 * SEC,
        }],
    };
    let acme = cap(AttemptScope::Tenant("acme".into()));
    {
        let store = b.open();
        let take = |cap: AttemptCap, id: &'static str, now: i64| {
            let store = store.clone();
            async move { store.take_attempt(&cap, id, now).await.unwrap() }
        };
        assert_eq!(take(acme.clone(), "r1", NOW).await, AttemptOutcome::Taken);
        assert_eq!(
            take(acme.clone(), "r2", NOW + 600 * SEC).await,
            AttemptOutcome::Taken
        );
        // Full: refused until the first attempt leaves the window; nothing counted.
        assert_eq!(
            take(acme.clone(), "r3", NOW + 900 * SEC).await,
            AttemptOutcome::Exceeded {
                retry_at: NOW + 3_600 * SEC,
                limit: 0
            }
        );
        // Another tenant, and the account scope, count apart.
        let globex = cap(AttemptScope::Tenant("globex".into()));
        assert_eq!(take(globex, "r4", NOW).await, AttemptOutcome::Taken);
        assert_eq!(
            take(cap(AttemptScope::Account), "r5", NOW).await,
            AttemptOutcome::Taken
        );
        store.flush().await.unwrap();
    }
    // After a restart the attempts still count.
    let store = b.open();
    let scope = AttemptScope::Tenant("acme".into());
    assert_eq!(
        store
            .attempts(&scope, number, NOW - 3_600 * SEC)
            .await
            .unwrap(),
        vec![NOW, NOW + 600 * SEC]
    );
    assert!(matches!(
        store
            .take_attempt(&acme, "r6", NOW + 1_000 * SEC)
            .await
            .unwrap(),
        AttemptOutcome::Exceeded { .. }
    ));
    // A call that was not placed gives its attempt back.
    store.return_attempt(&scope, number, "r2").await.unwrap();
    assert_eq!(
        store
            .take_attempt(&acme, "r7", NOW + 1_000 * SEC)
            .await
            .unwrap(),
        AttemptOutcome::Taken
    );
    // The window rolls: an hour after the first attempt, one more may go.
    let later = NOW + 3_600 * SEC + 1;
    assert_eq!(
        store.take_attempt(&acme, "r8", later).await.unwrap(),
        AttemptOutcome::Taken
    );
    assert_eq!(
        store
            .attempts(&scope, number, later - 3_600 * SEC)
            .await
            .unwrap(),
        vec![NOW + 1_000 * SEC, later]
    );
    // Attempts older than the longest window are forgotten.
    let month_later = NOW + callgate::state::MAX_ATTEMPT_WINDOW_US + 3_600 * SEC + 2;
    store.purge_attempts(month_later).await.unwrap();
    assert_eq!(
        store.take_attempt(&acme, "r9", month_later).await.unwrap(),
        AttemptOutcome::Taken
    );
    assert_eq!(
        store.attempts(&scope, number, 0).await.unwrap(),
        vec![month_later]
    );
}

pub async fn concurrent_attempts_never_exceed_a_cap(b: &impl Backend) {
    let store = b.open();
    // Two limits: 5 an hour and 3 a day; the stricter holds.
    let cap = AttemptCap {
        scope: AttemptScope::Account,
        phone_number: "+14155550199".into(),
        limits: vec![
            AttemptLimit {
                max: 5,
                window: 3_600 * SEC,
            },
            AttemptLimit {
                max: 3,
                window: 24 * 3_600 * SEC,
            },
        ],
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (store, cap) = (store.clone(), cap.clone());
        tasks.push(tokio::spawn(async move {
            store
                .take_attempt(&cap, &format!("r{i}"), NOW)
                .await
                .unwrap()
        }));
    }
    let mut taken = 0;
    for t in tasks {
        if t.await.unwrap() == AttemptOutcome::Taken {
            taken += 1;
        }
    }
    assert_eq!(taken, 3);
    // A day after, the 24-hour limit frees; the refusal said when.
    let refused = store
        .take_attempt(&cap, "late", NOW + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        refused,
        AttemptOutcome::Exceeded {
            retry_at: NOW + 24 * 3_600 * SEC,
            limit: 1
        }
    );
    let next_day = NOW + 24 * 3_600 * SEC + 1;
    assert_eq!(
        store.take_attempt(&cap, "next", next_day).await.unwrap(),
        AttemptOutcome::Taken
    );
}

pub async fn consents_are_kept_after_revocation(b: &impl Backend) {
    let record = |id: &str, tenant: &str, number: &str| ConsentRecord {
        id: id.into(),
        tenant: tenant.into(),
        phone_number: number.into(),
        scope: "marketing".into(),
        captured_at: NOW - 86_400 * SEC,
        source: "web form".into(),
        seller: "Acme".into(),
        text: Some("I agree to AI-voice calls".into()),
        text_sha256: "ab".repeat(32),
        created_at: NOW,
        revoked_at: None,
        revoked_by: None,
    };
    {
        let store = b.open();
        for (id, tenant, number) in [
            ("k1", "a", "+14155550123"),
            ("k2", "b", "+14155550123"),
            ("k3", "a", "+14155550199"),
        ] {
            store.add_consent(record(id, tenant, number)).await.unwrap();
        }
        assert_eq!(
            store.get_consent("k1").await.unwrap(),
            Some(record("k1", "a", "+14155550123"))
        );
        assert_eq!(store.get_consent("nope").await.unwrap(), None);
        store.flush().await.unwrap();
    }
    let store = b.open();
    // Revoked once; the record stays, with when and by whom.
    let revoked = store
        .revoke_consent("k3", NOW + SEC, "tenant")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (revoked.revoked_at, revoked.revoked_by.as_deref()),
        (Some(NOW + SEC), Some("tenant"))
    );
    let again = store
        .revoke_consent("k3", NOW + 2 * SEC, "admin")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.revoked_at, Some(NOW + SEC));
    assert_eq!(
        store.revoke_consent("nope", NOW, "tenant").await.unwrap(),
        None
    );
    // By number: one tenant's, then everyone's.
    let ids = |records: Vec<ConsentRecord>| records.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let revoked = store
        .revoke_consents_for("+14155550123", Some("b"), NOW + 3 * SEC, "opt_out")
        .await
        .unwrap();
    assert_eq!(revoked[0].revoked_at, Some(NOW + 3 * SEC));
    assert_eq!(ids(revoked), ["k2"]);
    let revoked = store
        .revoke_consents_for("+14155550123", None, NOW + 4 * SEC, "opt_out")
        .await
        .unwrap();
    assert_eq!(ids(revoked), ["k1"]);
    let k1 = store.get_consent("k1").await.unwrap().unwrap();
    assert_eq!(
        (k1.revoked_at, k1.revoked_by.as_deref()),
        (Some(NOW + 4 * SEC), Some("opt_out"))
    );
    assert_eq!(k1.text.as_deref(), Some("I agree to AI-voice calls"));
}

pub async fn suspensions_are_kept_until_lifted(b: &impl Backend) {
    let la = Suspension {
        region: "US-LA".into(),
        until: NOW + 3_600 * SEC,
        reason: "hurricane".into(),
        created_at: NOW,
    };
    {
        let store = b.open();
        assert!(store.suspensions().await.unwrap().is_empty());
        store.suspend(la.clone()).await.unwrap();
        // A second suspension of a region replaces the first.
        let longer = Suspension {
            until: NOW + 7_200 * SEC,
            ..la.clone()
        };
        store.suspend(longer.clone()).await.unwrap();
        store
            .suspend(Suspension {
                region: "AU".into(),
                ..la.clone()
            })
            .await
            .unwrap();
        let all = store.suspensions().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], longer);
        store.flush().await.unwrap();
    }
    let store = b.open();
    assert_eq!(store.suspensions().await.unwrap().len(), 2);
    assert!(store.lift_suspension("US-LA").await.unwrap());
    assert!(!store.lift_suspension("US-LA").await.unwrap());
    assert_eq!(store.suspensions().await.unwrap()[0].region, "AU");
}

#[macro_export]
macro_rules! conformance_suite {
    ($backend:expr) => {
        $crate::conformance_suite!(@cases $backend;
            tenant_slots_are_exact_and_a_refusal_takes_nothing,
            the_account_cap_spans_tenants,
            holds_and_spend_count_against_the_budget,
            a_release_frees_everything_and_charges_nothing,
            a_call_is_settled_once,
            a_late_bind_never_revives_a_settled_call,
            a_lapsed_lease_is_charged_the_full_hold,
            events_for_another_call_are_refused,
            reconciliation_settles_from_the_upstreams_view,
            a_budget_starts_afresh_each_period,
            concurrent_admissions_never_exceed_a_limit,
            the_counters_survive_a_restart,
            an_event_recovers_a_lost_bind,
            an_upstream_id_names_one_call_and_a_call_keeps_its_id,
            reads_are_per_tenant_and_paged,
            idempotency_keys_answer_once,
            issued_relay_tokens_find_their_call,
            free_calls_and_a_budget_made_fixed,
            an_operator_releases_a_stuck_call_and_tops_up_a_budget,
            opt_outs_are_kept_per_scope_and_survive_a_restart,
            attempts_are_capped_in_a_rolling_window,
            concurrent_attempts_never_exceed_a_cap,
            consents_are_kept_after_revocation,
            suspensions_are_kept_until_lifted,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $backend;
                conformance::$case(&backend).await;
            }
        )*
    };
}
