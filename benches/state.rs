//! The state store on the admission path: what one admission costs, alone and when many arrive
//! at once (group commit shares one transaction, and one fsync, among them).

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};

use callgate::state::sqlite::{SqliteStore, Synchronous};
use callgate::state::{AdmitOutcome, AdmitRequest, StateStore};

fn request(i: u64) -> AdmitRequest {
    AdmitRequest {
        reservation_id: format!("r{i:020}"),
        tenant: format!("t{}", i % 8),
        token_hash: format!("h{i:020}"),
        tenant_max_concurrent: Some(1_000_000),
        account_max_concurrent: 1_000_000,
        budget: None,
        hold: 10,
        price: 1,
        increment_secs: 60,
        max_duration: 600,
        lease_expires_at: 1_000_000_000,
        now: 0,
        tenant_webhook: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(SqliteStore::open(&dir.path().join("bench.db"), sync).unwrap());
        let mut i = 0u64;
        c.bench_function(&format!("admit + release, one at a time ({sync:?})"), |b| {
            b.iter(|| {
                i += 1;
                rt.block_on(async {
                    let req = request(i);
                    let id = req.reservation_id.clone();
                    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
                    store.release(&id).await.unwrap();
                })
            })
        });
        c.bench_function(&format!("64 concurrent admissions ({sync:?})"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut ids = Vec::with_capacity(64);
                    let admits: Vec<_> = (0..64)
                        .map(|_| {
                            i += 1;
                            let req = request(i);
                            ids.push(req.reservation_id.clone());
                            let store = store.clone();
                            tokio::spawn(async move { store.admit(req).await })
                        })
                        .collect();
                    for a in admits {
                        assert_eq!(a.await.unwrap().unwrap(), AdmitOutcome::Admitted);
                    }
                    let releases: Vec<_> = ids
                        .into_iter()
                        .map(|id| {
                            let store = store.clone();
                            tokio::spawn(async move { store.release(&id).await })
                        })
                        .collect();
                    for r in releases {
                        r.await.unwrap().unwrap();
                    }
                })
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
