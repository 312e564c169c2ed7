//! Workload authentication: Kubernetes projected service-account tokens,
//! verified offline against the cluster's service-account issuer keys.
//!
//! The kubelet writes a token for the pod's service account into a projected
//! volume (`serviceAccountToken` with the audience `custody`) and rotates it
//! before it expires. The token is a JWT signed by the API server's
//! service-account issuer; its keys are published at `/openid/v1/jwks`
//! (service-account issuer discovery), which is the file configured here. So
//! the control plane learns who calls without asking the API server:
//!
//! ```text
//! { "iss": "https://kubernetes.default.svc.cluster.local", "aud": ["custody"],
//!   "exp": ..., "iat": ..., "nbf": ...,
//!   "sub": "system:serviceaccount:shop:web",
//!   "kubernetes.io": { "namespace": "shop",
//!                      "serviceaccount": { "name": "web", "uid": "..." },
//!                      "pod": { "name": "web-7d9f", "uid": "..." } } }
//! ```
//!
//! Only asymmetric algorithms are accepted (RS*, PS*, ES256, ES384, EdDSA);
//! the key is found by the header's `kid` (or is the only key) and must be
//! of the header's algorithm: a token naming HMAC or `none` never verifies.
//! `iss`, `aud`, `exp` and `sub` are required, `nbf` is checked when
//! present, with `leeway_secs` of clock skew. The `sub` must agree with the
//! `kubernetes.io` claim. Every refusal has a bounded [`Refusal`] reason.
//!
//! When a token names a `kid` the key set does not hold, the file is read
//! again (at most every [`RELOAD_INTERVAL`]), so a rotated issuer key is
//! picked up from an updated ConfigMap without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custody_context::api::v1;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The shortest time between two reads of the JWKS file after an unknown
/// key id.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The largest token accepted (projected tokens are about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// `workload_auth:` in the control plane's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAuthConfig {
    /// The service-account issuer (`--service-account-issuer` of the API
    /// server), compared with `iss` exactly.
    pub issuer: String,
    /// The issuer's keys, as published at `/openid/v1/jwks`.
    pub jwks_file: PathBuf,
    /// The audience the projected token is requested for (`custody`).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (default 60).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// When set, workload callers may claim only this trust domain.
    #[serde(default)]
    pub trust_domain: Option<String>,
}

fn default_audience() -> String {
    "custody".into()
}

fn default_leeway() -> u64 {
    60
}

impl WorkloadAuthConfig {
    /// Checks what serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |f: &str, m: &str| Err((format!("workload_auth.{f}"), m.to_owned()));
        if self.issuer.is_empty() {
            return fail("issuer", "must not be empty");
        }
        if self.audience.is_empty() {
            return fail("audience", "must not be empty");
        }
        if self.leeway_secs > 600 {
            return fail("leeway_secs", "at most 600");
        }
        if self.trust_domain.as_deref() == Some("") {
            return fail("trust_domain", "must not be empty when set");
        }
        Ok(())
    }
}

/// Why a workload token was refused: a bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a JWT, undecodable, or too large.
    Malformed,
    /// HMAC, `none`, or an algorithm the key is not for.
    DisallowedAlgorithm,
    /// No key with the token's `kid`.
    UnknownKeyId,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp` (with leeway).
    Expired,
    /// Before `nbf` (with leeway).
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` does not include the configured audience.
    WrongAudience,
    /// A required claim is missing, or `sub` and `kubernetes.io` disagree.
    Claims,
}

impl Refusal {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::DisallowedAlgorithm => "disallowed_algorithm",
            Refusal::UnknownKeyId => "unknown_key_id",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::WrongIssuer => "wrong_issuer",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::Claims => "claims",
        }
    }
}

/// Why the JWKS could not be loaded.
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
        /// What is wrong.
        message: String,
    },
}

/// The identity a verified token proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// The pod's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod, when the token is bound to one.
    pub pod: Option<String>,
}

/// A claimed workload field that the token does not prove.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: the token is for {proven:?}, not {claimed:?}")]
pub struct Mismatch {
    /// The field, e.g. `workload.namespace`.
    pub field: &'static str,
    /// What the token proves.
    pub proven: String,
    /// What was claimed.
    pub claimed: String,
}

impl WorkloadIdentity {
    /// The Kubernetes user name (`system:serviceaccount:<ns>:<sa>`).
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// Whether `claimed` is this workload: same namespace and service
    /// account, the same pod when the token names one, and the trust domain
    /// when one is required. The error names the first field that differs.
    pub fn permits(
        &self,
        claimed: &v1::WorkloadId,
        trust_domain: Option<&str>,
    ) -> Result<(), Mismatch> {
        let check = |field: &'static str, proven: &str, claimed: &str| {
            if proven == claimed {
                Ok(())
            } else {
                Err(Mismatch {
                    field,
                    proven: proven.to_owned(),
                    claimed: claimed.to_owned(),
                })
            }
        };
        if let Some(td) = trust_domain {
            check("workload.trust_domain", td, &claimed.trust_domain)?;
        }
        check("workload.namespace", &self.namespace, &claimed.namespace)?;
        check(
            "workload.service_account",
            &self.service_account,
            &claimed.service_account,
        )?;
        if let Some(pod) = &self.pod {
            check("workload.pod", pod, &claimed.pod)?;
        }
        Ok(())
    }
}

