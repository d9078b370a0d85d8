//! `/metrics`, `/healthz` and `/readyz` on the admin listener: open without the admin token
//! (what Prometheus and a load balancer expect), the series move as calls are admitted, denied
//! and settled, and `promtool check metrics` accepts a scrape.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use support::*;

fn config() -> String {
    config_text(
        &simulator_upstream(),
        "[simulator]\nqueue_ms = 20\nring_ms = 20\ntalk_ms = 300\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"admin-token-for-tests\"\n",
    )
}

async fn get(gw: &TestGateway, path: &str) -> Answer {
    let addr: SocketAddr = gw.gateway.admin_addr().unwrap();
    send(&gw.client, addr, Method::GET, path, &[], "").await
}

async fn scrape(gw: &TestGateway) -> String {
    let answer = get(gw, "/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    String::from_utf8(answer.body.to_vec()).unwrap()
}

/// The value of the series `name{labels}` (labels as written in the exposition, in its order),
/// 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

fn call() -> serde_json::Value {
    json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 60})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_move_as_calls_are_admitted_denied_and_settled() {
    let gw = TestGateway::start_with_config(&config()).await;
    // Open routes: no token needed; the rest of the admin API still needs it.
    assert_eq!(get(&gw, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(&gw, "/readyz").await.status, StatusCode::OK);
    assert_eq!(
        get(&gw, "/admin/tenants").await.status,
        StatusCode::UNAUTHORIZED
    );

    let before = scrape(&gw).await;
    let allowed = r#"callgate_requests_total{tenant="acme",decision="allowed",code="ok"}"#;
    let denied =
        r#"callgate_requests_total{tenant="acme",decision="denied",code="invalid_phone_number"}"#;
    let unknown = r#"callgate_requests_total{tenant="none",decision="denied",code="unauthorized"}"#;

    assert_eq!(
        gw.create_call(ACME_KEY, &call()).await.status,
        StatusCode::OK
    );
    let bad = json!({"phone_number": "+1415", "agent_id": "agent_abc123"});
    // Twice: the second is counted through the handle the first one resolved.
    for _ in 0..2 {
        assert_eq!(
            gw.create_call(ACME_KEY, &bad).await.status,
            StatusCode::BAD_REQUEST
        );
    }
    assert_eq!(
        gw.create_call("not-a-key", &call()).await.status,
        StatusCode::UNAUTHORIZED
    );
    let during = scrape(&gw).await;
    assert_eq!(value(&during, allowed) - value(&before, allowed), 1.0);
    assert_eq!(value(&during, denied) - value(&before, denied), 2.0);
    assert_eq!(value(&during, unknown) - value(&before, unknown), 1.0);
    assert_eq!(
        value(&during, r#"callgate_slots_in_use{tenant="acme"}"#),
        1.0
    );
    assert_eq!(value(&during, "callgate_account_slots_in_use"), 1.0);
    assert!(value(&during, r#"callgate_credits_held{tenant="acme"}"#) > 0.0);
    assert!(value(&during, "callgate_upstream_duration_seconds_count") >= 1.0);
    assert!(value(&during, "callgate_request_duration_seconds_count") >= 3.0);
    // The admission waited for the state store's writer: its wait (queue, commit, the log's
    // sync with synchronous = full, the tests' default) and the sync are timed, and the batch
    // that carried it is counted. Denied requests never reach the writer.
    for series in [
        "callgate_store_wait_seconds_count",
        "callgate_store_sync_seconds_count",
        "callgate_store_batch_operations_count",
    ] {
        assert!(value(&during, series) > value(&before, series), "{series}");
    }
    let wait_sum = "callgate_store_wait_seconds_sum";
    assert!(value(&during, wait_sum) > value(&before, wait_sum));
    assert_eq!(
        value(
            &during,
            &format!(
                r#"callgate_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    // The simulated call ends (~0.35 s): settled by its final event.
    let completed = r#"callgate_calls_total{tenant="acme",status="completed"}"#;
    let mut after = String::new();
    for _ in 0..100 {
        after = scrape(&gw).await;
        if value(&after, completed) > value(&before, completed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value(&after, completed) - value(&before, completed), 1.0);
    assert_eq!(
        value(&after, r#"callgate_slots_in_use{tenant="acme"}"#),
        0.0
    );
    let spent = r#"callgate_credits_spent_total{tenant="acme"}"#;
    assert!(value(&after, spent) > value(&before, spent));

    // A policy reload is counted.
    let reload = send(
        &gw.client,
        gw.gateway.admin_addr().unwrap(),
        Method::POST,
        "/admin/reload",
        &[("authorization", "Bearer admin-token-for-tests")],
        "",
    )
    .await;
    assert_eq!(reload.status, StatusCode::OK);
    let after = scrape(&gw).await;
    let reloads = r#"callgate_policy_reloads_total{outcome="ok"}"#;
    assert_eq!(value(&after, reloads) - value(&before, reloads), 1.0);

    // Every metric is there (webhook deliveries once there was one) with its HELP and TYPE.
    for name in callgate::metrics::ALL {
        if *name == callgate::metrics::WEBHOOK_DELIVERIES {
            continue;
        }
        assert!(after.contains(&format!("# HELP {name} ")), "{name}");
        assert!(after.contains(&format!("# TYPE {name} ")), "{name}");
    }
    promtool_accepts(&after);
}

/// Every query of the Grafana dashboard names metrics callgate exports.
#[test]
fn the_dashboard_queries_exported_metrics() {
    let text = std::fs::read_to_string(repo().join("docs/grafana/callgate.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut queries);
    let names = regex::Regex::new(r"callgate_[a-z_]+").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for query in &queries {
        for found in names.find_iter(query) {
            let name = found.as_str();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                callgate::metrics::ALL.contains(&base),
                "{base} (in {query:?}) is not exported"
            );
            seen.insert(base.to_string());
        }
    }
    // And the dashboard shows every one of them.
    for name in callgate::metrics::ALL {
        assert!(seen.contains(*name), "{name} is on no panel");
    }
}

/// `promtool check metrics` (Debian's `prometheus` package; `.ci/run` installs it) exits 0.
fn promtool_accepts(scrape: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool on PATH (Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
