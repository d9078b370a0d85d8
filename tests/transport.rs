//! Production transport: HTTPS to the upstream with a configured CA, egress through an HTTP
//! CONNECT proxy, TLS on the listener with certificate reload, secrets from files.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use callgate::config::SimulatorSettings;
use callgate::simulator::Simulator;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use support::*;

struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Write the CA certificate, and a leaf for 127.0.0.1 and localhost with its key, into `dir`.
    fn write(&self, dir: &Path, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (ca, crt, k) = (
            dir.join(format!("{prefix}-ca.pem")),
            dir.join(format!("{prefix}-cert.pem")),
            dir.join(format!("{prefix}-key.pem")),
        );
        std::fs::write(&ca, self.issuer.pem()).unwrap();
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (ca, crt, k)
    }
}

async fn tls_simulator(cert: &Path, key: &Path) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = callgate::tls::server_config(cert, key).unwrap();
    let settings = SimulatorSettings {
        queue_ms: 10,
        ring_ms: 10,
        talk_ms: 60_000,
        ..Default::default()
    };
    Simulator::spawn_with_tls(listener, settings, ACCOUNT_KEY.to_string(), Some(config))
}

fn seed() -> serde_json::Value {
    json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"})
}

#[tokio::test]
async fn https_upstream_with_the_configured_ca_and_a_key_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new("upstream CA").write(dir.path(), "up");
    let sim = tls_simulator(&cert, &key).await;
    assert!(sim.url().starts_with("https://"));
    let key_file = dir.path().join("ringyo_key");
    std::fs::write(&key_file, format!("{ACCOUNT_KEY}\n")).unwrap();
    let upstream = format!(
        "url = \"{}\"\napi_key_file = \"{}\"\nca_file = \"{}\"",
        sim.url(),
        key_file.display(),
        ca.display()
    );
    let gw = TestGateway::start_with_config(&config_text(&upstream, "")).await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let received = sim.received_calls();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].headers["authorization"],
        format!("Bearer {ACCOUNT_KEY}").as_str()
    );
    assert_eq!(gw.usage("acme").await.slots, 1);
}

#[tokio::test]
async fn the_wrong_ca_is_a_502_and_nothing_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = TestCa::new("upstream CA").write(dir.path(), "up");
    let (other_ca, _, _) = TestCa::new("some other CA").write(dir.path(), "other");
    let sim = tls_simulator(&cert, &key).await;
    let upstream = format!(
        "url = \"{}\"\napi_key = \"{ACCOUNT_KEY}\"\nca_file = \"{}\"",
        sim.url(),
        other_ca.display()
    );
    let gw = TestGateway::start_with_config(&config_text(&upstream, "")).await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.code(), "upstream_unavailable");
    assert!(sim.received().is_empty());
    let usage = gw.usage("acme").await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 0));
}

/// A CONNECT proxy written for the test: records each target, then splices bytes.
async fn connect_proxy() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let mut words = head.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                log.lock().unwrap().push(target.to_string());
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn the_upstream_is_reached_through_the_connect_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new("upstream CA").write(dir.path(), "up");
    let sim = tls_simulator(&cert, &key).await;
    let (proxy, seen) = connect_proxy().await;
    let upstream = format!(
        "url = \"{}\"\napi_key = \"{ACCOUNT_KEY}\"\nca_file = \"{}\"\nproxy = \"http://{proxy}\"",
        sim.url(),
        ca.display()
    );
    let gw = TestGateway::start_with_config(&config_text(&upstream, "")).await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    assert_eq!(*seen.lock().unwrap(), vec![sim.addr().to_string()]);
    assert_eq!(sim.received_calls().len(), 1);
}

