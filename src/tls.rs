//! TLS termination for clients (rustls), with certificates that renew
//! without a restart.
//!
//! ALPN offers `h2` and `http/1.1`. The certificate and key are PEM files; a
//! background task checks their modification times every `reload_interval`
//! and swaps in the new pair when they change. A renewal that fails to load
//! (half-written file, mismatched key) is logged and the current pair stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSettings;

/// The certificates in a PEM file; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|error| {
            format!(
                "cannot read certificates from `{}`: {error}",
                path.display()
            )
        })?;
    if certificates.is_empty() {
        return Err(format!("`{}` holds no certificate", path.display()));
    }
    Ok(certificates)
}

/// CA certificates from a PEM file, as the trust anchors for an upstream (`ca_file`).
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    let (_, unusable) = store.add_parsable_certificates(read_certificates(path)?);
    if unusable > 0 {
        return Err(format!(
            "{unusable} certificate(s) in `{}` cannot be used as a trust anchor",
            path.display()
        ));
    }
    Ok(store)
}

/// Loads a certificate chain and its private key from PEM files.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = read_certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|error| {
        format!(
            "cannot read a private key from `{}`: {error}",
            key.display()
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|error| format!("unusable private key in `{}`: {error}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing_key);
    pair.keys_match().map_err(|error| {
        format!(
            "`{}` does not belong to `{}`: {error}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(pair)
}

/// Serves whatever pair was loaded last.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// The acceptor for client connections, and the task that keeps its certificate fresh.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Reloading>,
    settings: TlsSettings,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Tls {
    pub fn new(settings: &TlsSettings) -> Result<Self, String> {
        let pair = load_pair(&settings.cert, &settings.key)?;
        let resolver = Arc::new(Reloading {
            current: RwLock::new(Arc::new(pair)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(
            Arc::clone(&provider) as Arc<CryptoProvider>
        )
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            resolver,
            settings: settings.clone(),
        })
    }

    /// Watches the files; swaps in a renewed pair when they change. Runs until aborted.
    pub async fn watch(self) {
        let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut seen: (Option<SystemTime>, Option<SystemTime>) =
            (modified(&self.settings.cert), modified(&self.settings.key));
        let mut every =
            tokio::time::interval(self.settings.reload_interval.max(Duration::from_millis(10)));
        loop {
            every.tick().await;
            let now = (modified(&self.settings.cert), modified(&self.settings.key));
            if now == seen {
                continue;
            }
            match load_pair(&self.settings.cert, &self.settings.key) {
                Ok(pair) => {
                    *self
                        .resolver
                        .current
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
                    seen = now;
                    tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
                }
                // Possibly mid-renewal (one file written, not the other): try again next tick.
                Err(error) => {
                    tracing::warn!(%error, "TLS certificate changed but could not be loaded; keeping the current one")
                }
            }
        }
    }
}
