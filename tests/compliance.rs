//! Compliance evidence: attempt caps, opt-outs that stop every tenant's next call, operators'
//! do-not-call entries, and the dry run; each refusal shown to reach nothing upstream and to be
//! in the audit trail, and each to hold after a restart.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use callgate::clock::{ManualClock, SharedClock};
use callgate::config::Settings;
use callgate::server::Gateway;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const ADMIN: &str = "admin-token-for-tests";
const NUMBER: &str = "+14155550123";

/// A gateway on a private copy of the policies and a state file of its own, restartable on the
/// same files.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(tenants: &[(&str, String)], extra_policy_files: &[(&str, &str)]) -> Setup {
        Self::with_talk(tenants, extra_policy_files, 50)
    }

    /// With the simulator's calls lasting `talk_ms`.
    fn with_talk(
        tenants: &[(&str, String)],
        extra_policy_files: &[(&str, &str)],
        talk_ms: u64,
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let policies = copy_policies(dir.path());
        for (name, text) in tenants {
            std::fs::write(policies.join("tenants").join(name), text).unwrap();
        }
        for (name, text) in extra_policy_files {
            std::fs::write(policies.join(name), text).unwrap();
        }
        let extra = format!(
            "[simulator]\nqueue_ms = 20\nring_ms = 20\ntalk_ms = {talk_ms}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN}\"\n\
             [audit]\npath = \"{}\"\n",
            dir.path().join("audit.jsonl").display(),
        );
        let text = config_text(&simulator_upstream(), &extra).replace(
            &repo().join("policies").display().to_string(),
            &policies.display().to_string(),
        );
        let config = dir.path().join("callgate.toml");
        std::fs::write(&config, text).unwrap();
        Setup { dir, config }
    }

    async fn start(&self, clock: &Arc<ManualClock>) -> Gateway {
        let settings = Settings::load_with_env(&self.config, Vec::new()).unwrap();
        let shared: SharedClock = clock.clone();
        Gateway::start_with(settings, shared, None).await.unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn clock() -> Arc<ManualClock> {
    ManualClock::new(MONDAY_NOON_NY.parse().unwrap())
}

async fn call(gw: &Gateway, key: &str, body: &Value) -> Answer {
    let auth = format!("Bearer {key}");
    send(
        &http_client(),
        gw.addr(),
        Method::POST,
        "/v1/calls",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
}

async fn tenant_post(gw: &Gateway, key: &str, path: &str, body: &Value) -> Answer {
    let auth = format!("Bearer {key}");
    send(
        &http_client(),
        gw.addr(),
        Method::POST,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
}

async fn admin(gw: &Gateway, method: Method, path: &str, body: &Value) -> Answer {
    let addr: SocketAddr = gw.admin_addr().unwrap();
    let auth = format!("Bearer {ADMIN}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    send(
        &http_client(),
        addr,
        method,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

fn placed(gw: &Gateway) -> usize {
    gw.simulator().unwrap().received_calls().len()
}

fn acme_call(number: &str) -> Value {
    json!({"phone_number": number, "agent_id": "agent_abc123"})
}

fn globex_call(number: &str) -> Value {
    json!({"phone_number": number, "agent_id": "agent_support", "metadata": {"ticket_id": "T-1"}})
}

/// The audit decision lines with this code.
fn decisions_with(lines: &[Value], code: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "decision" && l["code"] == code)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_caps_refuse_the_next_call_until_the_window_rolls() {
    let capped = tenant_file(
        "capped",
        "capped-key",
        "[attempts]\nmax_calls = 2\nwindow_secs = 3600\n",
    );
    let setup = Setup::new(&[("capped.toml", capped)], &[]);
    let clock = clock();
    let gw = setup.start(&clock).await;
    for _ in 0..2 {
        let ok = call(&gw, "capped-key", &acme_call(NUMBER)).await;
        assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json());
        clock.advance(Duration::from_secs(300));
    }
    let refused = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.code(), "attempt_limit_exceeded");
    assert_eq!(refused.param(), "/phone_number");
    // The first attempt leaves the window 50 minutes from now.
    assert_eq!(refused.headers["retry-after"], "3000");
    assert_eq!(placed(&gw), 2, "the refused call reached the upstream");
    let request_id = refused.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    // Another number is not capped.
    let other = call(&gw, "capped-key", &acme_call("+14155550124")).await;
    assert_eq!(other.status, StatusCode::OK);
    let lines = setup.audit();
    let line = &decisions_with(&lines, "attempt_limit_exceeded")[0];
    assert_eq!(line["request_id"], request_id.as_str());
    assert_eq!(line["stage"], "admission");
    assert_eq!(line["rule"], "attempts");
    assert_eq!(line["tenant"], "capped");
    assert!(!line.to_string().contains(NUMBER), "{line}");
    gw.shutdown().await;

    // After a restart the attempts still count.
    let gw = setup.start(&clock).await;
    let refused = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(refused.code(), "attempt_limit_exceeded", "{:?}", refused);
    assert_eq!(placed(&gw), 0);
    // An hour after the first call, one more may go.
    clock.advance(Duration::from_secs(3_000));
    let ok = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json());
    let refused = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(refused.code(), "attempt_limit_exceeded");
    gw.shutdown().await;
    callgate::audit::verify(&setup.dir.path().join("audit.jsonl")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_scope_counts_every_tenants_calls_and_defaults_apply() {
    // `one` and `two` inherit the shared default: 1 call a day to a person, across tenants;
    // `free` has a cap of its own per tenant, yet its calls count for the others.
    let defaults = "[attempts]\nmax_calls = 1\nwindow_secs = 86400\nscope = \"account\"\n";
    let own_cap = "[attempts]\nmax_calls = 5\nwindow_secs = 60\n";
    let setup = Setup::new(
        &[
            ("one.toml", tenant_file("one", "one-key", "")),
            ("two.toml", tenant_file("two", "two-key", "")),
            ("free.toml", tenant_file("free", "free-key", own_cap)),
        ],
        &[("defaults.toml", defaults)],
    );
    let clock = clock();
    let gw = setup.start(&clock).await;
    assert_eq!(
        call(&gw, "one-key", &acme_call(NUMBER)).await.status,
        StatusCode::OK
    );
    let refused = call(&gw, "two-key", &acme_call(NUMBER)).await;
    assert_eq!(refused.code(), "attempt_limit_exceeded");
    assert_eq!(placed(&gw), 1);
    let lines = setup.audit();
    assert_eq!(
        decisions_with(&lines, "attempt_limit_exceeded")[0]["rule"],
        "defaults/attempts"
    );
    // A call by `free` to another person is recorded in the account scope: `one` may not
    // call that person today either.
    let other = "+14155550124";
    assert_eq!(
        call(&gw, "free-key", &acme_call(other)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&gw, "one-key", &acme_call(other)).await.code(),
        "attempt_limit_exceeded"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_by_admission_gives_its_attempt_back() {
    // One slot, and calls that last a minute: the second call is refused for concurrency, and
    // must not use up its attempt.
    let capped = tenant_file(
        "capped",
        "capped-key",
        "[attempts]\nmax_calls = 1\nwindow_secs = 3600\n[limits]\nmax_concurrent_calls = 1\n",
    );
    let setup = Setup::with_talk(&[("capped.toml", capped)], &[], 60_000);
    let clock = clock();
    let gw = setup.start(&clock).await;
    let first = call(&gw, "capped-key", &acme_call("+14155550124")).await;
    assert_eq!(first.status, StatusCode::OK);
    let refused = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(refused.code(), "rate_limit_exceeded");
    // The operator ends the first call; the slot is free, and the attempt is still there.
    let call_id = first.json()["id"].as_str().unwrap().to_string();
    let released = admin(
        &gw,
        Method::POST,
        &format!("/admin/calls/{call_id}/release"),
        &json!({"tenant": "capped", "charge": 0, "reason": "test"}),
    )
    .await;
    assert_eq!(released.status, StatusCode::OK, "{:?}", released.json());
    let ok = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json());
    assert_eq!(
        call(&gw, "capped-key", &acme_call(NUMBER)).await.code(),
        "attempt_limit_exceeded"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_from_one_tenant_stops_every_tenants_next_call() {
    let setup = Setup::new(&[], &[]);
    let clock = clock();
    let gw = setup.start(&clock).await;
    // Bad input changes nothing.
    let bad = tenant_post(
        &gw,
        ACME_KEY,
        "/v1/do-not-call",
        &json!({"phone_number": "+1415"}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.code(), "invalid_phone_number");
    let bad = tenant_post(&gw, ACME_KEY, "/v1/do-not-call", &json!({"number": NUMBER})).await;
    assert_eq!(bad.code(), "invalid_request");
    let unknown = tenant_post(
        &gw,
        "nope",
        "/v1/do-not-call",
        &json!({"phone_number": NUMBER}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(setup.audit().iter().all(|l| l["type"] != "opt_out"));

    let recorded = tenant_post(
        &gw,
        ACME_KEY,
        "/v1/do-not-call",
        &json!({"phone_number": NUMBER}),
    )
    .await;
    assert_eq!(recorded.status, StatusCode::CREATED);
    assert_eq!(recorded.json()["scope"], "shared");
    assert_eq!(recorded.json()["source"], "tenant:acme");
    let again = tenant_post(
        &gw,
        GLOBEX_KEY,
        "/v1/do-not-call",
        &json!({"phone_number": NUMBER}),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    // Recorded before by another tenant: its source is not shown.
    assert_eq!(again.json()["source"], Value::Null);
    // Tenants cannot remove an entry.
    let auth = format!("Bearer {ACME_KEY}");
    let removal = send(
        &http_client(),
        gw.addr(),
        Method::DELETE,
        "/v1/do-not-call",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(removal.status, StatusCode::METHOD_NOT_ALLOWED);

    for (key, body) in [
        (GLOBEX_KEY, globex_call(NUMBER)),
        (ACME_KEY, acme_call(NUMBER)),
    ] {
        let refused = call(&gw, key, &body).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.code(), "do_not_call");
    }
    assert_eq!(placed(&gw), 0);
    let lines = setup.audit();
    let opt_out = lines.iter().find(|l| l["type"] == "opt_out").unwrap();
    assert_eq!(opt_out["source"], "tenant:acme");
    assert_eq!(opt_out["scope"], "shared");
    assert_eq!(opt_out["changed"], true);
    assert!(!opt_out.to_string().contains(NUMBER), "{opt_out}");
    let refusals = decisions_with(&lines, "do_not_call");
    assert_eq!(refusals.len(), 2);
    assert!(
        refusals
            .iter()
            .all(|l| l["rule"] == "do_not_call.opt_out" && l["stage"] == "admission")
    );
    gw.shutdown().await;

    let gw = setup.start(&clock).await;
    assert_eq!(
        call(&gw, GLOBEX_KEY, &globex_call(NUMBER)).await.code(),
        "do_not_call"
    );
    assert_eq!(placed(&gw), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_add_look_up_and_remove_entries() {
    let setup = Setup::new(&[], &[]);
    let clock = clock();
    let gw = setup.start(&clock).await;
    let added = admin(
        &gw,
        Method::POST,
        "/admin/do-not-call",
        &json!({"phone_number": NUMBER, "tenant": "acme", "reason": "complaint 4411"}),
    )
    .await;
    assert_eq!(added.status, StatusCode::CREATED, "{:?}", added.json());
    assert_eq!(added.json()["scope"], "tenant");
    let unknown = admin(
        &gw,
        Method::POST,
        "/admin/do-not-call",
        &json!({"phone_number": NUMBER, "tenant": "nobody"}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    // Acme may not call the number; Globex still may.
    let refused = call(&gw, ACME_KEY, &acme_call(NUMBER)).await;
    assert_eq!(refused.code(), "do_not_call");
    assert_eq!(placed(&gw), 0);
    let allowed = call(&gw, GLOBEX_KEY, &globex_call(NUMBER)).await;
    assert_eq!(allowed.status, StatusCode::OK, "{:?}", allowed.json());
    // The entry survives a restart.
    gw.shutdown().await;
    let gw = setup.start(&clock).await;
    assert_eq!(
        call(&gw, ACME_KEY, &acme_call(NUMBER)).await.code(),
        "do_not_call"
    );

    let found = admin(
        &gw,
        Method::GET,
        &format!("/admin/do-not-call/{NUMBER}"),
        &Value::Null,
    )
    .await
    .json();
    assert_eq!(found["entries"][0]["tenant"], "acme");
    assert_eq!(found["entries"][0]["source"], "admin: complaint 4411");
    let listed = admin(
        &gw,
        Method::GET,
        "/admin/do-not-call/+14155550100",
        &Value::Null,
    )
    .await
    .json();
    assert_eq!(listed["listed_for_tenants"], json!(["acme", "globex"]));

    let path = format!("/admin/do-not-call/{NUMBER}?tenant=acme");
    let removed = admin(&gw, Method::DELETE, &path, &Value::Null).await;
    assert_eq!(removed.status, StatusCode::OK);
    assert_eq!(
        admin(&gw, Method::DELETE, &path, &Value::Null).await.status,
        StatusCode::NOT_FOUND
    );
    let allowed = call(&gw, ACME_KEY, &acme_call(NUMBER)).await;
    assert_eq!(allowed.status, StatusCode::OK, "{:?}", allowed.json());

    let lines = setup.audit();
    let entries: Vec<&Value> = lines.iter().filter(|l| l["type"] == "opt_out").collect();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0]["action"], "add");
    assert_eq!(entries[0]["tenant"], "acme");
    assert_eq!(entries[1]["action"], "remove");
    assert_eq!(entries[1]["changed"], true);
    assert_eq!(entries[2]["changed"], false);
    let refusals = decisions_with(&lines, "do_not_call");
    assert_eq!(refusals.len(), 2);
    assert!(
        refusals
            .iter()
            .all(|l| l["rule"] == "do_not_call.tenant_entry")
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_on_the_admin_api_consumes_nothing() {
    let capped = tenant_file(
        "capped",
        "capped-key",
        "[attempts]\nmax_calls = 1\nwindow_secs = 3600\n\
         [limits]\nmax_concurrent_calls = 1\nrequests_per_minute = 2\nburst = 1\n\
         [budget]\ncredits = 100\n",
    );
    let setup = Setup::new(&[("capped.toml", capped)], &[]);
    let clock = clock();
    let gw = setup.start(&clock).await;
    let dry = |at: Option<&str>| {
        let path = match at {
            Some(at) => format!("/admin/check-request?tenant=capped&at={at}"),
            None => "/admin/check-request?tenant=capped".to_string(),
        };
        let gw = &gw;
        async move { admin(gw, Method::POST, &path, &acme_call(NUMBER)).await }
    };
    // Far more dry runs than the rate, the slot, the budget or the cap would allow.
    for _ in 0..10 {
        let verdict = dry(None).await;
        assert_eq!(verdict.status, StatusCode::OK);
        assert_eq!(
            verdict.json()["decision"],
            "allowed",
            "{:?}",
            verdict.json()
        );
    }
    let usage = gw.usage("capped").await.unwrap();
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 0));
    assert_eq!(placed(&gw), 0);
    // The real call still has its rate, its slot and its attempt.
    let ok = call(&gw, "capped-key", &acme_call(NUMBER)).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json());
    // Now the cap is reached: the dry run says so, and until when.
    let verdict = dry(None).await.json();
    assert_eq!(verdict["decision"], "denied");
    assert_eq!(verdict["code"], "attempt_limit_exceeded");
    assert_eq!(verdict["rule"], "attempts");
    assert_eq!(verdict["retry_at"], "2026-01-05T18:00:00Z");
    // An hour later it would be allowed (once the call has ended and freed its slot).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.usage("capped").await.unwrap().slots > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let later = dry(Some("2026-01-05T18:00:01Z")).await.json();
    assert_eq!(later["decision"], "allowed", "{later}");
    let missing = admin(
        &gw,
        Method::POST,
        "/admin/check-request",
        &acme_call(NUMBER),
    )
    .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let bad_at = dry(Some("yesterday")).await;
    assert_eq!(bad_at.code(), "invalid_request");
    gw.shutdown().await;
}

fn callgate_cmd(config: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callgate"));
    cmd.env_remove("CALLGATE_CONFIG");
    cmd.args(["check-request", "--config"]).arg(config);
    cmd
}

fn check_request(config: &Path, tenant: &str, body: &Value, at: &str) -> (i32, Value) {
    let body_path = config.with_file_name("body.json");
    std::fs::write(&body_path, body.to_string()).unwrap();
    let out = callgate_cmd(config)
        .args(["--tenant", tenant, "--body"])
        .arg(&body_path)
        .args(["--at", at])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), verdict)
}

#[test]
fn check_request_judges_calling_hours_across_zones_without_a_state_file() {
    let regulated = format!(
        "packs = [\"us-federal\", \"us-states\"]\n{}",
        tenant_file("regulated", "regulated-key", "")
    );
    let setup = Setup::new(&[("regulated.toml", regulated)], &[]);
    let config = &setup.config;
    // Monday 16:30 UTC: 11:30 in New York, 08:30 in Los Angeles.
    let at = "2026-01-05T16:30:00Z";
    let (code, ny) = check_request(config, "globex", &globex_call("+12125550123"), at);
    assert_eq!(code, 0, "{ny}");
    assert_eq!(ny["decision"], "allowed");
    assert_eq!(ny["stages"].as_array().unwrap().len(), 6);
    assert!(
        ny["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["verdict"] == "passed")
    );
    let (code, la) = check_request(config, "globex", &globex_call("+14155550123"), at);
    assert_eq!(code, 1, "{la}");
    assert_eq!(la["decision"], "denied");
    assert_eq!(la["code"], "outside_calling_hours");
    assert_eq!(la["stage"], "phone");
    assert_eq!(la["rule"], "hours");
    assert_eq!(la["next_allowed_at"], "2026-01-05T17:00:00Z");
    let stages = la["stages"].as_array().unwrap();
    assert_eq!(stages[2]["verdict"], "denied");
    assert_eq!(stages[5]["verdict"], "not_evaluated");
    // An offset is as good as Z; Saturday waits for Monday.
    let (_, saturday) = check_request(
        config,
        "globex",
        &globex_call("+12125550123"),
        "2026-01-10T12:00:00-05:00",
    );
    assert_eq!(saturday["next_allowed_at"], "2026-01-12T14:00:00Z");
    // A pack's rule: no calls on Christmas in Alabama; the next chance is 08:00 the day after.
    let (code, christmas) = check_request(
        config,
        "regulated",
        &acme_call("+12055550123"),
        "2026-12-25T18:00:00Z",
    );
    assert_eq!(code, 1, "{christmas}");
    assert_eq!(christmas["rule"], "us-states/AL holidays");
    assert_eq!(christmas["next_allowed_at"], "2026-12-26T14:00:00Z");
    // The shared list, and a malformed body.
    let (code, listed) = check_request(config, "acme", &acme_call("+14155550100"), at);
    assert_eq!(
        (code, listed["rule"].as_str()),
        (1, Some("destinations.do_not_call"))
    );
    let (code, invalid) = check_request(config, "acme", &json!({"phone_number": ""}), at);
    assert_eq!((code, invalid["stage"].as_str()), (1, Some("validate")));
    // The state file was not created.
    assert!(!setup.dir.path().join("state").exists());

    // Usage and configuration errors exit 2.
    let (code, _) = check_request(config, "nobody", &acme_call(NUMBER), at);
    assert_eq!(code, 2);
    let (code, _) = check_request(config, "acme", &acme_call(NUMBER), "noon");
    assert_eq!(code, 2);
    let out = callgate_cmd(Path::new("/nonexistent/callgate.toml"))
        .args(["--tenant", "acme", "--body", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_request_reads_a_running_gateways_state_without_changing_it() {
    let capped = tenant_file(
        "capped",
        "capped-key",
        "[attempts]\nmax_calls = 1\nwindow_secs = 3600\n",
    );
    let setup = Setup::new(&[("capped.toml", capped)], &[]);
    let clock = clock();
    let gw = setup.start(&clock).await;
    let recorded = tenant_post(
        &gw,
        ACME_KEY,
        "/v1/do-not-call",
        &json!({"phone_number": "+14155550199"}),
    )
    .await;
    assert_eq!(recorded.status, StatusCode::CREATED);
    assert_eq!(
        call(&gw, "capped-key", &acme_call(NUMBER)).await.status,
        StatusCode::OK
    );
    let config = setup.config.clone();
    let (code, opted) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            check_request(
                &config,
                "globex",
                &globex_call("+14155550199"),
                MONDAY_NOON_NY,
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{opted}");
    assert_eq!(opted["rule"], "do_not_call.opt_out");
    assert_eq!(opted["opt_out"]["source"], "tenant:acme");
    let (code, capped) = tokio::task::spawn_blocking(move || {
        check_request(&config, "capped", &acme_call(NUMBER), MONDAY_NOON_NY)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{capped}");
    assert_eq!(capped["code"], "attempt_limit_exceeded");
    // The gateway carries on, its state untouched.
    assert_eq!(
        call(&gw, ACME_KEY, &acme_call("+14155550124")).await.status,
        StatusCode::OK
    );
    gw.shutdown().await;
}

fn consent_call(number: &str, consent_id: &str) -> Value {
    json!({"phone_number": number, "agent_id": "agent_abc123", "metadata": {"consent_id": consent_id}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_records_serve_their_own_tenant_number_and_scope_until_revoked() {
    let policy = "[consent]\nrequired = true\nscopes = [\"marketing\"]\nmax_age_days = 365\n";
    let setup = Setup::new(
        &[
            ("ai.toml", tenant_file("ai", "ai-key", policy)),
            ("other.toml", tenant_file("other", "other-key", policy)),
        ],
        &[],
    );
    let clock = clock();
    let gw = setup.start(&clock).await;
    let register = |key: &'static str, body: Value| {
        let gw = &gw;
        async move { tenant_post(gw, key, "/v1/consents", &body).await }
    };
    let consent = |number: &str, scope: &str, captured_at: &str| {
        json!({"phone_number": number, "scope": scope, "captured_at": captured_at,
               "source": "web form 12", "seller": "Acme Inc.", "text": "I agree to calls by an AI agent."})
    };
    // No consent cited.
    let refused = call(&gw, "ai-key", &acme_call(NUMBER)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "consent_required");
    // Bad records change nothing.
    for (body, code) in [
        (
            consent("+1415", "marketing", "2026-01-01T00:00:00Z"),
            "invalid_phone_number",
        ),
        (
            consent(NUMBER, "marketing", "2027-01-01T00:00:00Z"),
            "invalid_request",
        ),
        (
            consent(NUMBER, "", "2026-01-01T00:00:00Z"),
            "invalid_request",
        ),
        (
            json!({"phone_number": NUMBER, "scope": "marketing", "captured_at": "2026-01-01T00:00:00Z",
                   "source": "s", "seller": "s", "text": "x", "text_sha256": "ab"}),
            "invalid_request",
        ),
    ] {
        let answer = register("ai-key", body).await;
        assert_eq!(answer.code(), code, "{:?}", answer.json());
    }
    let created = register(
        "ai-key",
        consent(NUMBER, "marketing", "2026-01-02T10:00:00Z"),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.json());
    let id = created.json()["id"].as_str().unwrap().to_string();
    assert_eq!(created.json()["status"], "active");
    assert_eq!(created.json()["text_sha256"].as_str().unwrap().len(), 64);

    let ok = call(&gw, "ai-key", &consent_call(NUMBER, &id)).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json());
    // Another tenant cannot cite it, nor read it; it serves this number only.
    let theirs = call(&gw, "other-key", &consent_call(NUMBER, &id)).await;
    assert_eq!(theirs.code(), "consent_invalid");
    assert!(
        theirs.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another tenant")
    );
    let auth = "Bearer other-key".to_string();
    let read = send(
        &http_client(),
        gw.addr(),
        Method::GET,
        &format!("/v1/consents/{id}"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(read.status, StatusCode::NOT_FOUND);
    let elsewhere = call(&gw, "ai-key", &consent_call("+14155550124", &id)).await;
    assert_eq!(elsewhere.code(), "consent_invalid");
    let unknown = call(&gw, "ai-key", &consent_call(NUMBER, "cns_nope")).await;
    assert_eq!(unknown.code(), "consent_invalid");
    // Another scope, or too old.
    let info = register(
        "ai-key",
        consent(NUMBER, "informational", "2026-01-02T10:00:00Z"),
    )
    .await;
    let info_id = info.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        call(&gw, "ai-key", &consent_call(NUMBER, &info_id))
            .await
            .code(),
        "consent_invalid"
    );
    let old = register(
        "ai-key",
        consent(NUMBER, "marketing", "2024-06-01T10:00:00Z"),
    )
    .await;
    let old_id = old.json()["id"].as_str().unwrap().to_string();
    let too_old = call(&gw, "ai-key", &consent_call(NUMBER, &old_id)).await;
    assert!(
        too_old.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("365 days")
    );

    // The tenant revokes a second record; it is kept, and no longer serves.
    let second = register(
        "ai-key",
        consent("+14155550124", "marketing", "2026-01-02T10:00:00Z"),
    )
    .await;
    let second_id = second.json()["id"].as_str().unwrap().to_string();
    let auth = "Bearer ai-key".to_string();
    let revoked = send(
        &http_client(),
        gw.addr(),
        Method::DELETE,
        &format!("/v1/consents/{second_id}"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.json()["status"], "revoked");
    assert_eq!(revoked.json()["revoked_by"], "tenant");
    assert_eq!(
        call(&gw, "ai-key", &consent_call("+14155550124", &second_id))
            .await
            .code(),
        "consent_invalid"
    );

    // An opt-out (by any tenant) revokes the number's records.
    let opted = tenant_post(
        &gw,
        "other-key",
        "/v1/do-not-call",
        &json!({"phone_number": NUMBER}),
    )
    .await;
    assert_eq!(opted.status, StatusCode::CREATED);
    let read = send(
        &http_client(),
        gw.addr(),
        Method::GET,
        &format!("/v1/consents/{id}"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(read.json()["status"], "revoked");
    assert_eq!(read.json()["revoked_by"], "opt_out");
    // Even once an operator lifts the opt-out, the revoked consent does not serve.
    let lifted = admin(
        &gw,
        Method::DELETE,
        &format!("/admin/do-not-call/{NUMBER}"),
        &Value::Null,
    )
    .await;
    assert_eq!(lifted.status, StatusCode::OK);
    let after = call(&gw, "ai-key", &consent_call(NUMBER, &id)).await;
    assert_eq!(after.code(), "consent_invalid");
    assert!(
        after.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("opt_out")
    );

    assert_eq!(
        placed(&gw),
        1,
        "only the call with a valid consent reached the upstream"
    );
    let lines = setup.audit();
    let allowed = lines
        .iter()
        .find(|l| l["type"] == "decision" && l["decision"] == "allowed")
        .unwrap();
    assert_eq!(allowed["consent_id"], id.as_str());
    let consent_lines: Vec<(&str, Option<&str>)> = lines
        .iter()
        .filter(|l| l["type"] == "consent" && l["consent_id"] == id.as_str())
        .map(|l| (l["action"].as_str().unwrap(), l["by"].as_str()))
        .collect();
    assert_eq!(
        consent_lines,
        [("registered", None), ("revoked", Some("opt_out"))]
    );
    let refusals = decisions_with(&lines, "consent_invalid");
    assert!(refusals.iter().all(|l| l["rule"] == "consent.invalid"));
    gw.shutdown().await;

    // After a restart, the records and their revocations are as they were.
    let gw = setup.start(&clock).await;
    assert_eq!(
        call(&gw, "ai-key", &consent_call(NUMBER, &id)).await.code(),
        "consent_invalid"
    );
    assert_eq!(placed(&gw), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_suspends_calls_to_a_region_until_a_time() {
    let setup = Setup::new(&[], &[]);
    let clock = clock();
    let gw = setup.start(&clock).await;
    let louisiana = "+15045550123";
    for (body, param) in [
        (
            json!({"region": "Louisiana", "until": "2026-01-06T00:00:00Z", "reason": "storm"}),
            "/region",
        ),
        (
            json!({"region": "US-LA", "until": "2026-01-01T00:00:00Z", "reason": "storm"}),
            "/until",
        ),
        (
            json!({"region": "US-LA", "until": "2026-01-06T00:00:00Z", "reason": " "}),
            "/reason",
        ),
    ] {
        let refused = admin(&gw, Method::POST, "/admin/suspensions", &body).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(refused.param(), param);
    }
    let suspended = admin(
        &gw,
        Method::POST,
        "/admin/suspensions",
        &json!({"region": "US-LA", "until": "2026-01-05T18:00:00Z", "reason": "declared emergency: hurricane"}),
    )
    .await;
    assert_eq!(
        suspended.status,
        StatusCode::CREATED,
        "{:?}",
        suspended.json()
    );
    let refused = call(&gw, ACME_KEY, &acme_call(louisiana)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "destination_not_allowed");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hurricane")
    );
    assert_eq!(placed(&gw), 0);
    // Elsewhere calls go on.
    assert_eq!(
        call(&gw, ACME_KEY, &acme_call(NUMBER)).await.status,
        StatusCode::OK
    );
    // The dry run says so; an hour later the suspension has lapsed.
    let dry = admin(
        &gw,
        Method::POST,
        "/admin/check-request?tenant=acme",
        &acme_call(louisiana),
    )
    .await
    .json();
    assert_eq!(dry["rule"], "suspension US-LA");
    assert_eq!(dry["suspended_until"], "2026-01-05T18:00:00Z");
    let listed = admin(&gw, Method::GET, "/admin/suspensions", &Value::Null)
        .await
        .json();
    assert_eq!(listed["data"][0]["region"], "US-LA");
    assert_eq!(listed["data"][0]["active"], true);
    clock.advance(Duration::from_secs(3_601));
    assert_eq!(
        call(&gw, ACME_KEY, &acme_call(louisiana)).await.status,
        StatusCode::OK
    );
    let lifted = admin(
        &gw,
        Method::DELETE,
        "/admin/suspensions/US-LA",
        &Value::Null,
    )
    .await;
    assert_eq!(lifted.status, StatusCode::OK);
    assert_eq!(
        admin(
            &gw,
            Method::DELETE,
            "/admin/suspensions/US-LA",
            &Value::Null
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let lines = setup.audit();
    let actions: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "suspension")
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["suspended", "lifted"]);
    let refusal = &decisions_with(&lines, "destination_not_allowed")[0];
    assert_eq!(refusal["rule"], "suspension US-LA");
    gw.shutdown().await;
}