#[tokio::test]
async fn no_proxy_hosts_bypass_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new("upstream CA").write(dir.path(), "up");
    let sim = tls_simulator(&cert, &key).await;
    let (proxy, seen) = connect_proxy().await;
    let upstream = format!(
        "url = \"{}\"\napi_key = \"{ACCOUNT_KEY}\"\nca_file = \"{}\"\nproxy = \"http://{proxy}\"\nno_proxy = \"127.0.0.1\"",
        sim.url(),
        ca.display()
    );
    let gw = TestGateway::start_with_config(&config_text(&upstream, "")).await;
    assert_eq!(
        gw.create_call(ACME_KEY, &seed()).await.status,
        StatusCode::OK
    );
    assert!(seen.lock().unwrap().is_empty());
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn https_client(ca: &Path) -> HttpsClient {
    let config = callgate::tls::client_config(Some(ca)).unwrap();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

async fn health(client: &HttpsClient, port: u16) -> Result<StatusCode, String> {
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("https://127.0.0.1:{port}/healthz"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
        Ok(Ok(r)) => {
            let status = r.status();
            let _ = r.into_body().collect().await;
            Ok(status)
        }
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("timeout".into()),
    }
}

#[tokio::test]
async fn the_listener_serves_tls_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestCa::new("first CA");
    let second = TestCa::new("second CA");
    let (ca1, cert1, key1) = first.write(dir.path(), "one");
    let (ca2, cert2, key2) = second.write(dir.path(), "two");
    let cert = dir.path().join("listener-cert.pem");
    let key = dir.path().join("listener-key.pem");
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let text = config_text(&simulator_upstream(), "").replace(
        "[server]\n",
        &format!(
            "[server]\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    );
    let gw = TestGateway::start_with_config(&text).await;
    let port = gw.addr().port();

    let trusts_first = https_client(&ca1);
    assert_eq!(health(&trusts_first, port).await, Ok(StatusCode::OK));
    assert!(health(&https_client(&ca2), port).await.is_err());
    // Plain HTTP is not served on a TLS listener.
    assert!(
        tokio::time::timeout(
            Duration::from_secs(5),
            gw.client.request(
                Request::get(format!("http://127.0.0.1:{port}/healthz"))
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            )
        )
        .await
        .map(|r| r.is_err())
        .unwrap_or(true)
    );

    // A broken file is refused and the old certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(gw.gateway.reload_tls().is_err());
    assert_eq!(health(&https_client(&ca1), port).await, Ok(StatusCode::OK));

    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    assert!(gw.gateway.reload_tls().unwrap());
    // New connections get the new certificate...
    assert_eq!(health(&https_client(&ca2), port).await, Ok(StatusCode::OK));
    assert!(health(&https_client(&ca1), port).await.is_err());
    // ...while the connection opened before the reload carries on.
    assert_eq!(health(&trusts_first, port).await, Ok(StatusCode::OK));
}

#[tokio::test]
async fn webhook_deliveries_go_through_the_proxy_too() {
    let (proxy, seen) = connect_proxy().await;
    let hook = Receiver::start().await;
    let tenant = tenant_file(
        "t",
        "key-t",
        "[webhooks]\nallowed_hosts = [\"127.0.0.1\"]\nallow_http = true\nsecret = \"s\"\n",
    );
    let upstream = format!("{}\nproxy = \"http://{proxy}\"", simulator_upstream());
    let gw = TestGateway::start_custom_upstream(&[("t.toml", tenant)], &upstream, fast_simulator())
        .await;
    let body = json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "webhook_url": hook.url("/h")});
    assert_eq!(gw.create_call("key-t", &body).await.status, StatusCode::OK);
    assert_eq!(hook.wait_for(3, Duration::from_secs(10)).await.len(), 3);
    let targets = seen.lock().unwrap().clone();
    assert!(targets.contains(&hook.addr.to_string()), "{targets:?}");
    assert!(
        targets.contains(&gw.simulator().addr().to_string()),
        "{targets:?}"
    );
}

