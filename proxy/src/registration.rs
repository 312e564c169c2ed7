//! Signing keys issued by the control plane (`custody.v1.Trust`).
//!
//! With `signing.register`, the sidecar generates an Ed25519 key, sends the
//! public half with its workload identity to `Trust.IssueSigningKey`, and
//! signs with the key id the control plane assigns. The control plane binds
//! the key to the workload for a bounded lifetime and pushes it in the key
//! set to every sidecar, so tokens this sidecar signs verify mesh-wide
//! without a key-set file. The private key never leaves the process.
//!
//! The key is renewed at two thirds of its lifetime: a new key is registered,
//! joins this sidecar's anchors and verifier, and signs from then on; the
//! old key stays trusted until it expires, so tokens in flight keep
//! verifying.

use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_context::api::v1;
use custody_context::keys::{PublicKey, SigningKey};
use custody_context::workload::WorkloadId;
use v1::trust_client::TrustClient;

use crate::control_auth::ControlPlaneAuth;
use crate::proxy::Shared;

/// A key the control plane granted.
#[derive(Debug)]
pub struct Granted {
    /// The signing key, under the granted key id.
    pub key: SigningKey,
    /// Its public half, bound to the workload for the granted window.
    pub public: PublicKey,
    /// End of the window, Unix seconds.
    pub not_after: u64,
}

fn random_seed() -> [u8; 32] {
    use rand::RngCore as _;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}

/// Registers a fresh key (or the key of `seed`), retrying until `deadline`.
pub async fn register(
    address: &str,
    auth: ControlPlaneAuth,
    workload: &WorkloadId,
    seed: Option<[u8; 32]>,
    deadline: Instant,
) -> Result<Granted, String> {
    let seed = seed.unwrap_or_else(random_seed);
    let probe = SigningKey::from_seed("pending", &seed);
    let endpoint = tonic::transport::Endpoint::from_shared(address.to_owned())
        .map_err(|e| format!("signing.register: invalid control-plane address {address}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let mut client = TrustClient::with_interceptor(endpoint.connect_lazy(), auth);
    let request = v1::SigningKeyRequest {
        workload: Some(workload.into()),
        ed25519: probe.public_key().bytes().to_vec(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.issue_signing_key(request.clone()).await {
            Ok(grant) => {
                let grant = grant.into_inner();
                let key = SigningKey::from_seed(grant.key_id.clone(), &seed);
                let public = key
                    .public_key()
                    .bound_to(workload.uri())
                    .valid_between(grant.not_before_unix, grant.not_after_unix);
                tracing::info!(
                    message = "signing key issued by the control plane",
                    kid = %grant.key_id,
                    not_after = grant.not_after_unix
                );
                return Ok(Granted {
                    key,
                    public,
                    not_after: grant.not_after_unix,
                });
            }
            // A refusal is final: retrying cannot change the answer.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                ) =>
            {
                return Err(format!(
                    "signing.register: the control plane refused the key: {}",
                    status.message()
                ));
            }
            Err(status) => {
                if Instant::now() + backoff > deadline {
                    return Err(format!(
                        "signing.register: control plane at {address} unreachable: {}",
                        status.message()
                    ));
                }
                tracing::info!(message = "signing-key registration failed; retrying", %status);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Registers from synchronous code (building the sidecar), on a thread of
/// its own so it works inside or outside a runtime.
pub fn register_blocking(
    address: String,
    auth: ControlPlaneAuth,
    workload: WorkloadId,
    seed: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<Granted, String> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("signing.register: {e}"))?;
        runtime.block_on(register(
            &address,
            auth,
            &workload,
            seed,
            Instant::now() + timeout,
        ))
    })
    .join()
    .map_err(|_| "signing.register: registration thread failed".to_owned())?
}

/// Seconds from `now` until a key valid until `not_after` is renewed: two
/// thirds of the way through what is left, at least one second.
pub fn renew_in(now: u64, not_after: u64) -> Duration {
    Duration::from_secs((not_after.saturating_sub(now) * 2 / 3).max(1))
}

/// Starts signing with a newly granted key: it joins the anchors and the
/// verifier's keys first, so the first token it signs already verifies here.
pub fn install(shared: &Shared, granted: Granted) {
    let mut anchors = (**shared.anchor_keys.load()).clone();
    let mut current = (*shared.verifier.keys()).clone();
    for set in [&mut anchors, &mut current] {
        if set.keys().all(|k| k.kid() != granted.public.kid())
            && let Err(error) = set.insert(granted.public.clone())
        {
            tracing::warn!(message = "cannot trust the renewed key", %error);
            return;
        }
    }
    shared.anchor_keys.store(Arc::new(anchors));
    shared.verifier.set_keys(current);
    let issuer = shared.issuer.load();
    shared
        .issuer
        .store(Arc::new(custody_context::issue::Issuer::new(
            granted.key,
            issuer.workload().to_owned(),
            shared.config.workload.trust_domain.clone(),
            shared.config.signing.token_ttl_secs.unwrap_or(300),
        )));
}

/// Renews the signing key before it expires, until `stop`.
pub async fn renew(
    shared: Arc<Shared>,
    address: String,
    auth: ControlPlaneAuth,
    mut not_after: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let wait = renew_in(custody_context::unix_now(), not_after);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        // Try until the current key expires; past that, keep trying anyway.
        let deadline = Instant::now()
            + Duration::from_secs(not_after.saturating_sub(custody_context::unix_now()).max(5));
        let attempt = register(&address, auth.clone(), &shared.workload, None, deadline);
        tokio::select! {
            result = attempt => match result {
                Ok(granted) => {
                    not_after = granted.not_after;
                    install(&shared, granted);
                }
                Err(error) => {
                    tracing::warn!(message = "signing key not renewed", %error);
                    not_after = custody_context::unix_now() + 15;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_two_thirds_into_the_remaining_lifetime() {
        assert_eq!(renew_in(1000, 4600), Duration::from_secs(2400));
        assert_eq!(renew_in(1000, 1000), Duration::from_secs(1));
        assert_eq!(renew_in(5000, 1000), Duration::from_secs(1));
    }
}
