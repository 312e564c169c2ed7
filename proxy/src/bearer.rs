//! Verified bearer JWTs as an identity source: `Authorization: Bearer <jwt>`
//! signed by a configured issuer whose keys are in a JWKS file.
//!
//! The key is found by [`custody_context::jwks`]: only asymmetric algorithms
//! (RS*, PS*, ES256, ES384, EdDSA), the key the header's `kid` names (or the
//! only key), of the header's algorithm, so a token naming HMAC or `none`
//! never verifies; an unknown `kid` reads the file again (rate-limited), so
//! a rotated key is picked up without a restart. `exp` is required; `iss`
//! must equal the configured issuer; `aud` is checked when configured. A
//! token that does not verify is not an identity: the next source is tried.

use std::path::Path;

use custody_context::jwks::{JwksError, JwksFile};
use custody_context::token::InitiatorKind;
use jsonwebtoken::Validation;

/// Verifies bearer JWTs of one issuer.
pub struct BearerVerifier {
    issuer: String,
    audience: Option<String>,
    kind: InitiatorKind,
    keys: JwksFile,
}

impl std::fmt::Debug for BearerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys.key_count())
            .finish()
    }
}

impl BearerVerifier {
    /// Loads the issuer's JWKS file (at least one key).
    pub fn load(
        issuer: &str,
        audience: Option<&str>,
        kind: InitiatorKind,
        jwks_file: &Path,
    ) -> Result<Self, JwksError> {
        Ok(BearerVerifier {
            issuer: issuer.to_owned(),
            audience: audience.map(str::to_owned),
            kind,
            keys: JwksFile::load(jwks_file)?,
        })
    }

    /// The initiator kind this issuer's subjects have.
    pub fn kind(&self) -> InitiatorKind {
        self.kind
    }

    /// The `sub` of a token that verifies, else `None`.
    pub fn verify(&self, token: &str) -> Option<String> {
        let key = self.keys.key_for(token).ok()?;
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.issuer]);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation).ok()?;
        data.claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }
}
