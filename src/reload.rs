//! What can change without a restart: the policies and the TLS certificates (`SIGHUP`,
//! `POST /admin/reload`). On any error the old ones stay in force.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::ConfigError;
use crate::policy::{Policies, PolicyHandle};
use crate::tls::ReloadableTls;

/// Reloads what can change without a restart: the policies and the TLS certificates.
pub struct Reloader {
    pub policies: PolicyHandle,
    pub(crate) policy_dir: PathBuf,
    pub(crate) hash_key: Vec<u8>,
    pub(crate) tls: Vec<Arc<ReloadableTls>>,
    /// Held by a reload from before it reads the files until its policies are in force, so
    /// that reloads take effect in the order they read the files: without it, a reload that
    /// read the files before an edit could finish after one that read them after it, and
    /// put the older policies back.
    pub(crate) in_order: Arc<Mutex<()>>,
    /// Held by a certificate reload from before it reads the files until they are in force, for
    /// the same reason (its own: a certificate reload reads a few small files on the caller's
    /// thread, and must not wait for a policy load).
    pub(crate) tls_in_order: Mutex<()>,
}

impl Reloader {
    /// Reload the policies from disk, and write the audit trail's `reload` line (whether it
    /// took effect): `SIGHUP` and `POST /admin/reload` alike. On any error the old policies
    /// stay in force.
    pub async fn reload_audited(
        &self,
        audit: &Arc<crate::audit::Audit>,
    ) -> Result<usize, Vec<ConfigError>> {
        // A large do-not-call list takes a second to load: on a blocking thread, so that traffic
        // does not pause. (Not `block_in_place`: that hands the request thread's work to another
        // thread for good, one that does not own the regexes' caches; see `main.rs`.) The reload
        // runs to its end there, even if the caller stops waiting for it.
        let (dir, key, live, in_order, audit) = (
            self.policy_dir.clone(),
            self.hash_key.clone(),
            self.policies.clone(),
            self.in_order.clone(),
            audit.clone(),
        );
        let reload = move || {
            // A reload that panicked left nothing half-done behind the lock: it swaps last.
            let _turn = in_order.lock().unwrap_or_else(|p| p.into_inner());
            let policies = Policies::load(&dir, &key);
            crate::metrics::reload(policies.is_ok());
            let reloaded = policies.map(|policies| {
                let count = policies.tenants.len();
                live.replace(policies);
                count
            });
            // In its turn too, so that the trail's reload lines are in the order they took
            // effect.
            let mut line = serde_json::Map::new();
            line.insert("ok".into(), reloaded.is_ok().into());
            audit.admin("reload", line);
            reloaded
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

    /// Reload every listener's certificate for new connections (open ones carry on); on error
    /// the old certificates stay. Returns how many were reloaded.
    pub fn reload_tls(&self) -> Result<usize, ConfigError> {
        let _turn = self.tls_in_order.lock().unwrap_or_else(|p| p.into_inner());
        // Every listener's files read, once, before any is swapped: a file that does not make a
        // certificate and key (a bad one, or one caught while it is rewritten) changes nothing,
        // for any listener.
        let fresh = self
            .tls
            .iter()
            .map(|tls| tls.read())
            .collect::<Result<Vec<_>, _>>()?;
        for (tls, config) in self.tls.iter().zip(fresh) {
            tls.put(config);
        }
        Ok(self.tls.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    /// A reload waits for the one under way (here: the lock held, as a slow load would hold it)
    /// and reads the files only when its turn comes, so the last reload's policies stay.
    #[tokio::test]
    async fn a_reload_waits_for_the_one_under_way_and_reads_the_files_then() {
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        copy_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
            &policy_dir,
        );
        let key = b"test-hash-key".to_vec();
        let policies = PolicyHandle::new(Policies::load(&policy_dir, &key).unwrap());
        let before = policies.current().tenants.len();
        let reloader = Arc::new(Reloader {
            policies: policies.clone(),
            policy_dir: policy_dir.clone(),
            hash_key: key,
            tls: Vec::new(),
            in_order: Arc::default(),
            tls_in_order: Mutex::default(),
        });

        // A reload under way: a thread holds the turn until told to let go.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let in_order = reloader.in_order.clone();
            move || {
                let _turn = in_order.lock().unwrap();
                held_tx.send(()).unwrap();
                let _ = done_rx.recv();
            }
        });
        held_rx.recv().unwrap();
        let waiting = tokio::spawn({
            let reloader = reloader.clone();
            async move {
                reloader
                    .reload_audited(&Arc::new(crate::audit::Audit::off()))
                    .await
            }
        });
        // The edit lands while the first reload holds its turn.
        std::fs::remove_file(policy_dir.join("tenants/globex.toml")).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "a reload ran while another held its turn"
        );
        assert_eq!(policies.current().tenants.len(), before);
        drop(done_tx);
        holder.join().unwrap();

        assert_eq!(waiting.await.unwrap().unwrap(), before - 1);
        assert_eq!(policies.current().tenants.len(), before - 1);
    }
}
