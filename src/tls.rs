//! TLS material: the upstream client's trust roots, and the listener's certificate, reloadable.
//!
//! The client trusts the platform's roots (the bundled Mozilla roots where the platform has
//! none) plus, optionally, an extra PEM bundle (`upstream.ca_file`) for private upstreams. There
//! is no option to skip verification. The listener serves a PEM certificate chain and key;
//! [`ReloadableTls::reload`] swaps them for new connections while existing ones carry on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::ConfigError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::new(path, None, format!("cannot read PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(path, None, "no certificate in the file"));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| ConfigError::new(path, None, format!("cannot read a PEM private key: {e}")))
}

/// The upstream client's TLS configuration.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!("no platform trust roots found; using the bundled Mozilla roots");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| {
                ConfigError::new(path, None, format!("not a usable CA certificate: {e}"))
            })?;
        }
    }
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| ConfigError::new("tls", None, e.to_string()))
}

/// The platform's roots (or the bundled ones) and nothing else.
pub fn default_client_config() -> ClientConfig {
    // Without an extra CA file nothing user-supplied can fail here: ring supports the default
    // protocol versions.
    client_config(None).expect("the default TLS client configuration builds")
}

/// A listener's TLS configuration from a certificate chain and key, offering HTTP/2 and 1.1.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, ConfigError> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| {
            ConfigError::new(
                cert_file,
                None,
                format!("certificate and key do not make a TLS config: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener's certificate, swapped whole on reload.
#[derive(Debug)]
pub struct ReloadableTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableTls {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, ConfigError> {
        Ok(ReloadableTls {
            current: RwLock::new(server_config(cert_file, key_file)?),
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
        })
    }

    /// The configuration the files make now (the certificate in force is unchanged).
    pub fn read(&self) -> Result<Arc<ServerConfig>, ConfigError> {
        server_config(&self.cert_file, &self.key_file)
    }

    /// Put `config` (from [`ReloadableTls::read`]) in force for new connections.
    pub fn put(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// An acceptor with the certificate in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}
