//! The control-plane policy stream: `custody.v1.PolicyDistribution`.
//!
//! The sidecar subscribes with the version it holds; each `PolicyUpdate`
//! (the first is the current state) is validated and applied (the bundle to
//! the [`PolicyStore`](crate::policy_store::PolicyStore), which persists it;
//! the key set to the verifier, on top of the anchor keys: this sidecar's own
//! and the key-set file's), then
//! acknowledged with the time it took or the reason it was refused. A broken
//! stream is re-established with a capped backoff; meanwhile the last policy
//! stays in force.

use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_context::api::v1;
use custody_context::keys::KeySet;
use custody_context::policy::PolicyBundle;
use v1::policy_distribution_client::PolicyDistributionClient;

use crate::proxy::Shared;

/// Applies one update; `Err` says why it was refused (the previous policy
/// and keys stay in force).
pub fn apply_update(shared: &Shared, update: &v1::PolicyUpdate) -> Result<u64, String> {
    let bundle = update
        .policy
        .as_ref()
        .map(|wire| PolicyBundle::try_from(wire).map_err(|e| format!("policy: {e}")))
        .transpose()?;
    let keys = update
        .keys
        .as_ref()
        .map(|wire| KeySet::try_from(wire).map_err(|e| format!("keys: {e}")))
        .transpose()?;
    if let Some(pushed) = keys {
        // The pushed set joins the anchors (own key, key-set file); it never
        // removes them, so a control plane that does not know a key from the
        // file cannot break chains signed with it.
        let mut keys = (**shared.anchor_keys.load()).clone();
        keys.set_version(pushed.version());
        for key in pushed.keys() {
            if keys.keys().all(|k| k.kid() != key.kid()) {
                keys.insert(key.clone())
                    .map_err(|e| format!("keys: {}: {e}", key.kid()))?;
            }
        }
        shared.verifier.set_keys(keys);
    }
    let version = match bundle {
        Some(bundle) => {
            let version = bundle.version;
            shared.policy.apply(bundle);
            version
        }
        None => shared.policy.current().version,
    };
    Ok(version)
}

/// Follows the policy stream until `stop` turns true.
pub async fn subscribe(
    shared: Arc<Shared>,
    address: String,
    auth: crate::control_auth::ControlPlaneAuth,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let endpoint = match tonic::transport::Endpoint::from_shared(address.clone()) {
        Ok(endpoint) => endpoint.connect_timeout(Duration::from_secs(5)),
        Err(error) => {
            tracing::error!(message = "invalid control-plane address", %address, %error);
            return;
        }
    };
    let mut client = PolicyDistributionClient::with_interceptor(endpoint.connect_lazy(), auth);
    let workload = v1::WorkloadId::from(&shared.workload);
    let mut backoff = Duration::from_millis(200);
    loop {
        let request = v1::SubscribeRequest {
            workload: Some(workload.clone()),
            client_kind: "proxy".into(),
            have_version: shared.policy.current().version,
        };
        let session = async {
            let mut stream = client.subscribe(request).await?.into_inner();
            while let Some(update) = stream.message().await? {
                let started = Instant::now();
                let result = apply_update(&shared, &update);
                let apply_nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let ack = match result {
                    Ok(version) => v1::PolicyAck {
                        workload: Some(workload.clone()),
                        version,
                        apply_nanos,
                        error: String::new(),
                    },
                    Err(error) => {
                        tracing::warn!(message = "policy update refused", %error);
                        v1::PolicyAck {
                            workload: Some(workload.clone()),
                            version: update.policy.as_ref().map_or(0, |p| p.version),
                            apply_nanos,
                            error,
                        }
                    }
                };
                client.clone().acknowledge(ack).await?;
            }
            Ok::<(), tonic::Status>(())
        };
        tokio::select! {
            result = session => {
                match result {
                    Ok(()) => tracing::info!(message = "policy stream ended; resubscribing"),
                    Err(status) => tracing::warn!(message = "policy stream failed; resubscribing", %status),
                }
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
