//! The audit trail: a line per decision on `POST /v1/calls` (with the request id the client
//! got), per settlement and per admin action, chained by SHA-256; `callgate audit verify` finds
//! the first line changed; the chain continues across a restart.

mod support;

use std::time::Duration;

use callgate::audit::{Audit, AuditSettings, Fsync};
use serde_json::{Value, json};
use support::*;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_settlements_and_admin_actions_are_chained_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let extra = format!(
        "{}[audit]\npath = \"{}\"\nfsync = \"always\"\n",
        fast_simulator(),
        path.display()
    );
    let gw = TestGateway::start_with_config(&config_text(&simulator_upstream(), &extra)).await;
    let number = "+14155551234";
    let admitted = gw
        .create_call(
            ACME_KEY,
            &json!({"phone_number": number, "agent_id": "agent_abc123"}),
        )
        .await;
    assert_eq!(admitted.status, http::StatusCode::OK);
    let request_id = admitted.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let call_id = admitted.json()["id"].as_str().unwrap().to_string();
    // Written before the answer left.
    let written = lines(&path);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["request_id"], request_id.as_str());

    let bad_number = gw
        .create_call(
            ACME_KEY,
            &json!({"phone_number": "+1415", "agent_id": "agent_abc123"}),
        )
        .await;
    let bad_agent = gw
        .create_call(
            ACME_KEY,
            &json!({"phone_number": number, "agent_id": "agent_nope"}),
        )
        .await;
    let no_key = gw
        .create_call(
            "not-a-key",
            &json!({"phone_number": number, "agent_id": "agent_abc123"}),
        )
        .await;
    // The call ends (fast simulator): its settlement by the final event.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lines(&path).iter().any(|l| l["type"] == "settlement") {
        assert!(std::time::Instant::now() < deadline, "no settlement line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.gateway.reload_policies().await.unwrap();

    let all = lines(&path);
    let decisions: Vec<&Value> = all.iter().filter(|l| l["type"] == "decision").collect();
    assert_eq!(decisions.len(), 4);
    let allowed = decisions[0];
    assert_eq!(allowed["decision"], "allowed");
    assert_eq!(allowed["tenant"], "acme");
    assert_eq!(allowed["call_id"], call_id.as_str());
    assert_eq!(allowed["destination"], "+1415***1234");
    assert!(allowed["hold"].as_i64().unwrap() > 0);
    let by_request = |answer: &Answer| {
        let id = answer.headers["x-request-id"].to_str().unwrap().to_string();
        decisions
            .iter()
            .find(|d| d["request_id"] == id.as_str())
            .copied()
            .unwrap()
    };
    let phone = by_request(&bad_number);
    assert_eq!(
        (&phone["decision"], &phone["code"], &phone["stage"]),
        (
            &json!("denied"),
            &json!("invalid_phone_number"),
            &json!("phone")
        )
    );
    let agent = by_request(&bad_agent);
    assert_eq!(
        (&agent["stage"], &agent["rule"]),
        (&json!("fields"), &json!("agents.allow"))
    );
    let anonymous = by_request(&no_key);
    assert_eq!(
        (
            &anonymous["tenant"],
            &anonymous["stage"],
            &anonymous["code"]
        ),
        (&Value::Null, &json!("authenticate"), &json!("unauthorized"))
    );
    let settlement = all.iter().find(|l| l["type"] == "settlement").unwrap();
    assert_eq!(settlement["call_id"], call_id.as_str());
    assert_eq!(
        (&settlement["by"], &settlement["status"]),
        (&json!("event"), &json!("completed"))
    );
    assert!(
        all.iter()
            .any(|l| l["type"] == "admin" && l["action"] == "reload")
    );
    for line in &all {
        assert!(line["time"].is_string());
    }
    // Never a full number or a key.
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in [number, ACME_KEY, "not-a-key"] {
        assert!(!text.contains(secret), "{secret} in the trail");
    }
    assert_eq!(callgate::audit::verify(&path), Ok(all.len()));
}

#[test]
fn the_chain_continues_across_restarts_and_names_the_first_line_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let settings = AuditSettings {
        path: Some(path.display().to_string()),
        fsync: Fsync::Never,
    };
    let write = |n: usize| {
        let audit = Audit::open(&settings).unwrap();
        for i in 0..n {
            let mut fields = serde_json::Map::new();
            fields.insert("n".into(), i.into());
            audit.record("test", fields);
        }
    };
    write(3);
    write(2); // a restart: the chain continues from the last line
    assert_eq!(callgate::audit::verify(&path), Ok(5));
    let cli = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_callgate"))
            .args(["audit", "verify"])
            .arg(file)
            .output()
            .unwrap()
    };
    assert!(cli(&path).status.success());
    // One field changed on line 3: the chain breaks at line 4, which no longer follows it.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut edited: Vec<String> = text.lines().map(str::to_string).collect();
    edited[2] = edited[2].replace("\"n\":2", "\"n\":7");
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
    let broken = callgate::audit::verify(&path).unwrap_err();
    assert_eq!(broken.0, 4, "{broken:?}");
    let out = cli(&path);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 4"));
    // A line removed: the next one no longer follows.
    let mut removed: Vec<String> = text.lines().map(str::to_string).collect();
    removed.remove(1);
    std::fs::write(&path, removed.join("\n") + "\n").unwrap();
    assert_eq!(callgate::audit::verify(&path).unwrap_err().0, 2);
}
