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
    pub fn reload_policies(&self) -> Result<usize, Vec<ConfigError>> {
        // A large do-not-call list takes a second to load: on a runtime worker, hand the
        // worker's other tasks to another thread meanwhile, so traffic does not pause.
        let load = || Policies::load(&self.policy_dir, &self.hash_key);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let policies = match multi_thread {
            true => tokio::task::block_in_place(load),
            false => load(),
        };
        crate::metrics::reload(policies.is_ok());
        let policies = policies?;
        let count = policies.tenants.len();
        self.policies.replace(policies);
        Ok(count)
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
