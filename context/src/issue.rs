//! Issuing tokens: minting a chain's first token, and replacement tokens as
//! the chain crosses workloads.
//!
//! Following the Transaction Tokens draft, a workload never edits a token it
//! received: its sidecar issues a replacement that keeps `txn`, `sub`, `aud`,
//! `scope`, `tctx` and `rctx`, appends itself to `req_wl` with how it was
//! attributed, adds the taint it saw, and signs with its own key.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::keys::SigningKey;
use crate::token::{
    Actor, CUSTODY_CLAIMS_VERSION, CustodyClaims, HopAttribution, InitiatorKind, RequestContext,
    TOKEN_TYPE, TxnClaims,
};
use crate::traceparent::TraceId;
use crate::verify::{DEFAULT_MAX_TOKEN_BYTES, VerifiedToken};

/// Why a token could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The encoded token would exceed the size limit (the chain is too long
    /// or carries too much context).
    #[error("token would be {0} bytes, over the limit")]
    TooLarge(usize),
    /// The prior token is already expired at `now`.
    #[error("prior token has expired")]
    PriorExpired,
    /// The subject or scope is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
}

/// A signed, encoded token and the claims it carries.
///
/// `Debug` never shows the encoded token: tokens are not logged verbatim.
#[derive(Clone, PartialEq)]
pub struct SignedToken {
    /// The compact JWS, the value of the `Txn-Token` header.
    pub encoded: String,
    /// The claims inside.
    pub claims: TxnClaims,
}

impl SignedToken {
    /// SHA-256 of the encoded token, the same digest a verifier records.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.encoded.as_bytes()).into()
    }
}

impl fmt::Debug for SignedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedToken")
            .field("len", &self.encoded.len())
            .field("claims", &self.claims)
            .finish()
    }
}

/// Everything needed to start a chain.
#[derive(Clone, Debug)]
pub struct Mint {
    /// The chain id (the trace id of the inbound request, or a fresh one).
    pub txn: TraceId,
    /// The initiator.
    pub sub: String,
    /// What kind of initiator.
    pub kind: InitiatorKind,
    /// The purpose.
    pub scope: String,
    /// The acting party, when an agent acts for the initiator.
    pub act: Option<Actor>,
    /// Immutable authorization context.
    pub tctx: Option<serde_json::Map<String, serde_json::Value>>,
    /// Requester context.
    pub rctx: Option<RequestContext>,
    /// Data classes already touched (usually none).
    pub taint: Vec<String>,
}

/// What a workload adds when it extends a chain.
#[derive(Clone, Debug)]
pub struct Extension {
    /// How this workload tied its hop to the chain.
    pub attribution: HopAttribution,
    /// Data classes this workload saw the chain touch.
    pub taint: Vec<String>,
    /// A new actor, when this workload delegates (an agent to a sub-agent):
    /// it becomes the current actor and the previous one nests inside it.
    pub delegate_to: Option<String>,
}

impl Extension {
    /// An extension with the given attribution, no taint and no delegation.
    pub fn new(attribution: HopAttribution) -> Self {
        Extension {
            attribution,
            taint: Vec::new(),
            delegate_to: None,
        }
    }
}

/// Issues tokens for one workload, with that workload's key.
pub struct Issuer {
    key: SigningKey,
    workload: String,
    audience: String,
    ttl_secs: u64,
    max_token_bytes: usize,
    /// The encoded header, the same for every token this issuer signs.
    header_b64: String,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("kid", &self.key.kid())
            .field("workload", &self.workload)
            .field("audience", &self.audience)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

impl Issuer {
    /// An issuer for `workload_uri` in the trust domain `audience`; tokens
    /// live `ttl_secs` at most.
    pub fn new(
        key: SigningKey,
        workload_uri: impl Into<String>,
        audience: impl Into<String>,
        ttl_secs: u64,
    ) -> Self {
        let header = HeaderOut {
            alg: "EdDSA",
            typ: TOKEN_TYPE,
            kid: key.kid(),
        };
        // Serializing three string fields cannot fail.
        let header_json = serde_json::to_vec(&header).unwrap_or_default();
        Issuer {
            header_b64: URL_SAFE_NO_PAD.encode(header_json),
            key,
            workload: workload_uri.into(),
            audience: audience.into(),
            ttl_secs,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }

    /// Limits the size of the tokens issued (the verifiers' limit).
    pub fn with_max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }

