//! Verified bearer JWTs as an identity source: `Authorization: Bearer <jwt>`
//! signed by a configured issuer whose keys are in a JWKS file.
//!
//! Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA), and the
//! key must match the header's `kid` (or be the only key): a token naming
//! HMAC or `none` never verifies. `exp` is required; `iss` must equal the
//! configured issuer; `aud` is checked when configured. A token that does not
//! verify is not an identity: the next source is tried.

use std::path::{Path, PathBuf};

use custody_context::token::InitiatorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Why a JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BearerError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a JWKS.
    #[error("{path}: not a JWKS: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
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

/// Verifies bearer JWTs of one issuer.
pub struct BearerVerifier {
    issuer: String,
    audience: Option<String>,
    kind: InitiatorKind,
    keys: JwkSet,
}

impl std::fmt::Debug for BearerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys.keys.len())
            .finish()
    }
}

impl BearerVerifier {
    /// Loads the issuer's JWKS file.
    pub fn load(
        issuer: &str,
        audience: Option<&str>,
        kind: InitiatorKind,
        jwks_file: &Path,
    ) -> Result<Self, BearerError> {
        let text = std::fs::read_to_string(jwks_file).map_err(|source| BearerError::Read {
            path: jwks_file.to_owned(),
            source,
        })?;
        let keys: JwkSet = serde_json::from_str(&text).map_err(|e| BearerError::Parse {
            path: jwks_file.to_owned(),
            message: e.to_string(),
        })?;
        Ok(BearerVerifier {
            issuer: issuer.to_owned(),
            audience: audience.map(str::to_owned),
            kind,
            keys,
        })
    }

    /// The initiator kind this issuer's subjects have.
    pub fn kind(&self) -> InitiatorKind {
        self.kind
    }

    /// The `sub` of a token that verifies, else `None`.
    pub fn verify(&self, token: &str) -> Option<String> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !ASYMMETRIC.contains(&header.alg) {
            return None;
        }
        let jwk = match &header.kid {
            Some(kid) => self.keys.find(kid)?,
            None if self.keys.keys.len() == 1 => self.keys.keys.first()?,
            None => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).ok()?;
        data.claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }
}
