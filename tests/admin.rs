//! The admin API: its own listener and token, tenants, live usage, reload; TLS of its own.

mod support;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use serde_json::json;
use support::*;

const ADMIN: &str = "admin-token-for-tests";

fn admin_config(extra: &str) -> String {
    let long = "[simulator]\nqueue_ms = 20\nring_ms = 20\ntalk_ms = 60000\n";
    config_text(
        &simulator_upstream(),
        &format!("{long}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN}\"\n{extra}"),
    )
}

async fn admin(gw: &TestGateway, method: Method, path: &str, token: &str) -> Answer {
    let addr: SocketAddr = gw.gateway.admin_addr().unwrap();
    let auth = format!("Bearer {token}");
    send(
        &gw.client,
        addr,
        method,
        path,
        &[("authorization", &auth)],
        "",
    )
    .await
}

#[tokio::test]
async fn the_admin_api_needs_its_own_token() {
    let gw = TestGateway::start_with_config(&admin_config("")).await;
    assert_ne!(gw.gateway.admin_addr().unwrap(), gw.addr());
    for token in ["", "wrong", ACME_KEY] {
        let answer = admin(&gw, Method::GET, "/admin/tenants", token).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{token}");
        assert_eq!(answer.code(), "unauthorized");
    }
    // And the admin token is no tenant key.
    assert_eq!(
        gw.create_call(ADMIN, &json!({})).await.status,
        StatusCode::UNAUTHORIZED
    );
    let tenants = admin(&gw, Method::GET, "/admin/tenants", ADMIN)
        .await
        .json();
    let ids: Vec<_> = tenants["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "globex"]);
    assert_eq!(tenants["data"][0]["max_concurrent_calls"], 5);
}

#[tokio::test]
async fn live_usage_and_reload() {
    let gw = TestGateway::start_with_config(&admin_config("")).await;
    for _ in 0..2 {
        let answer = gw
            .create_call(
                ACME_KEY,
                &json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let usage = admin(&gw, Method::GET, "/admin/tenants/acme/usage", ADMIN)
        .await
        .json();
    assert_eq!(usage["slots"], 2);
    assert_eq!(usage["holds"], 20);
    assert_eq!(usage["spent"], 0);
    assert_eq!(usage["available"], 980);
    assert_eq!(
        admin(&gw, Method::GET, "/admin/tenants/nobody/usage", ADMIN)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let reload = admin(&gw, Method::POST, "/admin/reload", ADMIN).await;
    assert_eq!(reload.status, StatusCode::OK);
    assert_eq!(reload.json(), json!({"tenants": 2, "certificates": 0}));
    let wrong = admin(&gw, Method::DELETE, "/admin/reload", ADMIN).await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.headers["allow"], "POST");
    let wrong = admin(&gw, Method::POST, "/admin/tenants/acme/usage", ADMIN).await;
    assert_eq!(wrong.headers["allow"], "GET");
    // Paths that only look like a tenant's usage are no route (this one once panicked).
    for path in [
        "/admin/tenants/usage",
        "/admin/tenants//usage",
        "/admin/tenants/a/b/usage",
    ] {
        let answer = admin(&gw, Method::GET, path, ADMIN).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
    }
    // The gateway is still up.
    assert_eq!(
        admin(&gw, Method::GET, "/admin/tenants", ADMIN)
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_admin_listener_needs_a_token_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config_text(&simulator_upstream(), "[admin]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let err = callgate::config::Settings::load_with_env(&path, Vec::new()).unwrap_err();
    assert!(err.reason.contains("admin token"), "{err}");
    // From a file, it is fine.
    let token = dir.path().join("admin_token");
    std::fs::write(&token, format!("{ADMIN}\n")).unwrap();
    let text = config_text(
        &simulator_upstream(),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let gw = TestGateway::start_with_config(&text).await;
    assert_eq!(
        admin(&gw, Method::GET, "/admin/tenants", ADMIN)
            .await
            .status,
        StatusCode::OK
    );
}

async fn admin_post(gw: &TestGateway, path: &str, body: serde_json::Value) -> Answer {
    let addr: SocketAddr = gw.gateway.admin_addr().unwrap();
    let auth = format!("Bearer {ADMIN}");
    send(
        &gw.client,
        addr,
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

#[tokio::test]
async fn an_operator_tops_up_a_budget_and_releases_a_stuck_call() {
    let gw = TestGateway::start_with_config(&admin_config("")).await;
    // Top up this period's budget by 50, then charge 10 back.
    let topped = admin_post(
        &gw,
        "/admin/tenants/acme/budget",
        json!({"top_up": 50, "reason": "goodwill, ticket 42"}),
    )
    .await;
    assert_eq!(topped.status, StatusCode::OK, "{:?}", topped.body);
    assert_eq!(topped.json()["spent"], -50);
    assert_eq!(topped.json()["available"], 1050);
    let adjusted = admin_post(
        &gw,
        "/admin/tenants/acme/budget",
        json!({"adjust_spent": 10, "reason": "correction"}),
    )
    .await;
    assert_eq!(adjusted.json()["spent"], -40);
    assert_eq!(gw.usage("acme").await.spent, -40);
    // Bad requests change nothing.
    for bad in [
        json!({"top_up": -5, "reason": "x"}),
        json!({"top_up": 5, "adjust_spent": 1, "reason": "x"}),
        json!({"top_up": 5, "reason": " "}),
        json!({"top_up": 5}),
        json!({"top_up": 5, "reason": "x", "extra": 1}),
    ] {
        let answer = admin_post(&gw, "/admin/tenants/acme/budget", bad.clone()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(gw.usage("acme").await.spent, -40);
    let nobody = admin_post(
        &gw,
        "/admin/tenants/nobody/budget",
        json!({"top_up": 1, "reason": "x"}),
    )
    .await;
    assert_eq!(nobody.status, StatusCode::NOT_FOUND);
    let get = admin(&gw, Method::GET, "/admin/tenants/acme/budget", ADMIN).await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers["allow"], "POST");

    // A call that never reports back, released by an operator at a stated charge.
    let call = gw
        .create_call(
            ACME_KEY,
            &json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 600}),
        )
        .await;
    assert_eq!(call.status, StatusCode::OK);
    let id = call.json()["id"].as_str().unwrap().to_string();
    assert_eq!(gw.usage("acme").await.slots, 1);
    let path = format!("/admin/calls/{id}/release");
    let wrong_tenant = admin_post(
        &gw,
        &path,
        json!({"tenant": "globex", "charge": 2, "reason": "stuck"}),
    )
    .await;
    assert_eq!(wrong_tenant.status, StatusCode::NOT_FOUND);
    let released = admin_post(
        &gw,
        &path,
        json!({"tenant": "acme", "charge": 2, "reason": "stuck"}),
    )
    .await;
    assert_eq!(released.status, StatusCode::OK, "{:?}", released.body);
    assert_eq!(released.json()["settled"], true);
    assert_eq!(released.json()["charged"], 2);
    assert_eq!(released.json()["call"]["status"], "released");
    let usage = gw.usage("acme").await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, -38));
    let again = admin_post(
        &gw,
        &path,
        json!({"tenant": "acme", "charge": 5, "reason": "stuck"}),
    )
    .await;
    assert_eq!(again.json()["settled"], false);
    assert_eq!(gw.usage("acme").await.spent, -38);
    let unknown = admin_post(
        &gw,
        "/admin/calls/call_nope/release",
        json!({"tenant": "acme", "charge": 0, "reason": "x"}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    // And without the admin token, nothing.
    let anonymous = send(
        &gw.client,
        gw.gateway.admin_addr().unwrap(),
        Method::POST,
        "/admin/tenants/acme/budget",
        &[("content-type", "application/json")],
        json!({"top_up": 1000, "reason": "x"}).to_string(),
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.usage("acme").await.spent, -38);
}
