//! TLS material read from files at start and re-read while running:
//! certificate rotation without a restart.
//!
//! A [`Reloader`] holds one set of files (a certificate, its key, a CA:
//! whatever one piece of TLS material needs) and what was built from them.
//! Every `reload_interval_ms` ([`Reloader::watch`]) it reads the files
//! again and compares their contents with the set in force, so a
//! Kubernetes secret volume's symlink swap is seen like a file written in
//! place. A changed set goes through the same checks as at start; if it
//! passes, it is put in force for every new handshake, while connections
//! already open keep the material they started with (each handshake takes
//! [`Reloader::current`] once). A set that fails (half written, a key
//! that does not match its certificate, unreadable) is refused with a
//! warning naming the file, counted once per distinct content, and tried
//! again at the next look, so files written one after the other converge.
//!
//! Used by mesh mTLS (`mesh_tls`), the inbound TLS listener
//! (`listeners.inbound_tls`), database TLS termination
//! (`databases[].tls`) and TLS origination CAs (`tls_origination[]`,
//! `outbound.upstreams.<name>.tls`). Each reports under its own `material`
//! label in `custody_proxy_tls_reloads_total` and
//! `custody_proxy_tls_cert_expiry_seconds`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::metrics::{Metrics, TlsMaterialLabels, TlsReloadLabels};

/// The leaf certificate of a set: what logs and metrics say of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Its serial number (hex, colon-separated).
    pub serial: String,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl Leaf {
    /// The serial number and `notAfter` of a DER certificate; an error
    /// names `field`.
    pub fn of(der: &CertificateDer<'_>, field: &str) -> Result<Self, String> {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map(|(_, c)| Leaf {
                serial: c.tbs_certificate.raw_serial_as_string(),
                not_after: c.validity().not_after.timestamp(),
            })
            .map_err(|e| format!("{field}: {e}"))
    }
}

/// What a set of files was checked into: the material handshakes use and,
/// when the set has a certificate of its own, its leaf.
#[derive(Debug)]
pub struct Checked<M> {
    /// What new handshakes use.
    pub material: M,
    /// The leaf shown to peers; `None` for a set of CAs only.
    pub leaf: Option<Leaf>,
}

/// The certificates of a PEM buffer, at least one; errors name `field`.
pub fn parse_chain(pem: &[u8], field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{field}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{field}: no certificate"));
    }
    Ok(chain)
}

/// A root store of the CA certificates of a PEM buffer; errors name
/// `field`.
pub fn parse_roots(pem: &[u8], field: &str) -> Result<tokio_rustls::rustls::RootCertStore, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in parse_chain(pem, field)? {
        roots.add(cert).map_err(|e| format!("{field}: {e}"))?;
    }
    Ok(roots)
}

/// One file of a set: the configuration field that names it and its path.
#[derive(Clone, Debug)]
pub struct File {
    /// The field, as errors name it (`listeners.inbound_tls.cert_file`).
    pub field: String,
    /// Where it is read.
    pub path: PathBuf,
}

impl File {
    /// The file at `path`, configured by `field`.
    pub fn new(field: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        File {
            field: field.into(),
            path: path.into(),
        }
    }

    /// The field and the path, as a check names the file at fault:
    /// `listeners.inbound_tls.cert_file (/etc/tls/tls.crt)`.
    pub fn named(&self) -> String {
        format!("{} ({})", self.field, self.path.display())
    }
}

/// Builds material from the contents of the files, in their order; an
/// error names the file at fault ([`File::named`]).
type Build<M> = Box<dyn Fn(&[Vec<u8>]) -> Result<Checked<M>, String> + Send + Sync>;

/// A set in force: what was built and the contents it was built from.
struct Loaded<M> {
    material: Arc<M>,
    leaf: Option<Leaf>,
    contents: Vec<Vec<u8>>,
}

/// The last set of files refused by [`Reloader::reload`] (or the error
/// reading them), so the same refusal is warned about and counted once.
#[derive(Clone, PartialEq, Eq)]
pub struct RefusedSet(Result<Vec<Vec<u8>>, String>);

impl fmt::Debug for RefusedSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the contents: they hold a private key.
        f.debug_struct("RefusedSet").finish_non_exhaustive()
    }
}

/// What one look at the files came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the set in force.
    Unchanged,
    /// A new set was checked and is now in force.
    Applied,
    /// The files changed but do not hold a valid set; the set in force stays.
    Refused,
}

/// One piece of TLS material kept in step with its files (see the module
/// documentation).
pub struct Reloader<M> {
    /// The `material` label: the configuration block (`mesh_tls`,
    /// `listeners.inbound_tls`, `databases[0].tls`, ...).
    material: String,
    files: Vec<File>,
    build: Build<M>,
    current: ArcSwap<Loaded<M>>,
}

impl<M> fmt::Debug for Reloader<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("material", &self.material)
            .field("leaf", &self.current.load().leaf)
            .finish_non_exhaustive()
    }
}

/// Reads every file; an error names the one that could not be read.
fn read_all(files: &[File]) -> Result<Vec<Vec<u8>>, String> {
    files
        .iter()
        .map(|f| {
            std::fs::read(&f.path)
                .map_err(|e| format!("{}: cannot read {}: {e}", f.field, f.path.display()))
        })
        .collect()
}

