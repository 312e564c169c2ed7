//! Keys of foreign JWT issuers, read from a JWKS file, and the one list of
//! algorithms Custody accepts from them.
//!
//! Two verifiers read tokens Custody does not mint: the control plane
//! verifies Kubernetes projected service-account tokens, the sidecar
//! verifies bearer JWTs of a configured identity provider. Both find the
//! verification key here, so both refuse the same way:
//!
//! - Only asymmetric algorithms are accepted ([`ALLOWED_ALGORITHMS`]: RS*,
//!   PS*, ES256, ES384, EdDSA). The algorithm is read from the raw header
//!   first, so a token naming HMAC, `none` or an unknown name is
//!   [`KeyRefusal::DisallowedAlgorithm`], never a key lookup.
//! - The key is the one with the header's `kid`, or the only key of the set
//!   when the header names none. A key that declares an `alg` is used only
//!   for that algorithm.
//! - A `kid` the set does not hold makes the file be read again, at most
//!   every [`RELOAD_INTERVAL`], so a rotated issuer key is picked up from an
//!   updated file without a restart; a file that became unreadable or
//!   invalid keeps the keys in force.
//! - A file that cannot be read, is not a JWKS or holds no key is a
//!   [`JwksError`] that names the file (and the place in it).
//!
//! What the token must claim (`iss`, `aud`, `exp`, ...) is each verifier's
//! own business: it builds a [`jsonwebtoken::Validation`] from
//! [`VerificationKey::algorithm`] and decodes with [`VerificationKey::key`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The shortest time between two reads of a JWKS file after an unknown key
/// id.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The algorithms a foreign JWT may be signed with: asymmetric ones only,
/// never HMAC (whose key would be a shared secret) or `none`.
pub const ALLOWED_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The allowed algorithm a JOSE `alg` name stands for, if it is allowed.
pub fn allowed_algorithm(name: &str) -> Option<Algorithm> {
    ALLOWED_ALGORITHMS
        .iter()
        .copied()
        .find(|a| format!("{a:?}") == name)
}

/// Why a JWKS file could not be loaded; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a JWKS, or holds no key.
    #[error("{path}: not a JWKS: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where in the file when that is known.
        message: String,
    },
}

/// Why no key verifies a token: a bounded reason a verifier maps to its
/// own refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    /// Not three dot-separated parts, or the header does not decode.
    #[error("malformed token")]
    Malformed,
    /// HMAC, `none`, an unknown algorithm, or one the key is not for.
    #[error("algorithm not allowed")]
    DisallowedAlgorithm,
    /// No key with the token's `kid` (or no `kid` and several keys), or the
    /// key is not usable.
    #[error("unknown key id")]
    UnknownKeyId,
}

/// The key and algorithm a token is to be verified with.
pub struct VerificationKey {
    /// The header's algorithm, one of [`ALLOWED_ALGORITHMS`].
    pub algorithm: Algorithm,
    /// The issuer's key the header names.
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Reads a JWKS file: a JSON object with a non-empty `keys` array.
pub fn read(path: &Path) -> Result<JwkSet, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse = |message: String| JwksError::Parse {
        path: path.to_owned(),
        message,
    };
    let set: JwkSet = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(
        &text,
    ))
    .map_err(|e| match e.path().to_string().as_str() {
        "." => parse(e.inner().to_string()),
        at => parse(format!("{at}: {}", e.inner())),
    })?;
    if set.keys.is_empty() {
        return Err(parse("keys: no key".into()));
    }
    Ok(set)
}

#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
}

struct Loaded {
    set: Arc<JwkSet>,
    read_at: Instant,
}

/// The keys of one issuer, from a JWKS file that is read again when a
/// token names a key it does not hold (see the module documentation).
pub struct JwksFile {
    path: PathBuf,
    keys: RwLock<Loaded>,
    reloading: Mutex<()>,
}

impl std::fmt::Debug for JwksFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksFile")
            .field("path", &self.path)
            .field("keys", &self.key_count())
            .finish_non_exhaustive()
    }
}

impl JwksFile {
    /// Reads the file; it must hold at least one key.
    pub fn load(path: &Path) -> Result<Self, JwksError> {
        let set = read(path)?;
        Ok(JwksFile {
            path: path.to_owned(),
            keys: RwLock::new(Loaded {
                set: Arc::new(set),
                read_at: Instant::now(),
            }),
            reloading: Mutex::new(()),
        })
    }

    /// The file the keys come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many keys are in force.
    pub fn key_count(&self) -> usize {
        self.current().keys.len()
    }

    /// Forgets when the file was last read: the next unknown key id reads
    /// it again whatever [`RELOAD_INTERVAL`] says.
    pub fn mark_stale(&self) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.read_at = Instant::now()
            .checked_sub(RELOAD_INTERVAL)
            .unwrap_or(keys.read_at);
    }

    fn current(&self) -> Arc<JwkSet> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .set
            .clone()
    }

    /// Reads the file again if it was not read recently; a file that became
    /// unreadable or invalid keeps the keys in force.
    fn reload(&self) -> Arc<JwkSet> {
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let read_at = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .read_at;
        if read_at.elapsed() < RELOAD_INTERVAL {
            return self.current();
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.read_at = Instant::now();
        match read(&self.path) {
            Ok(set) => {
                tracing::info!(path = %self.path.display(), keys = set.keys.len(), "jwks reloaded");
                keys.set = Arc::new(set);
            }
            Err(error) => tracing::warn!(%error, "jwks not reloaded, keys in force kept"),
        }
        keys.set.clone()
    }

    /// The key and algorithm `token` must verify with, found by the
    /// header's `kid`, or why there is none. Nothing but the header is read.
    pub fn key_for(&self, token: &str) -> Result<VerificationKey, KeyRefusal> {
        let mut parts = token.split('.');
        let raw = parts.next().unwrap_or_default();
        if parts.count() != 2 {
            return Err(KeyRefusal::Malformed);
        }
        // The algorithm is read from the raw header first, so `none` and
        // names jsonwebtoken does not know are told apart from garbage.
        let header_json = URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| KeyRefusal::Malformed)?;
        let raw_header: RawHeader =
            serde_json::from_slice(&header_json).map_err(|_| KeyRefusal::Malformed)?;
        let algorithm =
            allowed_algorithm(&raw_header.alg).ok_or(KeyRefusal::DisallowedAlgorithm)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| KeyRefusal::Malformed)?;
        let find = |set: &JwkSet| -> Option<Jwk> {
            match &header.kid {
                Some(kid) => set.find(kid).cloned(),
                None if set.keys.len() == 1 => set.keys.first().cloned(),
                None => None,
            }
        };
        let jwk = match find(&self.current()) {
            Some(jwk) => jwk,
            None => find(&self.reload()).ok_or(KeyRefusal::UnknownKeyId)?,
        };
        if let Some(key_alg) = jwk.common.key_algorithm
            && format!("{key_alg:?}") != raw_header.alg
        {
            return Err(KeyRefusal::DisallowedAlgorithm);
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| KeyRefusal::UnknownKeyId)?;
        Ok(VerificationKey { algorithm, key })
    }
}

#[cfg(test)]
mod tests;
