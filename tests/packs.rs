//! Jurisdiction packs over real numbers and an injected clock: each refusal names the pack and
//! rule; Sundays, holidays, a daylight-saving change and an area code spanning two zones.

mod support;

use callgate::phone::parse_e164;
use callgate::policy::Policies;
use callgate::stages::phone::{check_times, next_allowed};
use http::StatusCode;
use serde_json::json;
use support::*;

const PACKS: &str = r#"packs = ["us-federal", "us-states", "ca-crtc", "au-telemarketing"]"#;

fn policies(extra_tenant_toml: &str) -> (tempfile::TempDir, Policies) {
    let dir = tempfile::tempdir().unwrap();
    let root = copy_policies(dir.path());
    let text = format!(
        "{PACKS}\n{}",
        tenant_file("regulated", "regulated-key", extra_tenant_toml)
    );
    std::fs::write(root.join("tenants/regulated.toml"), text).unwrap();
    let loaded = Policies::load(&root, b"k").unwrap_or_else(|e| panic!("{e:?}"));
    (dir, loaded)
}

/// The rule that refuses a call to `number` at `at` (UTC), or "ok".
fn verdict(p: &Policies, number: &str, at: &str) -> String {
    let tenant = &p.tenants["regulated"];
    let to = parse_e164(number).unwrap();
    match check_times(tenant, &to, at.parse().unwrap()) {
        Ok(()) => "ok".into(),
        Err((rule, e)) => {
            assert_eq!(e.code(), "outside_calling_hours");
            rule.into_owned()
        }
    }
}

