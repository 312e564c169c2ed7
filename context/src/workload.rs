//! Workload identities: who a sidecar, agent or token signer speaks for.
//!
//! A workload is named like a SPIFFE ID, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! The pod is carried alongside but is not part of the URI: pods come and go,
//! the identity stays.

use std::fmt;

/// A workload identity in the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    trust_domain: String,
    namespace: String,
    service_account: String,
    pod: Option<String>,
}

/// Why a workload identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadIdError {
    /// A component is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A component holds a character outside `[a-z0-9._-]`.
    #[error("{0} holds a character outside [a-z0-9._-]")]
    BadCharacter(&'static str),
    /// A component is longer than 253 bytes.
    #[error("{0} is longer than 253 bytes")]
    TooLong(&'static str),
    /// The URI is not of the form `spiffe://<td>/ns/<ns>/sa/<sa>`.
    #[error(
        "not a workload URI of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
    )]
    NotAUri,
}

fn check(part: &'static str, value: &str) -> Result<(), WorkloadIdError> {
    if value.is_empty() {
        return Err(WorkloadIdError::Empty(part));
    }
    if value.len() > 253 {
        return Err(WorkloadIdError::TooLong(part));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(WorkloadIdError::BadCharacter(part));
    }
    Ok(())
}

impl WorkloadId {
    /// A workload identity, checked: lowercase DNS-like components only, so
    /// the URI form never holds `/` or `,` (the `req_wl` separator).
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, WorkloadIdError> {
        check("trust_domain", trust_domain)?;
        check("namespace", namespace)?;
        check("service_account", service_account)?;
        Ok(WorkloadId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: None,
        })
    }

    /// The same identity, running in `pod`.
    pub fn with_pod(mut self, pod: &str) -> Result<Self, WorkloadIdError> {
        check("pod", pod)?;
        self.pod = Some(pod.to_owned());
        Ok(self)
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn parse_uri(uri: &str) -> Result<Self, WorkloadIdError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or(WorkloadIdError::NotAUri)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                WorkloadId::new(td, ns, sa)
            }
            _ => Err(WorkloadIdError::NotAUri),
        }
    }

    /// The trust domain, which is also the audience of the mesh's tokens.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The pod, when known.
    pub fn pod(&self) -> Option<&str> {
        self.pod.as_deref()
    }

    /// The URI form used in `req_wl` and key bindings.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = WorkloadId::new("cluster.local", "shop", "orders").unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(WorkloadId::parse_uri(&id.uri()).unwrap(), id);
    }

    #[test]
    fn refuses_bad_components() {
        assert_eq!(
            WorkloadId::new("", "a", "b"),
            Err(WorkloadIdError::Empty("trust_domain"))
        );
        assert_eq!(
            WorkloadId::new("td", "a,b", "c"),
            Err(WorkloadIdError::BadCharacter("namespace"))
        );
        assert_eq!(
            WorkloadId::new("td", "a", "B"),
            Err(WorkloadIdError::BadCharacter("service_account"))
        );
        for bad in [
            "http://td/ns/a/sa/b",
            "spiffe://td/ns/a/sa",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/xx/a/sa/b",
        ] {
            assert_eq!(
                WorkloadId::parse_uri(bad),
                Err(WorkloadIdError::NotAUri),
                "{bad}"
            );
        }
    }

    #[test]
    fn pod_is_not_part_of_the_uri() {
        let id = WorkloadId::new("td", "ns", "sa")
            .unwrap()
            .with_pod("web-7d9f")
            .unwrap();
        assert_eq!(id.pod(), Some("web-7d9f"));
        assert_eq!(id.uri(), "spiffe://td/ns/ns/sa/sa");
    }
}
