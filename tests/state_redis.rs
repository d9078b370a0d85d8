//! The `StateStore` conformance suite against the Redis backend, on a `redis-server` of its own,
//! and what is Redis's own: failing closed while Redis is away, and recovering without a restart.

mod conformance;
mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use callgate::state::redis::{RedisOptions, RedisStore};
use callgate::state::{AdmitOutcome, CallEvent, StateStore, StoreError};
use conformance::{Backend, NOW, request};
use redis_support::RedisServer;

struct Redis {
    server: RedisServer,
}

impl Redis {
    fn new() -> Self {
        Redis {
            server: RedisServer::start(),
        }
    }
}

fn open(url: &str) -> RedisStore {
    RedisStore::open(RedisOptions {
        url: url.to_string(),
        cluster: false,
        prefix: "callgate".into(),
        timeout: Duration::from_secs(2),
    })
    .unwrap()
}

impl Backend for Redis {
    fn open(&self) -> Arc<dyn StateStore> {
        Arc::new(open(&self.server.url()))
    }
}

conformance_suite!(Redis::new());

/// The same suite on a Redis Cluster: every script's keys in one slot (the tenant's hash tag, or
/// the account's), or Redis refuses it.
mod cluster {
    use super::*;
    use crate::conformance;

    struct Cluster {
        server: RedisServer,
    }

    impl Backend for Cluster {
        fn open(&self) -> Arc<dyn StateStore> {
            Arc::new(
                RedisStore::open(RedisOptions {
                    url: self.server.url(),
                    cluster: true,
                    prefix: "callgate".into(),
                    timeout: Duration::from_secs(2),
                })
                .unwrap(),
            )
        }
    }

    conformance_suite!(Cluster {
        server: RedisServer::start_cluster()
    });
}

/// Redis stopped: admissions fail closed (`Unavailable`) within the timeout, nothing admitted;
/// started again, the same store recovers (scripts reloaded after `NOSCRIPT`) and the accounting
/// is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_fails_closed_and_recovers_without_a_restart() {
    let mut server = RedisServer::start();
    let store: Arc<dyn StateStore> = Arc::new(open(&server.url()));
    let mut req = request("a", "r0", 5);
    req.tenant_max_concurrent = Some(3);
    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    store.ready().await.unwrap();

    server.stop();
    let started = std::time::Instant::now();
    let mut req = request("a", "r1", 5);
    req.tenant_max_concurrent = Some(3);
    let refused = store.admit(req).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        store.ready().await,
        Err(StoreError::Unavailable(_))
    ));

    // Back, with its data (append-only file) but without the scripts it had loaded.
    server.restart();
    let mut recovered = None;
    for attempt in 0..100 {
        // A new reservation each time: a failed attempt's background release must not meet a
        // later one of the same id.
        let mut req = request("a", &format!("r2-{attempt}"), 5);
        req.tenant_max_concurrent = Some(3);
        match store.admit(req).await {
            Ok(outcome) => {
                recovered = Some(outcome);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(recovered, Some(AdmitOutcome::Admitted));
    store.ready().await.unwrap();
    let usage = store.usage("a", NOW).await.unwrap();
    assert_eq!((usage.slots, usage.holds), (2, 10));
    store.check_consistency(NOW).await.unwrap();
}

/// Two stores (two replicas) on one Redis: a burst split across both admits exactly the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_limit() {
    let server = RedisServer::start();
    let stores: Vec<Arc<dyn StateStore>> = (0..2)
        .map(|_| Arc::new(open(&server.url())) as Arc<dyn StateStore>)
        .collect();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = stores[i % 2].clone();
            tokio::spawn(async move {
                let mut req = request("a", &format!("r{i:03}"), 2);
                req.tenant_max_concurrent = Some(9);
                store.admit(req).await.unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap() == AdmitOutcome::Admitted);
    }
    assert_eq!(admitted, 9);
    for store in &stores {
        assert_eq!(store.usage("a", NOW).await.unwrap().slots, 9);
        store.check_consistency(NOW).await.unwrap();
    }
}

/// Several replicas sweeping the same lapsed leases at once settle each call once: the spend is
/// the holds, not a multiple of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sweeping_together_settle_each_call_once() {
    let server = RedisServer::start();
    let stores: Vec<Arc<dyn StateStore>> = (0..3)
        .map(|_| Arc::new(open(&server.url())) as Arc<dyn StateStore>)
        .collect();
    for i in 0..20 {
        let req = request("a", &format!("r{i:02}"), 3);
        assert_eq!(
            stores[i % 3].admit(req).await.unwrap(),
            AdmitOutcome::Admitted
        );
    }
    let later = NOW + 7_200 * conformance::SEC;
    let sweeps: Vec<_> = (0..6)
        .map(|i| {
            let store = stores[i % 3].clone();
            tokio::spawn(async move { store.expire_leases(later).await.unwrap().len() })
        })
        .collect();
    let mut settled = 0;
    for sweep in sweeps {
        settled += sweep.await.unwrap();
    }
    assert_eq!(settled, 20);
    let usage = stores[0].usage("a", later).await.unwrap();
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 60));
    stores[1].check_consistency(later).await.unwrap();
}

