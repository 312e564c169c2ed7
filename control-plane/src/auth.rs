//! Bearer-token authentication for every API.
//!
//! Static tokens come from the configuration; a presented token is compared
//! with every configured secret in constant time, so neither the match nor
//! its position leaks through timing. With `workload_auth` configured, a
//! bearer that is no static token is verified as a Kubernetes projected
//! service-account token ([`crate::workload_auth`]): the caller is then a
//! [`Role::Workload`] bound to the namespace, service account and pod the
//! token proves.

use subtle::ConstantTimeEq as _;

use crate::config::{Role, Token};
use crate::workload_auth::{Refusal, WorkloadIdentity, WorkloadVerifier};

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, or the workload's Kubernetes user name
    /// (`system:serviceaccount:<ns>:<sa>`): recorded in the audit log.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The workload a workload token proves (`Role::Workload` only).
    pub workload: Option<WorkloadIdentity>,
}

/// Why a caller was not authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not a known static token, and not a token workload authentication
    /// could check (none configured, or not a JWT).
    UnknownToken,
    /// A workload token that does not verify.
    Workload(Refusal),
}

impl AuthError {
    /// A bounded metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::UnknownToken => "unknown_token",
            AuthError::Workload(r) => r.as_str(),
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => f.write_str("a bearer token is required"),
            AuthError::UnknownToken => f.write_str("the bearer token is not known"),
            AuthError::Workload(r) => write!(f, "workload token refused: {}", r.as_str()),
        }
    }
}

/// The accepted tokens.
#[derive(Debug)]
pub struct Authenticator {
    tokens: Vec<Token>,
    workload: Option<WorkloadVerifier>,
}

impl Authenticator {
    /// Accepts these static tokens and, when given, workload tokens.
    pub fn new(tokens: Vec<Token>, workload: Option<WorkloadVerifier>) -> Self {
        Authenticator { tokens, workload }
    }

    /// Whether workload tokens are accepted.
    pub fn workload_auth(&self) -> Option<&WorkloadVerifier> {
        self.workload.as_ref()
    }

    /// The caller presenting `authorization` (an `Authorization` header
    /// value), or why it is not one.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, AuthError> {
        let presented = authorization.ok_or(AuthError::Missing)?;
        let secret = presented
            .strip_prefix(b"Bearer ")
            .or_else(|| presented.strip_prefix(b"bearer "))
            .ok_or(AuthError::Missing)?;
        if secret.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.secret.as_slice().ct_eq(secret)) && found.is_none() {
                found = Some(Caller {
                    name: token.name.clone(),
                    role: token.role,
                    workload: None,
                });
            }
        }
        if let Some(caller) = found {
            return Ok(caller);
        }
        let (Some(verifier), Ok(jwt)) = (&self.workload, std::str::from_utf8(secret)) else {
            return Err(AuthError::UnknownToken);
        };
        if jwt.split('.').count() != 3 {
            return Err(AuthError::UnknownToken);
        }
        let identity = verifier.verify(jwt).map_err(AuthError::Workload)?;
        Ok(Caller {
            name: identity.subject(),
            role: Role::Workload,
            workload: Some(identity),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_bearer_tokens_pass() {
        let auth = Authenticator::new(
            vec![
                Token {
                    name: "oncall".into(),
                    role: Role::Admin,
                    secret: b"s3cret-admin-token".to_vec(),
                },
                Token {
                    name: "nodes".into(),
                    role: Role::Node,
                    secret: b"s3cret-node-token".to_vec(),
                },
            ],
            None,
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-node-token")),
            Ok(Caller {
                name: "nodes".into(),
                role: Role::Node,
                workload: None,
            })
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-admin-token"))
                .map(|c| c.role),
            Ok(Role::Admin)
        );
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some(b"s3cret-node-token")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-node-toke")),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(auth.authenticate(Some(b"Bearer ")), Err(AuthError::Missing));
        // Without workload authentication a JWT is just an unknown token.
        assert_eq!(
            auth.authenticate(Some(b"Bearer e30.e30.c2ln")),
            Err(AuthError::UnknownToken)
        );
    }
}
