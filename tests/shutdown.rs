//! Graceful shutdown under load: `SIGTERM` while call requests and webhook deliveries are in
//! flight. The gateway stops accepting, finishes the requests, waits for the deliveries and the
//! detached work, closes the state store and exits 0; every call it answered 200 is recorded,
//! and the accounting read back from the file is exact.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate::config::SimulatorSettings;
use callgate::simulator::Simulator;
use callgate::state::StateStore;
use callgate::state::sqlite::{SqliteStore, Synchronous};
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use support::*;

/// A webhook receiver that takes `delay` to answer; the instants at which it answered.
async fn slow_receiver(delay: Duration) -> (SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let log = log.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        log.lock().unwrap().push(Instant::now());
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_exits_0() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::spawn(
        listener,
        SimulatorSettings {
            queue_ms: 10,
            ring_ms: 10,
            talk_ms: 50,
            ..SimulatorSettings::default()
        },
        ACCOUNT_KEY.to_string(),
    );
    let (hook, answered) = slow_receiver(Duration::from_millis(1_500)).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = copy_policies(dir.path());
    std::fs::write(
        policies.join("tenants").join("t.toml"),
        tenant_file(
            "t",
            "key-t",
            "[webhooks]\nallowed_hosts = [\"127.0.0.1\"]\nallow_http = true\nsecret = \"whsec_t\"\n",
        ),
    )
    .unwrap();
    let addr = free_addr();
    let db = dir.path().join("state.db");
    let extra = format!(
        "[state]\npath = \"{}\"\n[relay]\npublic_url = \"http://{addr}\"\ndelivery_timeout_ms = 5000\n",
        db.display()
    );
    let upstream = format!("url = \"{}\"\napi_key = \"{ACCOUNT_KEY}\"", sim.url());
    let text = config_text(&upstream, &extra)
        .replace(
            &repo().join("policies").display().to_string(),
            &policies.display().to_string(),
        )
        .replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 8000");
    let config = dir.path().join("callgate.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("CALLGATE__SERVER__LISTEN", addr.to_string())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A first wave of calls whose events are being delivered (slowly) when SIGTERM comes, and
    // a second wave of requests in flight at that moment.
    let body = json!({"phone_number": "+14155551234", "agent_id": "agent_abc123",
                      "webhook_url": format!("http://{hook}/events")});
    let post = |body: serde_json::Value| async move {
        send(
            &http_client(),
            addr,
            Method::POST,
            "/v1/calls",
            &[
                ("authorization", "Bearer key-t"),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    };
    let mut first = Vec::new();
    for _ in 0..5 {
        first.push(post(body.clone()).await);
    }
    assert!(first.iter().all(|a| a.status == StatusCode::OK));
    tokio::time::sleep(Duration::from_millis(400)).await; // the calls end; their events relay
    let second: Vec<_> = (0..20)
        .map(|_| {
            let body = json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"});
            tokio::spawn(async move {
                let client = http_client();
                let request = http::Request::post(format!("http://{addr}/v1/calls"))
                    .header("authorization", "Bearer key-t")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                client.request(request).await.ok().map(|r| r.status())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let sigterm = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(sigterm.elapsed() < Duration::from_secs(20), "no exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = Instant::now();
    assert!(status.success(), "{status:?}");
    // The store was closed before the process exited: its last connection folded the log into
    // the file and removed it.
    assert!(
        !dir.path().join("state.db-wal").exists(),
        "the write-ahead log was left behind by a clean stop"
    );
    // Deliveries in flight at SIGTERM were waited for.
    let late: Vec<Instant> = answered
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|t| *t > sigterm)
        .collect();
    assert!(!late.is_empty(), "no delivery was in flight at SIGTERM");
    assert!(late.iter().all(|t| *t <= exited));

    // Every call answered 200 is in the file, bound to its upstream id; the counters rebuilt
    // from the file agree with the records.
    let mut placed = first.len();
    for task in second {
        if task.await.unwrap() == Some(StatusCode::OK) {
            placed += 1;
        }
    }
    assert_eq!(
        sim.received_calls().len(),
        placed,
        "every placed call was answered"
    );
    let store = SqliteStore::open(&db, Synchronous::Full).unwrap();
    for answer in &first {
        let id = answer.json()["id"].as_str().unwrap().to_string();
        assert!(store.get_call("t", &id).await.unwrap().is_some(), "{id}");
    }
    let now = jiff::Timestamp::now().as_microsecond();
    store.check_consistency(now).await.unwrap();
    let calls = store.list_calls("t", 100, None).await.unwrap();
    assert_eq!(
        calls.len(),
        placed,
        "every placed call is recorded and bound"
    );
    let usage = store.usage("t", now).await.unwrap();
    let live = calls.iter().filter(|c| c.live).count() as i64;
    assert_eq!(usage.slots, live);
}

/// `SIGINT` while a `SIGHUP` reload runs is not lost: the gateway stops once the reload ends.
/// The reload is held for certain: its new do-not-call list is a named pipe that the test
/// fills only after the signal.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_a_reload_stops_the_gateway_when_it_ends() {
    use std::os::unix::fs::OpenOptionsExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::spawn(
        listener,
        SimulatorSettings::default(),
        ACCOUNT_KEY.to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let policies = copy_policies(dir.path());
    let tenant = policies.join("tenants").join("t.toml");
    std::fs::write(&tenant, tenant_file("t", "key-t", "")).unwrap();
    let addr = free_addr();
    let extra = format!(
        "[state]\npath = \"{}\"\n",
        dir.path().join("state.db").display()
    );
    let upstream = format!("url = \"{}\"\napi_key = \"{ACCOUNT_KEY}\"", sim.url());
    let text = config_text(&upstream, &extra).replace(
        &repo().join("policies").display().to_string(),
        &policies.display().to_string(),
    );
    let config = dir.path().join("callgate.toml");
    std::fs::write(&config, text).unwrap();
    // Stopped (and reaped) however the test ends.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut gateway = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_callgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("CALLGATE__SERVER__LISTEN", addr.to_string())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut gateway.0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The tenant's new list is a pipe: the reload blocks reading it until the test writes.
    let fifo = policies.join("lists").join("held.txt");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        &tenant,
        tenant_file(
            "t",
            "key-t",
            "[destinations]\ndo_not_call = [\"lists/held.txt\"]\n",
        ),
    )
    .unwrap();
    let pid = child.id().to_string();
    let kill = |signal: &str| {
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    // Open the pipe's writing end without waiting: it fails until a reader has it open.
    let open_writer = || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
    };
    kill("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let writer = loop {
        if let Ok(w) = open_writer() {
            break w;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never opened the list"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The reload is reading the list now, and waits for it.
    kill("-INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "stopped mid-reload");
    // Let the reload end: one number per pass it reads the list in, until the gateway exits.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut writer = Some(writer);
    let status = loop {
        if let Some(mut w) = writer.take().or_else(|| open_writer().ok()) {
            use std::io::Write;
            let _ = w.write_all(b"+14155550000\n");
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "SIGINT during the reload was lost: the gateway did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}
