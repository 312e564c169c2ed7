//! `custody-context`: the identity-context contract every Custody component
//! speaks.
//!
//! - [`token`]: the `Txn-Token` claims (Transaction Tokens draft, RFC 8693
//!   `act`, and Custody's `custody` claim: initiator kind, taint, per-hop
//!   attribution).
//! - [`keys`], [`issue`], [`verify`]: Ed25519 keys and key sets with rotation
//!   and revocation; minting and replacement tokens; verification that refuses
//!   with a typed reason and caches what it verified.
//! - [`traceparent`]: W3C Trace Context.
//! - [`workload`]: workload identities.
//! - [`hop`], [`policy`]: the hop events and egress policies exchanged by
//!   sidecars, node agents and the control plane.
//! - [`api`]: the control-plane gRPC API (`custody.v1`).
//! - [`jwks`]: keys of foreign JWT issuers (a JWKS file) and the asymmetric
//!   algorithms accepted from them, for every verifier of tokens Custody
//!   does not mint.
//!
//! Nothing here does I/O beyond reading the clock and the random source,
//! except [`jwks`], which reads the JWKS file it is given.
//!
//! ```
//! use custody_context::{issue, keys, token, traceparent, verify};
//!
//! let key = keys::SigningKey::generate();
//! let mut set = keys::KeySet::new();
//! set.insert(key.public_key()).unwrap();
//! let issuer = issue::Issuer::new(key, "spiffe://td/ns/shop/sa/web", "td", 300);
//! let now = 1_700_000_000;
//! let minted = issuer
//!     .mint(
//!         issue::Mint {
//!             txn: traceparent::TraceId::random(),
//!             sub: "alice@example.com".into(),
//!             kind: token::InitiatorKind::Human,
//!             scope: "orders.read".into(),
//!             act: None,
//!             tctx: None,
//!             rctx: None,
//!             taint: vec![],
//!         },
//!         now,
//!     )
//!     .unwrap();
//! let verifier = verify::Verifier::new(verify::VerifierConfig::new("td"), set);
//! let verified = verifier.verify(&minted.encoded, now).unwrap();
//! assert_eq!(verified.claims.sub, "alice@example.com");
//! ```

pub mod api;
pub mod hop;
pub mod issue;
pub mod jwks;
pub mod keys;
pub mod policy;
pub mod token;
pub mod traceparent;
pub mod verify;
pub mod workload;

/// The current Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
