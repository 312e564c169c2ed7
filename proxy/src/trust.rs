//! The signing key and the trusted key set, from files (standalone mode).
//!
//! A key-set file is JSON:
//!
//! ```json
//! { "version": 1,
//!   "keys": [ { "kid": "k1", "ed25519": "<base64url of 32 bytes>",
//!               "workload": "spiffe://td/ns/shop/sa/web" } ],
//!   "revoked": ["k0"] }
//! ```

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custody_context::keys::{KeySet, PublicKey, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a key or key set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The seed file does not hold 64 hex digits.
    #[error("{path}: the seed must be 64 hex digits")]
    Seed {
        /// The file.
        path: PathBuf,
    },
    /// The key-set file is not valid.
    #[error("{path}: {field}: {message}")]
    KeySet {
        /// The file.
        path: PathBuf,
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// One key of a key-set file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key id.
    pub kid: String,
    /// The raw public key, base64url without padding.
    pub ed25519: String,
    /// The only workload (URI) this key may sign for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Valid from (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    /// Valid until (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// A key-set file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetFile {
    /// The key set's version.
    #[serde(default)]
    pub version: u64,
    /// Trusted keys.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// Revoked key ids.
    #[serde(default)]
    pub revoked: Vec<String>,
}

impl KeyEntry {
    /// The entry describing `key`'s public half.
    pub fn for_public_key(key: &PublicKey) -> Self {
        KeyEntry {
            kid: key.kid().to_owned(),
            ed25519: URL_SAFE_NO_PAD.encode(key.bytes()),
            workload: key.workload.clone(),
            not_before: key.not_before,
            not_after: key.not_after,
        }
    }
}

impl KeySetFile {
    /// The file's form of a key set.
    pub fn from_key_set(set: &KeySet) -> Self {
        KeySetFile {
            version: set.version(),
            keys: set.keys().map(KeyEntry::for_public_key).collect(),
            revoked: set.revoked().map(str::to_owned).collect(),
        }
    }

    /// Builds the key set, naming the entry at fault.
    pub fn to_key_set(&self) -> Result<KeySet, (String, String)> {
        let mut set = KeySet::new();
        set.set_version(self.version);
        for (i, entry) in self.keys.iter().enumerate() {
            let bytes: [u8; 32] = URL_SAFE_NO_PAD
                .decode(entry.ed25519.trim_end_matches('='))
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    (
                        format!("keys[{i}].ed25519"),
                        "not base64url of 32 bytes".to_owned(),
                    )
                })?;
            let mut key = PublicKey::new(&entry.kid, bytes);
            if let Some(w) = &entry.workload {
                key = key.bound_to(w);
            }
            if let (Some(nb), Some(na)) = (entry.not_before, entry.not_after) {
                key = key.valid_between(nb, na);
            }
            set.insert(key)
                .map_err(|e| (format!("keys[{i}]"), e.to_string()))?;
        }
        for kid in &self.revoked {
            set.revoke(kid);
        }
        Ok(set)
    }

    /// Reads a key-set file.
    pub fn load(path: &Path) -> Result<KeySet, TrustError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrustError::Read {
            path: path.to_owned(),
            source,
        })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let file: KeySetFile =
            serde_path_to_error::deserialize(de).map_err(|e| TrustError::KeySet {
                path: path.to_owned(),
                field: e.path().to_string(),
                message: e.into_inner().to_string(),
            })?;
        file.to_key_set()
            .map_err(|(field, message)| TrustError::KeySet {
                path: path.to_owned(),
                field,
                message,
            })
    }
}

/// The key id derived from a public key: base64url of the first 12 bytes of
/// its SHA-256 (the same derivation `custody-context` uses for generated keys).
pub fn derived_kid(public: &[u8; 32]) -> String {
    let digest = Sha256::digest(public);
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

/// A signing key from a 32-byte seed, with the given or derived key id.
pub fn signing_key_from_seed(seed: &[u8; 32], kid: Option<&str>) -> SigningKey {
    let probe = SigningKey::from_seed("probe", seed);
    let kid = kid.map_or_else(|| derived_kid(probe.public_key().bytes()), str::to_owned);
    SigningKey::from_seed(kid, seed)
}

/// Reads a seed file (64 hex digits, surrounding whitespace ignored).
pub fn load_seed(path: &Path) -> Result<[u8; 32], TrustError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrustError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| TrustError::Seed {
        path: path.to_owned(),
    })?;
    Ok(seed)
}
