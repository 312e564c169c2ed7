//! Bearer-token authentication for every API.
//!
//! Tokens are static, from the configuration; a presented token is compared
//! with every configured secret in constant time, so neither the match nor
//! its position leaks through timing.

use subtle::ConstantTimeEq as _;

use crate::config::{Role, Token};

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: recorded in the audit log.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// The accepted tokens.
#[derive(Clone, Debug)]
pub struct Authenticator {
    tokens: Vec<Token>,
}

impl Authenticator {
    /// Accepts these tokens.
    pub fn new(tokens: Vec<Token>) -> Self {
        Authenticator { tokens }
    }

    /// The caller presenting `authorization` (an `Authorization` header
    /// value), if its bearer token is known.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        let presented = authorization?;
        let secret = presented
            .strip_prefix(b"Bearer ")
            .or_else(|| presented.strip_prefix(b"bearer "))?;
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.secret.as_slice().ct_eq(secret)) && found.is_none() {
                found = Some(Caller {
                    name: token.name.clone(),
                    role: token.role,
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_bearer_tokens_pass() {
        let auth = Authenticator::new(vec![
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
        ]);
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-node-token")),
            Some(Caller {
                name: "nodes".into(),
                role: Role::Node
            })
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-admin-token"))
                .map(|c| c.role),
            Some(Role::Admin)
        );
        assert_eq!(auth.authenticate(None), None);
        assert_eq!(auth.authenticate(Some(b"s3cret-node-token")), None);
        assert_eq!(auth.authenticate(Some(b"Bearer s3cret-node-toke")), None);
        assert_eq!(auth.authenticate(Some(b"Bearer ")), None);
    }
}