#[test]
fn each_jurisdiction_is_judged_by_its_own_rules() {
    let (_dir, p) = policies("");
    let cases = [
        // Florida (Miami, Eastern): 08:00-20:00.
        ("+13055550123", "2026-01-06T00:30:00Z", "ok"), // Mon 19:30
        ("+13055550123", "2026-01-06T01:30:00Z", "us-states/FL hours"), // Mon 20:30
        // New York: federal 08:00-21:00 only.
        ("+12125550123", "2026-01-06T01:30:00Z", "ok"), // Mon 20:30
        ("+12125550123", "2026-01-06T02:30:00Z", "us-federal/hours"), // Mon 21:30
        // California: 07:30 in Los Angeles.
        ("+14155550123", "2026-01-05T15:30:00Z", "us-federal/hours"),
        // Alabama (Central): no calls on Sunday, nor on Christmas (a Friday in 2026).
        (
            "+12055550123",
            "2026-01-11T18:00:00Z",
            "us-states/AL Sunday",
        ),
        (
            "+12055550123",
            "2026-12-25T18:00:00Z",
            "us-states/AL holidays",
        ),
        ("+12055550123", "2026-12-24T18:00:00Z", "ok"),
        // Pennsylvania: the day after Thanksgiving is a legal holiday there.
        (
            "+12155550123",
            "2026-11-27T17:00:00Z",
            "us-states/PA holidays",
        ),
        // Texas (Austin, Central): 09:00-21:00 Mon-Sat, 12:00-21:00 Sunday.
        ("+15125550123", "2026-01-10T14:30:00Z", "us-states/TX hours"), // Sat 08:30
        (
            "+15125550123",
            "2026-01-11T16:00:00Z",
            "us-states/TX Sunday hours",
        ), // Sun 10:00
        ("+15125550123", "2026-01-11T19:00:00Z", "ok"),                 // Sun 13:00
        // Ontario: 09:00-21:30 weekdays, 10:00-18:00 weekends.
        (
            "+14165550123",
            "2026-01-10T14:30:00Z",
            "ca-crtc/weekend hours",
        ), // Sat 09:30
        ("+14165550123", "2026-01-06T02:00:00Z", "ok"), // Mon 21:00
        (
            "+14165550123",
            "2026-01-06T02:45:00Z",
            "ca-crtc/weekday hours",
        ), // Mon 21:45
        // Past the years the holiday table covers, a holiday rule refuses rather than guess.
        (
            "+12055550123",
            "2031-01-07T18:00:00Z",
            "us-states/AL holidays",
        ),
        ("+12125550123", "2031-01-07T18:00:00Z", "ok"),
        // Puerto Rico is in the US: federal hours apply (07:30 in San Juan).
        ("+17875550123", "2026-01-05T11:30:00Z", "us-federal/hours"),
        // Sydney (UTC+11 in January): Saturday until 17:00, never Sunday, not Australia Day.
        ("+61291234567", "2026-01-10T05:30:00Z", "ok"), // Sat 16:30
        (
            "+61291234567",
            "2026-01-10T06:30:00Z",
            "au-telemarketing/Saturday hours",
        ),
        (
            "+61291234567",
            "2026-01-11T01:00:00Z",
            "au-telemarketing/Sunday",
        ),
        (
            "+61291234567",
            "2026-01-26T01:00:00Z",
            "au-telemarketing/holidays",
        ),
        // Across the change to daylight saving time (Sunday 2026-03-08 in the US): 12:30 UTC is
        // 07:30 in Miami the Monday before and 08:30 the Monday after.
        ("+13055550123", "2026-03-02T12:30:00Z", "us-federal/hours"),
        ("+13055550123", "2026-03-09T12:30:00Z", "ok"),
        // South Dakota's 605 rings in Mountain and Central time: both must allow the call.
        ("+16055550123", "2026-01-05T14:30:00Z", "us-federal/hours"), // 07:30 MST, 08:30 CST
        ("+16055550123", "2026-01-05T15:00:00Z", "ok"),
    ];
    let mut wrong = Vec::new();
    for (number, at, want) in cases {
        let got = verdict(&p, number, at);
        if got != want {
            wrong.push(format!("{number} at {at}: want {want}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn an_unknown_state_takes_the_strictest_rules_of_the_country() {
    let (_dir, p) = policies("");
    // A toll-free number's state is unknown: Alabama's Sunday ban applies.
    let to = parse_e164("+18885550123").unwrap();
    let tenant = &p.tenants["regulated"];
    let sunday_noon_ny = "2026-01-11T17:00:00Z".parse().unwrap();
    let (rule, _) = check_times(tenant, &to, sunday_noon_ny).unwrap_err();
    assert!(rule.starts_with("us-"), "{rule}");
}

#[test]
fn the_next_allowed_time_follows_every_rule() {
    let (_dir, p) = policies("");
    let tenant = &p.tenants["regulated"];
    let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
    // Texas, Sunday 10:00: noon the same day.
    let tx = parse_e164("+15125550123").unwrap();
    assert_eq!(
        next_allowed(tenant, &tx, at("2026-01-11T16:00:00Z")).unwrap(),
        at("2026-01-11T18:00:00Z")
    );
    // Alabama, Christmas Day: 08:00 the day after.
    let al = parse_e164("+12055550123").unwrap();
    assert_eq!(
        next_allowed(tenant, &al, at("2026-12-25T18:00:00Z")).unwrap(),
        at("2026-12-26T14:00:00Z")
    );
}

#[test]
fn pack_attempt_caps_apply_in_their_state_and_tenants_add_holidays() {
    let (_dir, p) = policies("[holidays]\n\"US-AL\" = [\"2026-12-24\"]\n");
    let tenant = &p.tenants["regulated"];
    let fl = parse_e164("+13055550123").unwrap();
    let caps = tenant.attempt_caps(&fl, false);
    assert_eq!(caps.len(), 1);
    assert_eq!(caps[0].1, ["us-states/FL attempts"]);
    assert_eq!(caps[0].0.limits[0].max, 3);
    let ny = parse_e164("+12125550123").unwrap();
    assert!(tenant.attempt_caps(&ny, false).is_empty());
    // The tenant's own holiday.
    assert_eq!(
        verdict(&p, "+12055550123", "2026-12-24T18:00:00Z"),
        "us-states/AL holidays"
    );
}

#[test]
fn a_bad_pack_or_an_unknown_one_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = copy_policies(dir.path());
    std::fs::write(
        root.join("tenants/regulated.toml"),
        format!("packs = [\"nope\"]\n{}", tenant_file("regulated", "k", "")),
    )
    .unwrap();
    std::fs::write(
        root.join("packs/bad.toml"),
        "description = \"x\"\n[[rules]]\nid = \"r\"\nregions = [\"Florida\"]\nno_calls_on = [\"sun\"]\n",
    )
    .unwrap();
    let errors: Vec<String> = Policies::load(&root, b"k")
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("bad.toml") && e.contains("Florida")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("no pack \"nope\"")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_refusal_names_its_rule_to_the_client_and_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let regulated = format!("{PACKS}\n{}", tenant_file("regulated", "regulated-key", ""));
    let gw = TestGateway::start_custom(
        &[("regulated.toml", regulated)],
        &format!(
            "{}[audit]\npath = \"{}\"\n",
            fast_simulator(),
            audit.display()
        ),
    )
    .await;
    // Monday 2026-01-05 17:00 UTC is 12:00 in Austin: allowed; 20:30 in Miami is not.
    let ok = gw
        .create_call(
            "regulated-key",
            &json!({"phone_number": "+15125550123", "agent_id": "agent_abc123"}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.json());
    gw.clock.set("2026-01-06T01:30:00Z".parse().unwrap());
    let refused = gw
        .create_call(
            "regulated-key",
            &json!({"phone_number": "+13055550123", "agent_id": "agent_abc123"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "outside_calling_hours");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("us-states/FL hours"), "{message}");
    assert_eq!(gw.simulator().received_calls().len(), 1);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let line = lines
        .iter()
        .find(|l| l["code"] == "outside_calling_hours")
        .unwrap();
    assert_eq!(line["rule"], "us-states/FL hours");
    assert_eq!(line["stage"], "phone");
}