impl<M: Send + Sync + 'static> Reloader<M> {
    /// Reads `files` and builds the first set with `build` (the same checks
    /// every later set must pass); an error names the file at fault.
    pub fn load(
        material: impl Into<String>,
        files: Vec<File>,
        build: impl Fn(&[Vec<u8>]) -> Result<Checked<M>, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let contents = read_all(&files)?;
        let checked = build(&contents)?;
        Ok(Reloader {
            material: material.into(),
            files,
            build: Box::new(build),
            current: ArcSwap::from_pointee(Loaded {
                material: Arc::new(checked.material),
                leaf: checked.leaf,
                contents,
            }),
        })
    }

    /// The `material` label.
    pub fn material(&self) -> &str {
        &self.material
    }

    /// The material in force: take it once per handshake.
    pub fn current(&self) -> Arc<M> {
        Arc::clone(&self.current.load().material)
    }

    /// The leaf certificate in force, if the set has one.
    pub fn leaf(&self) -> Option<Leaf> {
        self.current.load().leaf.clone()
    }

    /// Logs the set loaded at start and sets its expiry gauge.
    pub fn publish(&self, metrics: &Metrics) {
        if let Some(leaf) = self.leaf() {
            self.set_expiry(metrics, &leaf);
            tracing::info!(
                message = "certificate loaded",
                material = %self.material,
                serial = %leaf.serial,
                not_after = leaf.not_after,
            );
        }
    }

    fn set_expiry(&self, metrics: &Metrics, leaf: &Leaf) {
        metrics
            .tls_cert_expiry
            .get_or_create(&TlsMaterialLabels {
                material: self.material.clone(),
            })
            .set(leaf.not_after);
    }

    fn count(&self, metrics: &Metrics, result: &'static str) {
        metrics
            .tls_reloads
            .get_or_create(&TlsReloadLabels {
                material: self.material.clone(),
                result,
            })
            .inc();
    }

    /// Reads the files once and, when they hold a new set, checks it and
    /// puts it in force. A set that fails a check is refused with a warning
    /// naming the file (once per distinct content: `last_refused` keeps the
    /// last refused attempt) and counted; it is tried again at each call, so
    /// a certificate and key written one after the other converge.
    pub fn reload(&self, metrics: &Metrics, last_refused: &mut Option<RefusedSet>) -> Reload {
        let attempt = read_all(&self.files);
        if let Ok(contents) = &attempt
            && *contents == self.current.load().contents
        {
            *last_refused = None;
            return Reload::Unchanged;
        }
        let result = match &attempt {
            Ok(contents) => (self.build)(contents).map(|checked| (checked, contents.clone())),
            Err(error) => Err(error.clone()),
        };
        let previous = self.current.load().leaf.clone();
        match result {
            Ok((checked, contents)) => {
                match &checked.leaf {
                    Some(leaf) => {
                        tracing::info!(
                            message = "certificate rotated",
                            material = %self.material,
                            serial = %leaf.serial,
                            not_after = leaf.not_after,
                            previous_serial = previous.as_ref().map_or("", |l| l.serial.as_str()),
                        );
                        self.set_expiry(metrics, leaf);
                    }
                    None => tracing::info!(message = "CA reloaded", material = %self.material),
                }
                self.current.store(Arc::new(Loaded {
                    material: Arc::new(checked.material),
                    leaf: checked.leaf,
                    contents,
                }));
                self.count(metrics, "applied");
                *last_refused = None;
                Reload::Applied
            }
            Err(error) => {
                let seen = RefusedSet(attempt);
                if last_refused.as_ref() != Some(&seen) {
                    tracing::warn!(
                        message = "new TLS material refused, the one in force stays",
                        material = %self.material,
                        %error,
                        serial = previous.as_ref().map_or("", |l| l.serial.as_str()),
                    );
                    self.count(metrics, "refused");
                    *last_refused = Some(seen);
                }
                Reload::Refused
            }
        }
    }

    /// Looks at the files every `interval` and reloads them on change
    /// ([`Reloader::reload`]), until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last_refused = None;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
            let this = Arc::clone(&self);
            let metrics = Arc::clone(&metrics);
            let mut refused = last_refused.take();
            // File reads and signature checks: off the async workers.
            let Ok(refused) = tokio::task::spawn_blocking(move || {
                this.reload(&metrics, &mut refused);
                refused
            })
            .await
            else {
                return;
            };
            last_refused = refused;
        }
    }
}

/// A certificate chain and its key, checked to match: the certified key
/// servers show and its leaf. Errors name the file at fault.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert: &File,
    key: &File,
) -> Result<(CertifiedKey, Leaf), String> {
    let cert_field = cert.named();
    let key_field = key.named();
    let chain = parse_chain(cert_pem, &cert_field)?;
    let leaf = Leaf::of(&chain[0], &cert_field)?;
    let private =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("{key_field}: {e}"))?;
    let certified = CertifiedKey::from_der(chain, private, &ring::default_provider())
        .map_err(|e| format!("{key_field}: not the key of {cert_field}: {e}"))?;
    Ok((certified, leaf))
}

/// A server certificate and key (`cert_file`, `key_file` under `block`,
/// e.g. `listeners.inbound_tls`), re-read on change.
pub fn server_certificate(
    block: &str,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Reloader<CertifiedKey>, String> {
    let cert = File::new(format!("{block}.cert_file"), cert_file);
    let key = File::new(format!("{block}.key_file"), key_file);
    let files = vec![cert.clone(), key.clone()];
    Reloader::load(block, files, move |contents| {
        let (material, leaf) = certified_key(&contents[0], &contents[1], &cert, &key)?;
        Ok(Checked {
            material,
            leaf: Some(leaf),
        })
    })
}

/// Gives every new handshake the certificate in force of a
/// [`Reloader`]; a connection keeps the one it started with.
#[derive(Debug)]
pub struct CertResolver(pub Arc<Reloader<CertifiedKey>>);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

#[cfg(test)]
mod tests;
