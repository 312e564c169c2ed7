//! Ed25519 signing keys and the key set that verifies tokens.
//!
//! Each sidecar holds one short-lived signing key whose public half the
//! control plane publishes, bound to the sidecar's workload. The key set holds
//! several keys at once, so a rotation never breaks a chain in flight: the old
//! key verifies the tokens it signed until it is removed or revoked.

use std::collections::{HashMap, HashSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer as _;
use sha2::{Digest, Sha256};

/// The private half of a token-signing key, with its key id.
///
/// `Debug` shows the key id only.
pub struct SigningKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// A fresh random key; its id is derived from its public key.
    pub fn generate() -> Self {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let kid = key_id_for(&key.verifying_key());
        SigningKey { kid, key }
    }

    /// A key from its 32-byte seed, with an explicit key id.
    pub fn from_seed(kid: impl Into<String>, seed: &[u8; 32]) -> Self {
        SigningKey {
            kid: kid.into(),
            key: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    /// The key id, carried in every token's `kid` header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, unbound and with no validity window.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::new(self.kid.clone(), self.key.verifying_key().to_bytes())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The key id derived from a public key: base64url of the first 12 bytes of
/// its SHA-256, so two keys never share an id by accident.
fn key_id_for(key: &ed25519_dalek::VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

/// A public key that verifies tokens, and what it may sign for.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    kid: String,
    bytes: [u8; 32],
    /// When set, the only workload (URI) this key may sign for: a token it
    /// signed must name that workload last in `req_wl`.
    pub workload: Option<String>,
    /// The key is not valid for tokens issued before this (Unix seconds).
    pub not_before: Option<u64>,
    /// The key is not valid for tokens issued after this (Unix seconds).
    pub not_after: Option<u64>,
}

impl PublicKey {
    /// A public key from its raw 32 bytes, unbound and with no window.
    pub fn new(kid: impl Into<String>, bytes: [u8; 32]) -> Self {
        PublicKey {
            kid: kid.into(),
            bytes,
            workload: None,
            not_before: None,
            not_after: None,
        }
    }

    /// Binds the key to the one workload it may sign for.
    pub fn bound_to(mut self, workload_uri: impl Into<String>) -> Self {
        self.workload = Some(workload_uri.into());
        self
    }

    /// Limits the key to tokens issued within `[not_before, not_after]`.
    pub fn valid_between(mut self, not_before: u64, not_after: u64) -> Self {
        self.not_before = Some(not_before);
        self.not_after = Some(not_after);
        self
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw Ed25519 public key.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Whether a token issued at `iat` falls in the key's window.
    pub fn covers(&self, iat: u64, leeway: u64) -> bool {
        self.not_before.is_none_or(|nb| iat + leeway >= nb)
            && self
                .not_after
                .is_none_or(|na| iat <= na.saturating_add(leeway))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("workload", &self.workload)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What a key-set lookup found.
#[derive(Debug)]
pub(crate) enum Lookup<'a> {
    Found(&'a PublicKey, &'a ed25519_dalek::VerifyingKey),
    Revoked,
    Unknown,
}

/// Why a public key was refused by the key set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// The 32 bytes are not a valid Ed25519 point.
    #[error("key {0} is not a valid ed25519 public key")]
    InvalidKey(String),
    /// The key id is empty or longer than 128 bytes.
    #[error("key id is empty or longer than 128 bytes")]
    BadKeyId,
}

/// The public keys a verifier trusts, and the ids it has revoked.
#[derive(Clone, Default)]
pub struct KeySet {
    version: u64,
    keys: HashMap<String, (PublicKey, ed25519_dalek::VerifyingKey)>,
    revoked: HashSet<String>,
}

impl KeySet {
    /// An empty key set at version 0.
    pub fn new() -> Self {
        KeySet::default()
    }

    /// The version the control plane gave this set (0 when built locally).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Sets the version.
    pub fn set_version(&mut self, version: u64) {
        self.version = version;
    }

    /// Adds (or replaces) a key; the keys already held stay, so tokens they
    /// signed keep verifying.
    pub fn insert(&mut self, key: PublicKey) -> Result<(), KeySetError> {
        if key.kid.is_empty() || key.kid.len() > 128 {
            return Err(KeySetError::BadKeyId);
        }
        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key.bytes)
            .map_err(|_| KeySetError::InvalidKey(key.kid.clone()))?;
        self.keys.insert(key.kid.clone(), (key, verifying));
        Ok(())
    }

    /// Removes a key once no token it signed can still be valid.
    pub fn remove(&mut self, kid: &str) -> Option<PublicKey> {
        self.keys.remove(kid).map(|(key, _)| key)
    }

    /// Revokes a key id: tokens it signed are refused from now on, even if
    /// the key is still listed.
    pub fn revoke(&mut self, kid: impl Into<String>) {
        self.revoked.insert(kid.into());
    }

    /// Whether `kid` is revoked.
    pub fn is_revoked(&self, kid: &str) -> bool {
        self.revoked.contains(kid)
    }

    /// The public keys held, revoked ones included.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values().map(|(key, _)| key)
    }

    /// The revoked key ids.
    pub fn revoked(&self) -> impl Iterator<Item = &str> {
        self.revoked.iter().map(String::as_str)
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn lookup(&self, kid: &str) -> Lookup<'_> {
        if self.revoked.contains(kid) {
            return Lookup::Revoked;
        }
        match self.keys.get(kid) {
            Some((key, verifying)) => Lookup::Found(key, verifying),
            None => Lookup::Unknown,
        }
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("version", &self.version)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("revoked", &self.revoked)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_distinct_derived_ids() {
        let a = SigningKey::generate();
        let b = SigningKey::generate();
        assert_ne!(a.kid(), b.kid());
        assert_eq!(a.kid().len(), 16);
        assert!(!format!("{a:?}").contains("key:"));
    }

    #[test]
    fn lookup_sees_revocation_before_presence() {
        let key = SigningKey::from_seed("k1", &[7; 32]);
        let mut set = KeySet::new();
        set.insert(key.public_key()).unwrap();
        assert!(matches!(set.lookup("k1"), Lookup::Found(..)));
        assert!(matches!(set.lookup("k2"), Lookup::Unknown));
        set.revoke("k1");
        assert!(matches!(set.lookup("k1"), Lookup::Revoked));
    }

    #[test]
    fn refuses_bad_key_ids() {
        let key = SigningKey::from_seed("", &[7; 32]);
        assert_eq!(
            KeySet::new().insert(key.public_key()),
            Err(KeySetError::BadKeyId)
        );
    }

    #[test]
    fn window_checks_issue_time() {
        let key = PublicKey::new("k", [0; 32]).valid_between(100, 200);
        assert!(key.covers(150, 0));
        assert!(!key.covers(99, 0));
        assert!(key.covers(99, 5));
        assert!(!key.covers(201, 0));
        assert!(PublicKey::new("k", [0; 32]).covers(0, 0));
    }
}