#[tokio::test]
async fn the_admin_listener_has_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new("admin CA").write(dir.path(), "admin");
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"adm\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let gw = TestGateway::start_with_config(&config_text(&simulator_upstream(), &extra)).await;
    let port = gw.gateway.admin_addr().unwrap().port();
    let client = https_client(&ca);
    let req = Request::get(format!("https://127.0.0.1:{port}/admin/tenants"))
        .header("authorization", "Bearer adm")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The tenant listener stays plain HTTP.
    assert_eq!(
        gw.send(Method::GET, "/healthz", &[], "").await.status,
        StatusCode::OK
    );
    // One reload covers every listener's certificate.
    assert!(gw.gateway.reload_tls().unwrap());
}

/// A certificate reload covers every listener or none: with the admin listener's new files
/// broken, the tenant listener keeps its certificate too, though its own new files are good.
/// (Each listener's files are also read once, not checked and then read again, so that a file
/// rewritten between the two cannot swap some listeners and not others; that race is not
/// reproduced here.)
#[tokio::test]
async fn a_bad_certificate_for_one_listener_reloads_none() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = TestCa::new("first CA").write(dir.path(), "one");
    let (ca2, cert2, key2) = TestCa::new("second CA").write(dir.path(), "two");
    let (admin_ca, admin_cert, admin_key) = TestCa::new("admin CA").write(dir.path(), "admin");
    let cert = dir.path().join("listener-cert.pem");
    let key = dir.path().join("listener-key.pem");
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"adm\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
        admin_cert.display(),
        admin_key.display()
    );
    let text = config_text(&simulator_upstream(), &extra).replace(
        "[server]\n",
        &format!(
            "[server]\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    );
    let gw = TestGateway::start_with_config(&text).await;
    let (port, admin_port) = (gw.addr().port(), gw.gateway.admin_addr().unwrap().port());
    assert_eq!(health(&https_client(&ca1), port).await, Ok(StatusCode::OK));

    // The tenant listener's files rotated to a good certificate, the admin's broken.
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    std::fs::write(&admin_cert, "not a certificate").unwrap();
    assert!(gw.gateway.reload_tls().is_err());
    assert_eq!(health(&https_client(&ca1), port).await, Ok(StatusCode::OK));
    assert!(health(&https_client(&ca2), port).await.is_err());
    // (Any answer: the admin listener's TLS is what is checked.)
    assert!(health(&https_client(&admin_ca), admin_port).await.is_ok());

    // Once the admin's files are good again, one reload swaps both.
    let (admin_ca2, admin_cert2, admin_key2) =
        TestCa::new("second admin CA").write(dir.path(), "admin2");
    std::fs::copy(&admin_cert2, &admin_cert).unwrap();
    std::fs::copy(&admin_key2, &admin_key).unwrap();
    assert!(gw.gateway.reload_tls().unwrap());
    assert_eq!(health(&https_client(&ca2), port).await, Ok(StatusCode::OK));
    assert!(health(&https_client(&admin_ca2), admin_port).await.is_ok());
    assert!(health(&https_client(&admin_ca), admin_port).await.is_err());
}

/// The keep-alive idle timeout is its own setting, longer than the header read timeout: a
/// pooled connection reused after an idle wait longer than the header timeout is served (the
/// race that lost call events), while a client dribbling a request head is still cut off.
#[tokio::test]
async fn idle_keep_alive_outlives_the_header_timeout_but_slow_heads_do_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = config_text(&simulator_upstream(), fast_simulator()).replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 2000\nheader_read_timeout_ms = 300\nkeepalive_idle_timeout_ms = 5000",
    );
    let gw = TestGateway::start_with_config(&text).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    async fn answer(stream: &mut tokio::net::TcpStream) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
    stream.write_all(request).await.unwrap();
    assert!(answer(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle for well over the header read timeout, then the next request on the same connection.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stream.write_all(request).await.unwrap();
    let second = answer(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second:?}");

    // A head that stalls is cut off after the header read timeout.
    let mut slow = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nho")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(4), slow.read(&mut buf))
        .await
        .expect("the slow client is cut off");
    assert!(matches!(closed, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).contains("408"));
    assert!(started.elapsed() < Duration::from_secs(3));
}
