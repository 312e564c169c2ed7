//! The egress policy in force: swapped atomically, read per request.
//!
//! Each request loads the current bundle (`ArcSwap`), so a change applies to
//! the next request, on new and already-open connections alike. Every
//! applied bundle is written to the state directory (`policy.json`), and read
//! back at start, so a restart without the control plane keeps enforcing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use custody_context::policy::PolicyBundle;

use crate::metrics::Metrics;

/// The file name of the persisted bundle in the state directory.
pub const STATE_FILE: &str = "policy.json";

/// Why a bundle was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bundle is not valid.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The policy in force.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<PolicyBundle>,
    state_dir: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

/// Parses a bundle document (YAML or JSON) and validates it.
pub fn parse_bundle(text: &str, path: &Path) -> Result<PolicyBundle, PolicyLoadError> {
    let invalid = |field: String, message: String| PolicyLoadError::Invalid {
        path: path.to_owned(),
        field,
        message,
    };
    let bundle: PolicyBundle = if text.trim_start().starts_with('{') {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(e.path().to_string(), e.into_inner().to_string()))?
    } else {
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(e.path().to_string(), e.into_inner().to_string()))?
    };
    bundle.validate().map_err(|e| invalid(e.field, e.message))?;
    Ok(bundle)
}

/// Reads and parses a bundle file.
pub fn load_bundle(path: &Path) -> Result<PolicyBundle, PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyLoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_bundle(&text, path)
}

impl PolicyStore {
    /// A store holding the persisted bundle if there is one, else an empty
    /// allow-all bundle (version 0).
    pub fn open(state_dir: Option<PathBuf>, metrics: Arc<Metrics>) -> Self {
        let persisted = state_dir.as_ref().and_then(|dir| {
            let path = dir.join(STATE_FILE);
            match load_bundle(&path) {
                Ok(bundle) => Some(bundle),
                Err(PolicyLoadError::Read { .. }) => None,
                Err(error) => {
                    tracing::warn!(message = "ignoring persisted policy", %error);
                    None
                }
            }
        });
        let bundle = persisted.unwrap_or_default();
        metrics.policy_version.set(bundle.version);
        PolicyStore {
            current: ArcSwap::from_pointee(bundle),
            state_dir,
            metrics,
        }
    }

    /// The bundle in force.
    pub fn current(&self) -> Arc<PolicyBundle> {
        self.current.load_full()
    }

    /// Applies a validated bundle: in force for the next request, then
    /// persisted. Returns whether it differed from the one in force.
    pub fn apply(&self, bundle: PolicyBundle) -> bool {
        if *self.current.load_full() == bundle {
            return false;
        }
        let version = bundle.version;
        let bundle = Arc::new(bundle);
        self.current.store(Arc::clone(&bundle));
        self.metrics.policy_version.set(version);
        tracing::info!(message = "policy applied", version);
        if let Some(dir) = &self.state_dir
            && let Err(error) = persist(dir, &bundle)
        {
            tracing::warn!(message = "cannot persist policy", %error, dir = %dir.display());
        }
        true
    }

    /// Watches a bundle file, applying it when it changes, until `stop`.
    pub async fn watch_file(
        self: Arc<Self>,
        path: PathBuf,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut seen: Option<(SystemTime, u64)> = None;
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
            let stamp = match tokio::fs::metadata(&path).await {
                Ok(meta) => (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                ),
                Err(_) => continue,
            };
            if seen == Some(stamp) {
                continue;
            }
            seen = Some(stamp);
            match load_bundle(&path) {
                Ok(bundle) => {
                    self.apply(bundle);
                }
                Err(error) => {
                    tracing::warn!(message = "policy file refused, keeping the one in force", %error);
                }
            }
        }
    }
}

fn persist(dir: &Path, bundle: &PolicyBundle) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(bundle).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

#[cfg(test)]
mod tests;