const ASYMMETRIC: [Algorithm; 9] = [
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

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaim,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: String,
    serviceaccount: NamedRef,
    #[serde(default)]
    pod: Option<NamedRef>,
}

#[derive(Deserialize)]
struct NamedRef {
    name: String,
}

struct Keys {
    set: Arc<JwkSet>,
    read_at: Instant,
}

/// Verifies projected service-account tokens of one issuer.
pub struct WorkloadVerifier {
    config: WorkloadAuthConfig,
    keys: RwLock<Keys>,
    reloading: Mutex<()>,
}

impl std::fmt::Debug for WorkloadVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

fn read_jwks(path: &Path) -> Result<JwkSet, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| JwksError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if set.keys.is_empty() {
        return Err(JwksError::Parse {
            path: path.to_owned(),
            message: "no keys".into(),
        });
    }
    Ok(set)
}

impl WorkloadVerifier {
    /// Loads the issuer's JWKS file.
    pub fn load(config: WorkloadAuthConfig) -> Result<Self, JwksError> {
        let set = read_jwks(&config.jwks_file)?;
        Ok(WorkloadVerifier {
            config,
            keys: RwLock::new(Keys {
                set: Arc::new(set),
                read_at: Instant::now(),
            }),
            reloading: Mutex::new(()),
        })
    }

    /// The trust domain workload callers must claim, if one is configured.
    pub fn trust_domain(&self) -> Option<&str> {
        self.config.trust_domain.as_deref()
    }

    fn current(&self) -> Arc<JwkSet> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set
            .clone()
    }

    /// Reads the file again if it was not read recently; a file that
    /// became unreadable keeps the keys in force.
    fn reload(&self) -> Arc<JwkSet> {
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let read_at = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .read_at;
        if read_at.elapsed() < RELOAD_INTERVAL {
            return self.current();
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.read_at = Instant::now();
        match read_jwks(&self.config.jwks_file) {
            Ok(set) => {
                tracing::info!(keys = set.keys.len(), "workload issuer keys reloaded");
                keys.set = Arc::new(set);
            }
            Err(error) => tracing::warn!(%error, "workload issuer keys not reloaded"),
        }
        keys.set.clone()
    }

    /// The workload a token proves, or why it proves nothing.
    pub fn verify(&self, token: &str) -> Result<WorkloadIdentity, Refusal> {
        if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
            return Err(Refusal::Malformed);
        }
        // The algorithm is read from the raw header first, so `none` and
        // names jsonwebtoken does not know are told apart from garbage.
        let raw = token.split('.').next().unwrap_or_default();
        let header_json = URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| Refusal::Malformed)?;
        let raw_header: RawHeader =
            serde_json::from_slice(&header_json).map_err(|_| Refusal::Malformed)?;
        let alg = ASYMMETRIC
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == raw_header.alg)
            .ok_or(Refusal::DisallowedAlgorithm)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let find = |set: &JwkSet| match &header.kid {
            Some(kid) => set.find(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let jwk = match find(&self.current()) {
            Some(jwk) => jwk,
            None => find(&self.reload()).ok_or(Refusal::UnknownKeyId)?,
        };
        if let Some(key_alg) = jwk.common.key_algorithm
            && format!("{key_alg:?}") != raw_header.alg
        {
            return Err(Refusal::DisallowedAlgorithm);
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| Refusal::UnknownKeyId)?;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_secs;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => Refusal::BadSignature,
                    K::ExpiredSignature => Refusal::Expired,
                    K::ImmatureSignature => Refusal::NotYetValid,
                    K::InvalidIssuer => Refusal::WrongIssuer,
                    K::InvalidAudience => Refusal::WrongAudience,
                    K::MissingRequiredClaim(_) => Refusal::Claims,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => Refusal::DisallowedAlgorithm,
                    K::InvalidEcdsaKey | K::InvalidRsaKey(_) | K::InvalidEddsaKey => {
                        Refusal::UnknownKeyId
                    }
                    _ => Refusal::Malformed,
                }
            })?;
        // Claims are read only once the signature held.
        let claims: Claims = serde_json::from_value(data.claims).map_err(|_| Refusal::Claims)?;
        let k = claims.kubernetes;
        let identity = WorkloadIdentity {
            namespace: k.namespace,
            service_account: k.serviceaccount.name,
            pod: k.pod.map(|p| p.name).filter(|p| !p.is_empty()),
        };
        if identity.namespace.is_empty()
            || identity.service_account.is_empty()
            || claims.sub != identity.subject()
        {
            return Err(Refusal::Claims);
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests;
