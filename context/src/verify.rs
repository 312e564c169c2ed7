//! Token verification: every way a token can be refused has its own reason.
//!
//! The checks run cheapest first and never touch the claims before the
//! signature holds: size, structure, header (`alg`, `typ`, `kid`), key
//! lookup, signature, then claims (times, audience, layout, key binding).
//! A verified token is cached by its SHA-256, so a sidecar that sees the same
//! forwarded token again pays a hash and a lookup, not a signature check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::keys::{KeySet, Lookup};
use crate::token::{CUSTODY_CLAIMS_VERSION, TOKEN_TYPE, TxnClaims};

/// The signature algorithms a verifier can be configured with. Only one is
/// accepted at a time, so `none`, HMAC and RSA tokens are refused whatever
/// their key id says (no algorithm confusion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Ed25519 (RFC 8037 `EdDSA`).
    #[default]
    EdDsa,
}

impl Algorithm {
    /// The JOSE `alg` name.
    pub fn jose_name(self) -> &'static str {
        match self {
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

/// Verifier settings.
#[derive(Clone, Debug)]
pub struct VerifierConfig {
    /// The trust domain a token must be addressed to (`aud`).
    pub audience: String,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_bytes: usize,
    /// Clock skew tolerated on `iat`, `nbf` and `exp`, in seconds.
    pub leeway_secs: u64,
    /// The one algorithm accepted.
    pub algorithm: Algorithm,
    /// How many verified tokens to remember.
    pub cache_capacity: usize,
}

impl VerifierConfig {
    /// Defaults for `audience`: 4 KiB tokens, 30 s leeway, Ed25519, 10,000 cached tokens.
    pub fn new(audience: impl Into<String>) -> Self {
        VerifierConfig {
            audience: audience.into(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            leeway_secs: 30,
            algorithm: Algorithm::EdDsa,
            cache_capacity: 10_000,
        }
    }
}

/// The default size limit of a token.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 4096;

/// What exactly is malformed about a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Not three non-empty dot-separated parts.
    #[error("not three dot-separated parts")]
    Structure,
    /// A part is not unpadded base64url.
    #[error("a part is not base64url")]
    Base64,
    /// The header is not the JSON object expected.
    #[error("header is not valid json")]
    Header,
    /// The header has no `kid`.
    #[error("header has no kid")]
    MissingKeyId,
    /// The header lists critical extensions, which are not supported.
    #[error("header has critical extensions")]
    CriticalHeader,
    /// The signature is not 64 bytes.
    #[error("signature has the wrong length")]
    SignatureLength,
    /// The claims are not the JSON object expected.
    #[error("claims are not valid json or miss a required claim")]
    Claims,
    /// The `custody` claim has a version this verifier does not know.
    #[error("custody claim version is not supported")]
    ClaimsVersion,
    /// `req_wl` is empty, or `custody.att` does not have one entry per workload.
    #[error("req_wl and custody.att disagree")]
    Workloads,
    /// `exp` is before `iat`.
    #[error("exp is before iat")]
    Lifetime,
}

/// Why a token was refused. Each reason is distinct so the hop records it
/// and metrics count it; [`VerifyError::reason`] is the bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The token cannot be decoded.
    #[error("malformed token: {0}")]
    Malformed(Malformed),
    /// The token is longer than the configured limit.
    #[error("token is larger than the limit")]
    Oversized,
    /// The header names an algorithm other than the configured one.
    #[error("algorithm is not the configured one")]
    DisallowedAlgorithm,
    /// The header `typ` is not `txntoken+jwt`.
    #[error("token type is not txntoken+jwt")]
    WrongType,
    /// No key with the token's `kid` is known.
    #[error("unknown key id")]
    UnknownKeyId,
    /// The token's key has been revoked.
    #[error("key is revoked")]
    RevokedKey,
    /// The token was issued outside its key's validity window.
    #[error("key was not valid when the token was issued")]
    KeyOutOfWindow,
    /// The token's key is bound to a workload other than the one the token names last.
    #[error("key is bound to another workload")]
    KeyWorkloadMismatch,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// `iat` is further in the future than the leeway allows.
    #[error("token is not yet valid")]
    NotYetValid,
    /// `aud` does not name this trust domain.
    #[error("token is for another audience")]
    WrongAudience,
}

impl VerifyError {
    /// A bounded label for metrics and hop records.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::Oversized => "oversized",
            VerifyError::DisallowedAlgorithm => "disallowed_algorithm",
            VerifyError::WrongType => "wrong_type",
            VerifyError::UnknownKeyId => "unknown_key_id",
            VerifyError::RevokedKey => "revoked_key",
            VerifyError::KeyOutOfWindow => "key_out_of_window",
            VerifyError::KeyWorkloadMismatch => "key_workload_mismatch",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::WrongAudience => "wrong_audience",
        }
    }
}

/// A token whose signature and claims held.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The claims.
    pub claims: TxnClaims,
    /// The id of the key that signed it.
    pub kid: String,
    /// SHA-256 of the encoded token: an id for logs and records that never
    /// reveals the token.
    pub digest: [u8; 32],
}

