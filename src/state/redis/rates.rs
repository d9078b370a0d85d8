//! Request-rate limits shared by every replica: GCRA in one Lua script per check, so N replicas
//! give a tenant its configured rate, not N times it.

use std::time::Duration;

use super::{RedisStore, store_error};
use crate::state::StoreError;

/// See the module docs.
#[derive(Clone)]
pub struct SharedRateLimits {
    store: RedisStore,
}

impl SharedRateLimits {
    pub(super) fn new(store: RedisStore) -> Self {
        SharedRateLimits { store }
    }

    /// Take one request from `tenant`'s allowance of `per_minute` with bursts of `burst`, or
    /// say how long until one is free. Time is Redis's own (`TIME`), the same for every replica.
    pub async fn check(
        &self,
        tenant: &str,
        per_minute: u32,
        burst: u32,
    ) -> Result<Result<(), Duration>, StoreError> {
        let interval = 60_000_000 / i64::from(per_minute.max(1));
        let key = format!("{}rate", self.store.inner.tenant_prefix(tenant));
        self.store
            .op(move |inner| async move {
                let mut invocation = inner.scripts.rate.prepare_invoke();
                invocation
                    .key(key)
                    .arg(interval)
                    .arg(i64::from(burst.max(1)));
                let wait: i64 = invocation
                    .invoke_async(&mut inner.conn())
                    .await
                    .map_err(store_error)?;
                Ok(match wait {
                    0 => Ok(()),
                    us => Err(Duration::from_micros(us.max(1) as u64)),
                })
            })
            .await
    }
}
