//! `kill -9` with calls in flight: on restart, slots, holds and spend are exactly what they were,
//! and leases that lapsed while the gateway was down are settled.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use callgate::clock::{ManualClock, SharedClock};
use callgate::config::Settings;
use callgate::server::Gateway;
use callgate::state::StateStore;
use callgate::state::sqlite::{SqliteStore, Synchronous};
use support::*;

fn post_call(port: u16, max_duration: u32) -> String {
    let body = format!(
        r#"{{"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": {max_duration}}}"#
    );
    let request = format!(
        "POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..100 {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the gateway did not start");
}

#[tokio::test]
async fn kill_9_loses_nothing_and_lapsed_leases_are_settled_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("callgate.db");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callgate"))
        .current_dir(repo())
        .args(["serve", "--config", "config.example.toml"])
        .env("CALLGATE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("CALLGATE__STATE__PATH", &db)
        .env("CALLGATE__SIMULATOR__TALK_MS", "600000")
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    for max_duration in [600, 600, 1] {
        let answer = post_call(port, max_duration);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let killed_at = jiff::Timestamp::now();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // What the file holds after the kill: every admission was committed before it was forwarded.
    {
        let store = SqliteStore::open(&db, Synchronous::Full).unwrap();
        let usage = store
            .usage("acme", killed_at.as_microsecond())
            .await
            .unwrap();
        assert_eq!((usage.slots, usage.holds, usage.spent), (3, 21, 0));
    }

    // Restart 200 s later (by the injected clock): the 1 s call's lease (1 + 120 s grace) lapsed
    // while the gateway was down, the 600 s calls' did not.
    let config = dir.path().join("callgate.toml");
    let text = config_text(
        &simulator_upstream(),
        &format!("[state]\npath = \"{}\"\n", db.display()),
    );
    std::fs::write(&config, text).unwrap();
    let settings = Settings::load_with_env(&config, Vec::new()).unwrap();
    let clock = ManualClock::new(killed_at + jiff::SignedDuration::from_secs(200));
    let shared: SharedClock = clock.clone();
    let gateway = Gateway::start_with(settings, shared, None).await.unwrap();
    let usage = gateway.usage("acme").await.unwrap();
    assert_eq!((usage.slots, usage.holds, usage.spent), (2, 20, 1));

    // And the rest lapse in their turn.
    clock.advance(Duration::from_secs(600));
    assert_eq!(gateway.sweep_now().await.unwrap(), 2);
    let usage = gateway.usage("acme").await.unwrap();
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 21));
}
