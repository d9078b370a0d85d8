//! Several gateway processes on one Redis (`state.backend = "redis"`), each test with its own
//! `redis-server`: limits, budgets and rates hold across replicas; Redis away fails closed and
//! recovers without a restart; a replica killed while holding slots loses none of them.

mod redis_support;
mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callgate::config::SimulatorSettings;
use callgate::simulator::Simulator;
use callgate::state::StateStore;
use callgate::state::redis::{RedisOptions, RedisStore};
use http::{Method, StatusCode};
use redis_support::RedisServer;
use serde_json::json;
use support::*;

/// A `callgate serve` process.
struct Replica {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

const ADMIN_TOKEN: &str = "replica-admin-token";

impl Replica {
    /// A replica on `redis`, forwarding to `upstream`, with `tenants` beside the shipped
    /// policies; the upstream sends events to `relay_to` (a replica's address, `None`: its own).
    async fn start(
        redis: &RedisServer,
        upstream: &str,
        tenants: &[(&str, String)],
        relay_to: Option<SocketAddr>,
        addr: SocketAddr,
    ) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let policies = copy_policies(dir.path());
        for (name, text) in tenants {
            std::fs::write(policies.join("tenants").join(name), text).unwrap();
        }
        let relay = relay_to.unwrap_or(addr);
        let admin = free_addr();
        let extra = format!(
            "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nsweep_interval_ms = 200\n\
             [relay]\npublic_url = \"http://{relay}\"\n\
             [admission]\nlease_grace_secs = 1\n\
             [admin]\nlisten = \"{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n",
            redis.url()
        );
        let upstream = format!("url = \"{upstream}\"\napi_key = \"{ACCOUNT_KEY}\"");
        let text = config_text(&upstream, &extra).replace(
            &repo().join("policies").display().to_string(),
            &policies.display().to_string(),
        );
        let config = dir.path().join("callgate.toml");
        std::fs::write(&config, text).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_callgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("CALLGATE__SERVER__LISTEN", addr.to_string())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let replica = Replica {
            child,
            addr,
            admin,
            _dir: dir,
        };
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let request = http::Request::get(format!("http://{addr}/readyz"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(1), client.request(request)).await
                && r.status() == StatusCode::OK
            {
                break;
            }
            assert!(Instant::now() < deadline, "replica on {addr} did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replica
    }

    /// A tenant's usage as this replica's admin API answers it.
    async fn admin_usage(&self, tenant: &str) -> serde_json::Value {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let path = format!("/admin/tenants/{tenant}/usage");
        let answer = send(
            &http_client(),
            self.admin,
            Method::GET,
            &path,
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.json()
    }

    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn upstream_simulator(talk_ms: u64) -> Simulator {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let settings = SimulatorSettings {
        queue_ms: 20,
        ring_ms: 20,
        talk_ms,
        ..SimulatorSettings::default()
    };
    Simulator::spawn(listener, settings, ACCOUNT_KEY.to_string())
}

fn store(redis: &RedisServer) -> Arc<dyn StateStore> {
    Arc::new(
        RedisStore::open(RedisOptions {
            url: redis.url(),
            cluster: false,
            prefix: "callgate".into(),
            timeout: Duration::from_secs(2),
        })
        .unwrap(),
    )
}

fn now() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

async fn post_call(addr: SocketAddr, key: &str, max_duration: u32) -> Answer {
    let body = json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": max_duration});
    let auth = format!("Bearer {key}");
    send(
        &http_client(),
        addr,
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

/// `n` calls at once, alternating between the replicas.
async fn burst(replicas: &[&Replica], key: &str, n: usize) -> Vec<Answer> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (addr, key) = (replicas[i % replicas.len()].addr, key.to_string());
            tokio::spawn(async move { post_call(addr, &key, 120).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

fn count(answers: &[Answer], status: StatusCode) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

/// Wait until `check` holds for the tenant's usage, or fail with the last usage seen.
async fn wait_usage(
    store: &Arc<dyn StateStore>,
    tenant: &str,
    within: Duration,
    check: impl Fn(&callgate::state::Usage) -> bool,
) -> callgate::state::Usage {
    let deadline = Instant::now() + within;
    loop {
        let usage = store.usage(tenant, now()).await.unwrap();
        if check(&usage) {
            return usage;
        }
        assert!(
            Instant::now() < deadline,
            "{tenant}: usage stayed {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_one_limit_one_budget_and_one_rate() {
    let redis = RedisServer::start();
    let sim = upstream_simulator(60_000);
    let tenants = [
        (
            "burst.toml",
            tenant_file("burst", "key-burst", "[limits]\nmax_concurrent_calls = 7\n"),
        ),
        (
            "budget.toml",
            tenant_file(
                "budget",
                "key-budget",
                "[budget]\ncredits = 19\nperiod = \"none\"\n",
            ),
        ),
        (
            "rate.toml",
            tenant_file(
                "rate",
                "key-rate",
                "[limits]\nrequests_per_minute = 6\nburst = 5\n",
            ),
        ),
        ("t.toml", tenant_file("t", "key-t", "")),
    ];
    let a = Replica::start(&redis, &sim.url(), &tenants, None, free_addr()).await;
    let b = Replica::start(&redis, &sim.url(), &tenants, None, free_addr()).await;

    let answers = burst(&[&a, &b], "key-burst", 200).await;
    assert_eq!(count(&answers, StatusCode::OK), 7);
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 193);

    // 2 credits held per 120 s call: 9 fit in 19, on both replicas together.
    let answers = burst(&[&a, &b], "key-budget", 200).await;
    assert_eq!(count(&answers, StatusCode::OK), 9);
    assert_eq!(count(&answers, StatusCode::PAYMENT_REQUIRED), 191);

    // 6 a minute with bursts of 5: 5 in a burst, not 5 per replica.
    let answers = burst(&[&a, &b], "key-rate", 40).await;
    assert_eq!(count(&answers, StatusCode::OK), 5);
    let limited: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(limited.len(), 35);
    assert!(
        limited
            .iter()
            .all(|a| a.headers.contains_key("retry-after"))
    );

    let store = store(&redis);
    assert_eq!(store.usage("burst", now()).await.unwrap().slots, 7);
    let budget = store.usage("budget", now()).await.unwrap();
    assert_eq!((budget.slots, budget.holds), (9, 18));
    assert_eq!(sim.active_calls(), 7 + 9 + 5);
    // Whichever replica answers, the same usage.
    for tenant in ["burst", "budget", "rate"] {
        assert_eq!(a.admin_usage(tenant).await, b.admin_usage(tenant).await);
    }
    assert_eq!(a.admin_usage("budget").await["holds"], 18);

    // An idempotency key used on one replica replays on the other; a call placed through one is
    // read through the other.
    let keyed = |addr| async move {
        let body = json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"});
        send(
            &http_client(),
            addr,
            Method::POST,
            "/v1/calls",
            &[
                ("authorization", "Bearer key-t"),
                ("content-type", "application/json"),
                ("idempotency-key", "order-1"),
            ],
            body.to_string(),
        )
        .await
    };
    let first = keyed(a.addr).await;
    assert_eq!(first.status, StatusCode::OK);
    let again = keyed(b.addr).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, first.body);
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let id = first.json()["id"].as_str().unwrap().to_string();
    let read = send(
        &http_client(),
        b.addr,
        Method::GET,
        &format!("/v1/calls/{id}"),
        &[("authorization", "Bearer key-t")],
        "",
    )
    .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json()["id"], id.as_str());
    store.check_consistency(now()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_load_fails_closed_and_the_gateway_recovers() {
    let mut redis = RedisServer::start();
    let sim = upstream_simulator(60_000);
    let tenants = [("t.toml", tenant_file("t", "key-t", ""))];
    let gw = Replica::start(&redis, &sim.url(), &tenants, None, free_addr()).await;
    let client = http_client();
    let ready = |addr| {
        let client = client.clone();
        async move {
            send(&client, addr, Method::GET, "/readyz", &[], "")
                .await
                .status
        }
    };
    let mut placed = 0;
    for _ in 0..5 {
        assert_eq!(
            post_call(gw.addr, "key-t", 120).await.status,
            StatusCode::OK
        );
        placed += 1;
    }

    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let answer = post_call(gw.addr, "key-t", 120).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert_eq!(answer.code(), "state_unavailable");
        assert!(answer.headers.contains_key("retry-after"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(ready(gw.addr).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.received_calls().len(), placed, "nothing forwarded");

    // Back (with its append-only file, without its scripts): no restart of the gateway.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = post_call(gw.addr, "key-t", 120).await;
        if answer.status == StatusCode::OK {
            placed += 1;
            break;
        }
        assert_eq!(answer.code(), "state_unavailable");
        assert!(Instant::now() < deadline, "the gateway did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready(gw.addr).await, StatusCode::OK);
    let store = store(&redis);
    let usage = wait_usage(&store, "t", Duration::from_secs(10), |u| {
        u.slots == placed as i64
    })
    .await;
    assert_eq!(usage.slots as usize, sim.active_calls());
    store.check_consistency(now()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_slots_are_settled_by_the_other_or_freed_at_lease_end() {
    let redis = RedisServer::start();
    let sim = upstream_simulator(1_500);
    let tenants = [(
        "t.toml",
        tenant_file("t", "key-t", "[limits]\nmax_concurrent_calls = 10\n"),
    )];
    let survivor = Replica::start(&redis, &sim.url(), &tenants, None, free_addr()).await;
    let store = store(&redis);

    // Events for A's calls go to the survivor: it settles them when they end.
    let mut a = Replica::start(
        &redis,
        &sim.url(),
        &tenants,
        Some(survivor.addr),
        free_addr(),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(post_call(a.addr, "key-t", 600).await.status, StatusCode::OK);
    }
    a.kill_9();
    let usage = wait_usage(&store, "t", Duration::from_secs(20), |u| u.slots == 0).await;
    assert_eq!(usage.holds, 0);
    assert_eq!(usage.spent, 3, "three calls of a started minute each");

    // Events for B's calls go to B itself, dead: the survivor frees the slots at lease end
    // (1 s calls + 1 s grace), charged the full hold.
    let addr = free_addr();
    let mut b = Replica::start(&redis, &sim.url(), &tenants, None, addr).await;
    for _ in 0..2 {
        assert_eq!(post_call(b.addr, "key-t", 1).await.status, StatusCode::OK);
    }
    b.kill_9();
    let usage = wait_usage(&store, "t", Duration::from_secs(20), |u| u.slots == 0).await;
    assert_eq!((usage.holds, usage.spent), (0, 3 + 2));
    store.check_consistency(now()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_caps_and_opt_outs_hold_across_replicas() {
    let redis = RedisServer::start();
    let sim = upstream_simulator(60_000);
    let capped = tenant_file(
        "capped",
        "key-capped",
        "[attempts]\nmax_calls = 2\nwindow_secs = 3600\nscope = \"account\"\n",
    );
    let tenants = [("capped.toml", capped)];
    let a = Replica::start(&redis, &sim.url(), &tenants, None, free_addr()).await;
    let b = Replica::start(&redis, &sim.url(), &tenants, None, free_addr()).await;
    // Six calls to one person at once through both replicas: two are placed.
    let answers = burst(&[&a, &b], "key-capped", 6).await;
    assert_eq!(count(&answers, StatusCode::OK), 2);
    assert!(
        answers
            .iter()
            .filter(|a| a.status != StatusCode::OK)
            .all(|a| a.code() == "attempt_limit_exceeded" && a.headers.contains_key("retry-after"))
    );
    assert_eq!(sim.received_calls().len(), 2);
    // An opt-out taken on one replica stops the next call on the other.
    let auth = format!("Bearer {ACME_KEY}");
    let recorded = send(
        &http_client(),
        a.addr,
        Method::POST,
        "/v1/do-not-call",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        json!({"phone_number": "+14155550199"}).to_string(),
    )
    .await;
    assert_eq!(recorded.status, StatusCode::CREATED);
    let refused = send(
        &http_client(),
        b.addr,
        Method::POST,
        "/v1/calls",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        json!({"phone_number": "+14155550199", "agent_id": "agent_abc123"}).to_string(),
    )
    .await;
    assert_eq!(refused.code(), "do_not_call");
    assert_eq!(sim.received_calls().len(), 2);
}