    /// The key id tokens are signed with.
    pub fn kid(&self) -> &str {
        self.key.kid()
    }

    /// The workload URI this issuer speaks for.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// Starts a chain: the first token, naming this workload as the first in `req_wl`.
    pub fn mint(&self, mint: Mint, now: u64) -> Result<SignedToken, IssueError> {
        if mint.sub.is_empty() {
            return Err(IssueError::Empty("sub"));
        }
        if mint.scope.is_empty() {
            return Err(IssueError::Empty("scope"));
        }
        let claims = TxnClaims {
            iss: Some(self.workload.clone()),
            iat: now,
            exp: now.saturating_add(self.ttl_secs),
            aud: vec![self.audience.clone()],
            txn: mint.txn,
            sub: mint.sub,
            scope: mint.scope,
            req_wl: vec![self.workload.clone()],
            tctx: mint.tctx,
            rctx: mint.rctx,
            act: mint.act,
            custody: CustodyClaims {
                v: CUSTODY_CLAIMS_VERSION,
                ini: mint.kind,
                taint: mint.taint.into_iter().collect(),
                att: vec![HopAttribution::MINTED],
            },
        };
        self.sign(claims)
    }

    /// Issues the replacement of a verified token: this workload appended to
    /// `req_wl`, taint added, delegation applied. The lifetime never grows
    /// past the prior token's.
    pub fn extend(
        &self,
        prior: &VerifiedToken,
        extension: Extension,
        now: u64,
    ) -> Result<SignedToken, IssueError> {
        let prior = &prior.claims;
        if now >= prior.exp {
            return Err(IssueError::PriorExpired);
        }
        let mut claims = prior.clone();
        claims.iss = Some(self.workload.clone());
        claims.iat = now;
        claims.exp = prior.exp.min(now.saturating_add(self.ttl_secs));
        claims.req_wl.push(self.workload.clone());
        claims.custody.att.push(extension.attribution);
        claims.custody.taint.extend(extension.taint);
        if let Some(sub) = extension.delegate_to {
            claims.act = Some(Actor {
                sub,
                iss: None,
                act: claims.act.take().map(Box::new),
            });
        }
        self.sign(claims)
    }

    /// Re-signs a token this workload issued with more taint: the data
    /// classes the chain touched here after the token was issued. Nothing
    /// else changes (`req_wl` already ends with this workload); the lifetime
    /// never grows.
    pub fn retaint(
        &self,
        prior: &VerifiedToken,
        taint: impl IntoIterator<Item = String>,
        now: u64,
    ) -> Result<SignedToken, IssueError> {
        let prior = &prior.claims;
        if now >= prior.exp {
            return Err(IssueError::PriorExpired);
        }
        let mut claims = prior.clone();
        claims.iss = Some(self.workload.clone());
        claims.iat = now;
        claims.custody.taint.extend(taint);
        self.sign(claims)
    }

    fn sign(&self, claims: TxnClaims) -> Result<SignedToken, IssueError> {
        // Serializing claims made of strings, numbers and maps cannot fail.
        let claims_json = serde_json::to_vec(&claims).unwrap_or_default();
        let claims_len = base64::encoded_len(claims_json.len(), false).unwrap_or(usize::MAX);
        let total = self.header_b64.len() + 1 + claims_len + 1 + 86;
        if total > self.max_token_bytes {
            return Err(IssueError::TooLarge(total));
        }
        let mut encoded = String::with_capacity(total);
        encoded.push_str(&self.header_b64);
        encoded.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims_json, &mut encoded);
        let signature = self.key.sign(encoded.as_bytes());
        encoded.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut encoded);
        Ok(SignedToken { encoded, claims })
    }
}
