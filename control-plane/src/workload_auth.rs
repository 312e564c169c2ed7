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
//! The key is found in the JWKS file by [`custody_context::jwks`], which
//! accepts only asymmetric algorithms (RS*, PS*, ES256, ES384, EdDSA): the
//! key is the header's `kid` (or the only key) and must be of the header's
//! algorithm, so a token naming HMAC or `none` never verifies. `iss`, `aud`, `exp` and `sub` are required, `nbf` is checked when
//! present, with `leeway_secs` of clock skew. The `sub` must agree with the
//! `kubernetes.io` claim. Every refusal has a bounded [`Refusal`] reason.
//!
//! When a token names a `kid` the key set does not hold, the file is read
//! again (at most every [`RELOAD_INTERVAL`]), so a rotated issuer key is
//! picked up from an updated ConfigMap without a restart.

use std::path::PathBuf;

use custody_context::api::v1;
pub use custody_context::jwks::{JwksError, RELOAD_INTERVAL};
use custody_context::jwks::{JwksFile, KeyRefusal, VerificationKey};
use jsonwebtoken::Validation;
use serde::Deserialize;

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

/// Verifies projected service-account tokens of one issuer.
pub struct WorkloadVerifier {
    config: WorkloadAuthConfig,
    keys: JwksFile,
}

impl std::fmt::Debug for WorkloadVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

impl WorkloadVerifier {
    /// Loads the issuer's JWKS file.
    pub fn load(config: WorkloadAuthConfig) -> Result<Self, JwksError> {
        let keys = JwksFile::load(&config.jwks_file)?;
        Ok(WorkloadVerifier { config, keys })
    }

    /// The trust domain workload callers must claim, if one is configured.
    pub fn trust_domain(&self) -> Option<&str> {
        self.config.trust_domain.as_deref()
    }

    /// The workload a token proves, or why it proves nothing.
    pub fn verify(&self, token: &str) -> Result<WorkloadIdentity, Refusal> {
        if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
            return Err(Refusal::Malformed);
        }
        let VerificationKey { algorithm, key } =
            self.keys.key_for(token).map_err(|refusal| match refusal {
                KeyRefusal::Malformed => Refusal::Malformed,
                KeyRefusal::DisallowedAlgorithm => Refusal::DisallowedAlgorithm,
                KeyRefusal::UnknownKeyId => Refusal::UnknownKeyId,
            })?;
        let mut validation = Validation::new(algorithm);
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
