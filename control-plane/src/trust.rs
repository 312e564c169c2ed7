//! Trust: the root key, and short-lived signing keys issued to sidecars,
//! bound to their workload and published in the key set.
//!
//! The root Ed25519 key is generated into the data directory on first start
//! (`root-key`, mode 0600, the 32-byte seed in hex). Its public half heads
//! the key set every client receives with each policy update.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use custody_context::api::v1;
use custody_context::keys::{KeySet, PublicKey, SigningKey};
use custody_context::workload::WorkloadId;
use sha2::{Digest as _, Sha256};

use crate::store::{IssuedKey, Store, StoreError};

/// The root key's file name in the data directory.
pub const ROOT_KEY_FILE: &str = "root-key";

/// Why a key could not be issued or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The request names no valid workload.
    #[error("invalid workload: {0}")]
    Workload(String),
    /// The public key is not a valid Ed25519 key.
    #[error("not an Ed25519 public key")]
    PublicKey,
    /// The root key file is unreadable or malformed.
    #[error("root key {path}: {message}")]
    RootKey {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key id for raw public key bytes.
pub fn key_id(prefix: &str, public: &[u8]) -> String {
    let digest = Sha256::digest(public);
    format!("{prefix}{}", hex::encode(&digest[..12]))
}

/// Loads the root key from `dir`, generating it on first start.
pub fn load_or_create_root(dir: &Path) -> Result<SigningKey, TrustError> {
    let path = dir.join(ROOT_KEY_FILE);
    let err = |message: String| TrustError::RootKey {
        path: path.display().to_string(),
        message,
    };
    let seed: [u8; 32] = match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| err("not 64 hex digits".into()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed: [u8; 32] = rand::random();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| err(e.to_string()))?;
            file.write_all(hex::encode(seed).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| err(e.to_string()))?;
            seed
        }
        Err(e) => return Err(err(e.to_string())),
    };
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    Ok(SigningKey::from_seed(key_id("root-", &public), &seed))
}

/// Issues signing keys and builds the key set.
pub struct Trust {
    root: SigningKey,
    store: Arc<dyn Store>,
    ttl_secs: u64,
    version: AtomicU64,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("root", &self.root.kid())
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// Issues keys valid for `ttl_secs`.
    pub fn new(root: SigningKey, store: Arc<dyn Store>, ttl_secs: u64) -> Self {
        Trust {
            root,
            store,
            ttl_secs,
            version: AtomicU64::new(0),
        }
    }

    /// The root key id.
    pub fn root_kid(&self) -> &str {
        self.root.kid()
    }

    /// Registers a sidecar's public key, bound to its workload, valid from
    /// `now` for the configured time.
    pub fn issue(
        &self,
        workload: Option<&v1::WorkloadId>,
        public: &[u8],
        now: u64,
    ) -> Result<IssuedKey, TrustError> {
        let workload = workload.ok_or_else(|| TrustError::Workload("missing".into()))?;
        let id = WorkloadId::try_from(workload).map_err(|e| TrustError::Workload(e.to_string()))?;
        let bytes: [u8; 32] = public.try_into().map_err(|_| TrustError::PublicKey)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| TrustError::PublicKey)?;
        let key = IssuedKey {
            key_id: key_id("wl-", &bytes),
            public: bytes.to_vec(),
            workload: id.uri(),
            not_before_unix: now,
            not_after_unix: now + self.ttl_secs,
        };
        self.store.put_signing_key(&key)?;
        Ok(key)
    }

    /// The key set in force at `now`: the root key and every valid issued key.
    /// Its version increases with every call that sees a change.
    pub fn key_set(&self, now: u64) -> Result<v1::KeySet, TrustError> {
        let mut set = KeySet::new();
        set.insert(self.root.public_key())
            .map_err(|e| TrustError::RootKey {
                path: ROOT_KEY_FILE.into(),
                message: e.to_string(),
            })?;
        for key in self.store.signing_keys(now)? {
            let Ok(bytes) = <[u8; 32]>::try_from(key.public.as_slice()) else {
                continue;
            };
            let public = PublicKey::new(key.key_id, bytes)
                .bound_to(key.workload)
                .valid_between(key.not_before_unix, key.not_after_unix);
            // A duplicate id is the same key: the first wins.
            let _ = set.insert(public);
        }
        let mut wire = v1::KeySet::from(&set);
        let prev = self.version.load(Ordering::Relaxed);
        let version = prev.max(now).saturating_add(1);
        self.version.store(version, Ordering::Relaxed);
        wire.version = version;
        Ok(wire)
    }
}
