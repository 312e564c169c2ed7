//! The HTTPS listener: the HTTP API over TLS, for callers that speak only
//! HTTPS (the Kubernetes API server calling the injection webhook).
//!
//! ```text
//! TcpListener ──accept──▶ handshake task (one per connection, 10 s bound)
//!                               │ ok
//!                               ▼
//!                 bounded channel ──▶ TlsListener::accept ──▶ axum::serve
//! ```
//!
//! Handshakes run concurrently, so a slow client holds no one else up. The
//! certificate is re-read when its files change (checked at most every few
//! seconds, at a handshake), so a certificate rotated by cert-manager is
//! served without a restart; a rotation that cannot be read keeps the
//! previous certificate and logs why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, the certificate files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// Why the certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the key or the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<(Vec<u8>, Option<SystemTime>), TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((bytes, modified))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Loads a certificate chain and its key.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let (cert_pem, _) = read(cert_file)?;
    let (key_pem, _) = read(key_file)?;
    let pem_error = |path: &Path, message: String| TlsError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(cert_file, "no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error(key_file, e.to_string()))?;
    let signing = ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Serves the certificate in two files, re-reading them when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    state: Mutex<CertState>,
}

#[derive(Debug)]
struct CertState {
    key: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ReloadingCert {
    /// Loads the certificate now (an error here stops the start).
    pub fn new(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let key = load_certified_key(cert_file, key_file)?;
        Ok(ReloadingCert {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            state: Mutex::new(CertState {
                key: Arc::new(key),
                stamps: (modified(cert_file), modified(key_file)),
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to serve, re-read first when the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            self.reload_if_changed(&mut state);
        }
        state.key.clone()
    }

    /// Checks the files now (tests; `current` does it on a timer).
    pub fn check_now(&self) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.checked = Instant::now();
        self.reload_if_changed(&mut state);
    }

    fn reload_if_changed(&self, state: &mut CertState) {
        let stamps = (modified(&self.cert_file), modified(&self.key_file));
        if stamps == state.stamps {
            return;
        }
        match load_certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                state.key = Arc::new(key);
                state.stamps = stamps;
                tracing::info!(cert = %self.cert_file.display(), "tls certificate reloaded");
            }
            // A half-written rotation: keep serving the previous one and
            // try again at the next check.
            Err(error) => tracing::warn!(%error, "tls certificate not reloaded"),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS server configuration (TLS 1.2 and 1.3, HTTP/1.1) over `cert`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Connections that completed their TLS handshake, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl TlsListener {
    /// Starts accepting on `tcp` with `config`.
    pub fn new(tcp: TcpListener, config: ServerConfig) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = mpsc::channel(64);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "https accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            acceptor_task,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task is gone: nothing more will arrive.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