impl VerifiedToken {
    /// A short hex form of the digest, for logs.
    pub fn short_digest(&self) -> String {
        self.digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    alg: &'a str,
    #[serde(default)]
    typ: Option<&'a str>,
    #[serde(default)]
    kid: Option<&'a str>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Clone)]
struct CacheEntry {
    token: Arc<VerifiedToken>,
    generation: u64,
}

/// Verifies tokens against a key set, remembering the ones that held.
///
/// Cheap to share: wrap it in an `Arc`. Replacing the key set (rotation,
/// revocation) invalidates every cached verification at once.
pub struct Verifier {
    config: VerifierConfig,
    keys: RwLock<Arc<KeySet>>,
    generation: AtomicU64,
    cache: quick_cache::sync::Cache<[u8; 32], CacheEntry>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.config)
            .field("generation", &self.generation)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier trusting `keys`.
    pub fn new(config: VerifierConfig, keys: KeySet) -> Self {
        let capacity = config.cache_capacity.max(1);
        Verifier {
            config,
            keys: RwLock::new(Arc::new(keys)),
            generation: AtomicU64::new(0),
            cache: quick_cache::sync::Cache::new(capacity),
        }
    }

    /// The settings.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The key set in force.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(keys) => Arc::clone(&keys),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the key set; cached verifications made under the old one are
    /// no longer used.
    pub fn set_keys(&self, keys: KeySet) {
        let mut slot = match self.keys.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(keys);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(slot);
        self.cache.clear();
    }

    /// How many verified tokens are cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Verifies `token` at time `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<VerifiedToken>, VerifyError> {
        if token.len() > self.config.max_token_bytes {
            return Err(VerifyError::Oversized);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(entry) = self.cache.get(&digest)
            && entry.generation == generation
        {
            self.check_times(&entry.token.claims, now)?;
            return Ok(entry.token);
        }
        let keys = self.keys();
        let verified = Arc::new(self.verify_uncached(token, digest, &keys, now)?);
        // Cached only under the generation it was verified with: a key-set
        // change that raced with this verification leaves the entry unused.
        self.cache.insert(
            digest,
            CacheEntry {
                token: Arc::clone(&verified),
                generation,
            },
        );
        Ok(verified)
    }

    /// Verifies at the current system time.
    pub fn verify_now(&self, token: &str) -> Result<Arc<VerifiedToken>, VerifyError> {
        self.verify(token, crate::unix_now())
    }

    fn verify_uncached(
        &self,
        token: &str,
        digest: [u8; 32],
        keys: &KeySet,
        now: u64,
    ) -> Result<VerifiedToken, VerifyError> {
        use VerifyError::Malformed as M;

        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(M(Malformed::Structure));
        };
        if header_b64.is_empty() || claims_b64.is_empty() || signature_b64.is_empty() {
            return Err(M(Malformed::Structure));
        }

        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| M(Malformed::Base64))?;
        let header: Header<'_> =
            serde_json::from_slice(&header_json).map_err(|_| M(Malformed::Header))?;
        if header.alg != self.config.algorithm.jose_name() {
            return Err(VerifyError::DisallowedAlgorithm);
        }
        if !header.typ.is_some_and(is_txn_token_type) {
            return Err(VerifyError::WrongType);
        }
        if header.crit.is_some() {
            return Err(M(Malformed::CriticalHeader));
        }
        let kid = header.kid.ok_or(M(Malformed::MissingKeyId))?;
        let (public, verifying) = match keys.lookup(kid) {
            Lookup::Found(public, verifying) => (public, verifying),
            Lookup::Revoked => return Err(VerifyError::RevokedKey),
            Lookup::Unknown => return Err(VerifyError::UnknownKeyId),
        };

        let mut signature = [0u8; 64];
        let decoded = URL_SAFE_NO_PAD
            .decode_slice(signature_b64, &mut signature)
            .map_err(|_| M(Malformed::SignatureLength))?;
        if decoded != 64 {
            return Err(M(Malformed::SignatureLength));
        }
        let signing_input = &token.as_bytes()[..header_b64.len() + 1 + claims_b64.len()];
        verifying
            .verify_strict(
                signing_input,
                &ed25519_dalek::Signature::from_bytes(&signature),
            )
            .map_err(|_| VerifyError::BadSignature)?;

        let claims_json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| M(Malformed::Base64))?;
        let claims: TxnClaims =
            serde_json::from_slice(&claims_json).map_err(|_| M(Malformed::Claims))?;
        if claims.custody.v != CUSTODY_CLAIMS_VERSION {
            return Err(M(Malformed::ClaimsVersion));
        }
        if claims.exp < claims.iat {
            return Err(M(Malformed::Lifetime));
        }
        if claims.req_wl.is_empty()
            || claims.req_wl.iter().any(String::is_empty)
            || claims.req_wl.len() != claims.custody.att.len()
        {
            return Err(M(Malformed::Workloads));
        }
        self.check_times(&claims, now)?;
        if !claims.aud.contains(&self.config.audience) {
            return Err(VerifyError::WrongAudience);
        }
        if !public.covers(claims.iat, self.config.leeway_secs) {
            return Err(VerifyError::KeyOutOfWindow);
        }
        if let Some(bound) = &public.workload
            && claims.last_workload() != Some(bound.as_str())
        {
            return Err(VerifyError::KeyWorkloadMismatch);
        }
        Ok(VerifiedToken {
            claims,
            kid: kid.to_owned(),
            digest,
        })
    }

    fn check_times(&self, claims: &TxnClaims, now: u64) -> Result<(), VerifyError> {
        let leeway = self.config.leeway_secs;
        if now >= claims.exp.saturating_add(leeway) {
            return Err(VerifyError::Expired);
        }
        if claims.iat > now.saturating_add(leeway) {
            return Err(VerifyError::NotYetValid);
        }
        Ok(())
    }
}

/// `typ` is a media type: compared case-insensitively, with or without the
/// `application/` prefix (RFC 7515 section 4.1.9).
fn is_txn_token_type(typ: &str) -> bool {
    let bare = typ
        .get(..12)
        .filter(|p| p.eq_ignore_ascii_case("application/"))
        .map_or(typ, |_| &typ[12..]);
    bare.eq_ignore_ascii_case(TOKEN_TYPE)
}

#[cfg(test)]
mod tests;
