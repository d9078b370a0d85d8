//! The `callgate` binary's commands.

use std::process::Command;

use sha2::{Digest, Sha256};

fn callgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callgate"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env_remove("CALLGATE_CONFIG");
    cmd
}

#[test]
fn check_passes_on_the_shipped_example() {
    let out = callgate()
        .args(["check", "--config", "config.example.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme, globex"));
}

#[test]
fn check_names_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["schemas", "tenants", "lists"] {
        std::fs::create_dir_all(dir.path().join("policies").join(sub)).unwrap();
    }
    std::fs::copy(
        repo.join("policies/schemas/create_call.json"),
        dir.path().join("policies/schemas/create_call.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policies/tenants/bad.toml"),
        "id = \"bad\"\nkey_sha256 = [\"00\"]\n[agents]\nallow = [\"a\"]\n",
    )
    .unwrap();
    let config = dir.path().join("callgate.toml");
    std::fs::write(
        &config,
        "[upstream]\nurl = \"simulator\"\napi_key = \"inline\"\n",
    )
    .unwrap();
    let out = callgate()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:2: key_sha256"), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("upstream.api_key is written inline"),
        "{stderr}"
    );
}

#[test]
fn check_reports_config_syntax_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("callgate.toml");
    std::fs::write(&config, "[upstream]\nurl = simulator\n").unwrap();
    let out = callgate()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("callgate.toml:2"));
}

/// An account key that cannot be sent in a header (a control character inside it) is refused by
/// `check` and when the gateway starts, never as a 500 on every call; neither repeats the key.
#[test]
fn an_account_key_that_cannot_be_a_header_is_refused_at_check_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("upstream_api_key");
    std::fs::write(&key_file, "sk_live_\u{7}zq9\n").unwrap();
    let out = callgate()
        .args(["check", "--config", "config.example.toml"])
        .env_remove("CALLGATE__UPSTREAM__API_KEY")
        .env("CALLGATE__UPSTREAM__API_KEY_FILE", &key_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot be sent in an HTTP header"),
        "{stderr}"
    );
    assert!(!stderr.contains("zq9"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = callgate()
        .args(["serve", "--config", "config.example.toml"])
        .env("CALLGATE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("CALLGATE__UPSTREAM__API_KEY_FILE")
        .env("CALLGATE__UPSTREAM__API_KEY", "sk_live_\nzq9")
        .env("CALLGATE__STATE__PATH", dir.path().join("callgate.db"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It stops by itself; one that started serving is stopped here and fails the test.
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot be sent in an HTTP header"),
        "{stderr}"
    );
    assert!(!stderr.contains("zq9"), "{stderr}");
    // Refused before anything started: no state file was made.
    assert!(!dir.path().join("callgate.db").exists());
}

#[test]
fn keygen_prints_a_key_and_its_hash_line() {
    let out = callgate()
        .args(["keygen", "--tenant", "sales"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert!(key.len() >= 40, "{key}");
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    assert!(
        stdout.contains(&format!("key_sha256 = [\"{hash}\"]")),
        "{stdout}"
    );
    let again = callgate()
        .args(["keygen", "--tenant", "sales"])
        .output()
        .unwrap();
    assert_ne!(stdout, String::from_utf8_lossy(&again.stdout));
}

#[test]
fn serve_starts_on_the_example_config_and_answers() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = tempfile::tempdir().unwrap();
    let mut child = callgate()
        .args(["serve", "--config", "config.example.toml"])
        .env("CALLGATE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("CALLGATE__UPSTREAM__API_KEY", "sk_from_env")
        .env("CALLGATE__STATE__PATH", state.path().join("callgate.db"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let body = r#"{"phone_number": "+14155551234", "agent_id": "agent_abc123"}"#;
    let request = format!(
        "POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-acme-key\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    for _ in 0..100 {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream.write_all(request.as_bytes()).unwrap();
            stream.read_to_string(&mut answer).unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A graceful stop: the bind, durable after the answer went out, is in the audit trail.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    if !stopped.success() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{logs}");
    assert!(answer.contains("\"status\":\"queued\""), "{answer}");
    assert!(logs.contains("NO REAL CALLS ARE PLACED"), "{logs}");
    // Neither the account key nor the tenant key nor the full number is logged.
    assert!(!logs.contains("sk_from_env"), "{logs}");
    assert!(!logs.contains("demo-acme-key"), "{logs}");
    assert!(!logs.contains("+14155551234"), "{logs}");
    assert!(logs.contains("+1415***1234"), "{logs}");
    // The detached part of the request (admission, bind) logs within the request's span: its
    // lines carry the request id the client received, and the tenant.
    let request_id = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("x-request-id in the answer")
        .trim();
    for message in ["\"admitted\"", "\"bound\""] {
        let line = logs
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no {message} line in {logs}"));
        assert!(line.contains(request_id), "{line}");
        assert!(line.contains("\"tenant\":\"acme\""), "{line}");
    }
}
