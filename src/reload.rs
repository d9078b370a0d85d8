//! What can change without a restart: the policies and the TLS certificates (`SIGHUP`,
//! `POST /admin/reload`). On any error the old ones stay in force.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::ConfigError;
use crate::policy::{Policies, PolicyHandle};
use crate::tls::ReloadableTls;

/// Reloads what can change without a restart: the policies and the TLS certificates.
pub struct Reloader {
    pub policies: PolicyHandle,
    pub(crate) policy_dir: PathBuf,
    pub(crate) hash_key: Vec<u8>,
    pub(crate) tls: Vec<Arc<ReloadableTls>>,
}

impl Reloader {
    /// Reload the policies from disk; on any error the old policies stay in force.
    pub async fn reload_policies(&self) -> Result<usize, Vec<ConfigError>> {
        // A large do-not-call list takes a second to load: on a blocking thread, so that traffic
        // does not pause. (Not `block_in_place`: that hands the request thread's work to another
        // thread for good, one that does not own the regexes' caches; see `main.rs`.) The reload
        // runs to its end there, even if the caller stops waiting for it.
        let (dir, key, live) = (
            self.policy_dir.clone(),
            self.hash_key.clone(),
            self.policies.clone(),
        );
        let reload = move || {
            let policies = Policies::load(&dir, &key);
            crate::metrics::reload(policies.is_ok());
            let policies = policies?;
            let count = policies.tenants.len();
            live.replace(policies);
            Ok(count)
        };
        match tokio::task::spawn_blocking(reload).await {
            Ok(reloaded) => reloaded,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only when the runtime is shutting down.
                Err(_) => Err(vec![ConfigError::new(
                    &self.policy_dir,
                    None,
                    "not reloaded: the gateway is shutting down",
                )]),
            },
        }
    }

    /// [`Reloader::reload_policies`], then the audit trail's `reload` line (whether it took
    /// effect): `SIGHUP` and `POST /admin/reload` alike.
    pub async fn reload_audited(
        &self,
        audit: &crate::audit::Audit,
    ) -> Result<usize, Vec<ConfigError>> {
        let reloaded = self.reload_policies().await;
        let mut line = serde_json::Map::new();
        line.insert("ok".into(), reloaded.is_ok().into());
        audit.admin("reload", line);
        reloaded
    }

    /// Reload every listener's certificate for new connections (open ones carry on); on error
    /// the old certificates stay. Returns how many were reloaded.
    pub fn reload_tls(&self) -> Result<usize, ConfigError> {
        // Read them all before swapping any, so a bad file changes nothing.
        for tls in &self.tls {
            tls.check()?;
        }
        for tls in &self.tls {
            tls.reload()?;
        }
        Ok(self.tls.len())
    }
}
