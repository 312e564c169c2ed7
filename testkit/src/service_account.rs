//! A stand-in for a Kubernetes service-account issuer: a key pair made with
//! the `openssl` command, its JWKS as the API server publishes it at
//! `/openid/v1/jwks`, and projected service-account tokens signed with it.
//!
//! ```no_run
//! use custody_testkit::service_account::{Issuer, KeyKind, Pod};
//!
//! let issuer = Issuer::new(KeyKind::Rsa, "https://kubernetes.default.svc.cluster.local")?;
//! // issuer.jwks_file(): the control plane's `workload_auth.jwks_file`.
//! let token = issuer.token(&Pod::new("shop", "web", "web-0"), "custody", 3600);
//! # Ok::<(), custody_testkit::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::Error;

/// The kind of signing key (Kubernetes issuers use RSA or P-256).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048, RS256.
    Rsa,
    /// P-256, ES256.
    P256,
}

/// A service-account issuer with one key.
pub struct Issuer {
    dir: tempfile::TempDir,
    issuer: String,
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The pod a token is for.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Pod name; `None` for a token not bound to a pod.
    pub pod: Option<String>,
}

impl Pod {
    /// A pod-bound token's subject.
    pub fn new(namespace: &str, service_account: &str, pod: &str) -> Self {
        Pod {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: Some(pod.to_owned()),
        }
    }

    /// The claims of a projected token for this pod (`iat` = `nbf` = `now`).
    pub fn claims(&self, issuer: &str, audience: &str, now: u64, ttl_secs: u64) -> Value {
        let mut k8s = json!({
            "namespace": self.namespace,
            "serviceaccount": { "name": self.service_account, "uid": uid(&self.service_account) },
        });
        if let Some(pod) = &self.pod {
            k8s["pod"] = json!({ "name": pod, "uid": uid(pod) });
        }
        json!({
            "iss": issuer,
            "aud": [audience],
            "exp": now + ttl_secs,
            "iat": now,
            "nbf": now,
            "sub": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account),
            "kubernetes.io": k8s,
        })
    }
}

fn uid(name: &str) -> String {
    let mut n: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        n = (n ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("{n:08x}-0000-4000-8000-000000000000")
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), Error> {
    let command = format!("openssl {}", args.join(" "));
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_owned(),
        source,
    }
}

impl Issuer {
    /// Makes a key of `kind` with a random key id and writes its JWKS.
    pub fn new(kind: KeyKind, issuer: &str) -> Result<Self, Error> {
        let kid = format!("{kind:?}-{:016x}", rand::random::<u64>()).to_lowercase();
        Issuer::with_kid(kind, issuer, &kid)
    }

    /// Makes a key of `kind` under the key id `kid` and writes its JWKS.
    pub fn with_kid(kind: KeyKind, issuer: &str, kid: &str) -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(io("temporary directory"))?;
        let (key, algorithm) = match kind {
            KeyKind::Rsa => {
                openssl(
                    dir.path(),
                    &[
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        "rsa_keygen_bits:2048",
                        "-out",
                        "key.pem",
                    ],
                )?;
                // jsonwebtoken signs with a PKCS#1 DER RSA key.
                openssl(
                    dir.path(),
                    &[
                        "rsa",
                        "-in",
                        "key.pem",
                        "-traditional",
                        "-outform",
                        "DER",
                        "-out",
                        "key.der",
                    ],
                )?;
                let der = std::fs::read(dir.path().join("key.der")).map_err(io("key.der"))?;
                (EncodingKey::from_rsa_der(&der), Algorithm::RS256)
            }
            KeyKind::P256 => {
                openssl(
                    dir.path(),
                    &[
                        "genpkey",
                        "-algorithm",
                        "EC",
                        "-pkeyopt",
                        "ec_paramgen_curve:P-256",
                        "-out",
                        "key.pem",
                    ],
                )?;
                // jsonwebtoken signs with a PKCS#8 DER EC key.
                openssl(
                    dir.path(),
                    &[
                        "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out",
                        "key.der",
                    ],
                )?;
                let der = std::fs::read(dir.path().join("key.der")).map_err(io("key.der"))?;
                (EncodingKey::from_ec_der(&der), Algorithm::ES256)
            }
        };
        let mut jwk = Jwk::from_encoding_key(&key, algorithm)
            .map_err(|e| Error::InvalidOption(format!("key: {e}")))?;
        let kid = kid.to_owned();
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        let set = JwkSet { keys: vec![jwk] };
        let text = serde_json::to_string_pretty(&set)
            .map_err(|e| Error::InvalidOption(format!("jwks: {e}")))?;
        std::fs::write(dir.path().join("jwks.json"), text).map_err(io("jwks.json"))?;
        Ok(Issuer {
            dir,
            issuer: issuer.to_owned(),
            kid,
            algorithm,
            key,
        })
    }

    /// The JWKS file (`/openid/v1/jwks`).
    pub fn jwks_file(&self) -> PathBuf {
        self.dir.path().join("jwks.json")
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key id in the JWKS and in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A projected token for `pod`, for `audience`, valid `ttl_secs` from now.
    pub fn token(&self, pod: &Pod, audience: &str, ttl_secs: u64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.sign(&pod.claims(&self.issuer, audience, now, ttl_secs))
    }

    /// Signs any claims with this issuer's key and key id.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap_or_default()
    }
}