/// Scripts flushed from Redis (`SCRIPT FLUSH`, as after a failover): the next call loads them
/// again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_scripts_are_loaded_again() {
    let server = RedisServer::start();
    let store: Arc<dyn StateStore> = Arc::new(open(&server.url()));
    assert_eq!(
        store.admit(request("a", "r0", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let flushed: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(flushed, "OK");
    assert_eq!(
        store.admit(request("a", "r1", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    assert_eq!(store.usage("a", NOW).await.unwrap().slots, 2);
}

/// A settled call is kept 30 days, then forgotten with its upstream id: `cids`, `list` and the
/// record leave nothing behind (a call settled by its event, one bound after it lapsed, one whose
/// id an event named after it lapsed, and an entry an older version left); a live call stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_calls_are_forgotten_with_their_ids_after_their_retention() {
    const DAY: i64 = 24 * 3_600 * conformance::SEC;
    let server = RedisServer::start();
    let store: Arc<dyn StateStore> = Arc::new(open(&server.url()));
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let count = async |conn: &mut redis::aio::MultiplexedConnection, cmd: &str, key: &str| {
        let n: usize = redis::cmd(cmd).arg(key).query_async(conn).await.unwrap();
        n
    };
    // An entry whose record expired before `gone` was kept (an older version).
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg("callgate:{a}:cids")
        .arg("c-old")
        .arg("r-old")
        .ignore()
        .cmd("ZADD")
        .arg("callgate:{a}:list")
        .arg(0)
        .arg("r-old")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let bind = async |id: &str, call: &str| {
        let object = serde_json::json!({"id": call, "status": "queued"});
        let queued = store.bind("a", id, call, object.into(), NOW + DAY, NOW);
        queued.await.unwrap().await.unwrap();
    };
    let event = |call: &str, status: &str, is_final: bool| CallEvent {
        call_id: Some(call.into()),
        status: status.into(),
        duration: Some(30),
        is_final,
    };
    for id in ["r0", "r1", "r2", "r3"] {
        assert_eq!(
            store.admit(request("a", id, 1)).await.unwrap(),
            AdmitOutcome::Admitted
        );
    }
    // r0 ends by its event; r1 and r3 lapse unbound, then r1 is bound and r3's id is named by
    // an event; r2 stays live.
    bind("r0", "c0").await;
    let token = conformance::token;
    let done = event("c0", "completed", true);
    store.record_event(&token("r0"), done, NOW).await.unwrap();
    bind("r2", "c2").await;
    let lapsed = store
        .expire_leases(NOW + 2 * 3_600 * conformance::SEC)
        .await
        .unwrap();
    assert_eq!(lapsed.len(), 2);
    bind("r1", "c1").await;
    let late = event("c3", "completed", true);
    store.record_event(&token("r3"), late, NOW).await.unwrap();
    assert_eq!(count(&mut conn, "HLEN", "callgate:{a}:cids").await, 5);
    // Within the retention: the calls are kept; the walk forgets the old entry, once.
    assert_eq!(store.purge_calls(NOW + 29 * DAY).await.unwrap(), 1);
    assert_eq!(count(&mut conn, "EXISTS", "callgate:{a}:walked").await, 1);
    for kept in ["c0", "c1", "c2", "c3"] {
        assert!(store.get_call("a", kept).await.unwrap().is_some(), "{kept}");
    }
    // After it: the three settled calls forgotten, records and all; the live one kept.
    assert_eq!(store.purge_calls(NOW + 31 * DAY).await.unwrap(), 3);
    for gone in ["c0", "c1", "c3"] {
        assert!(store.get_call("a", gone).await.unwrap().is_none(), "{gone}");
    }
    for (rid, exists) in [("r0", 0), ("r1", 0), ("r2", 1), ("r3", 0)] {
        let key = format!("callgate:{{a}}:c:{rid}");
        assert_eq!(count(&mut conn, "EXISTS", &key).await, exists, "{rid}");
    }
    assert!(store.get_call("a", "c2").await.unwrap().is_some());
    assert_eq!(count(&mut conn, "HLEN", "callgate:{a}:cids").await, 1);
    assert_eq!(count(&mut conn, "ZCARD", "callgate:{a}:list").await, 1);
    assert_eq!(count(&mut conn, "ZCARD", "callgate:{a}:gone").await, 0);
    store.check_consistency(NOW + 31 * DAY).await.unwrap();
}
