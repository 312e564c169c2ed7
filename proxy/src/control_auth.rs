//! How the sidecar proves itself to the control plane, on every
//! `custody.v1` call: a static bearer token read once from a file (a mounted
//! secret), or a Kubernetes projected service-account token read again on
//! every call (the kubelet rotates it; registration, renewal, the policy
//! stream and the exporter always present the current one).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::metadata::{Ascii, MetadataValue};

use crate::config::ConfigError;

/// A token file read on every call; the last good token is kept if a read
/// fails (a rotation in progress).
struct Rotating {
    path: PathBuf,
    last: Mutex<MetadataValue<Ascii>>,
}

/// Adds `authorization: Bearer <token>` to control-plane requests; does
/// nothing when no token is configured. `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct ControlPlaneAuth {
    header: Option<MetadataValue<Ascii>>,
    rotating: Option<Arc<Rotating>>,
}

impl std::fmt::Debug for ControlPlaneAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = match (&self.header, &self.rotating) {
            (_, Some(r)) => Some(format!("<read from {}>", r.path.display())),
            (Some(_), None) => Some("<redacted>".to_owned()),
            (None, None) => None,
        };
        f.debug_struct("ControlPlaneAuth")
            .field("token", &token)
            .finish()
    }
}

/// The `authorization` value for the token in `path`, or why not.
fn read_header(path: &Path) -> Result<MetadataValue<Ascii>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token is not printable ASCII".to_owned())
}

impl ControlPlaneAuth {
    /// Reads the token from `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let header = read_header(path).map_err(|message| ConfigError::Field {
            field: "control_plane.token_file".into(),
            message,
        })?;
        Ok(ControlPlaneAuth {
            header: Some(header),
            rotating: None,
        })
    }

    /// Presents the projected service-account token in `path`, read now
    /// (it must be there at start) and again on every call.
    pub fn from_service_account_token_file(path: &Path) -> Result<Self, ConfigError> {
        let header = read_header(path).map_err(|message| ConfigError::Field {
            field: "control_plane.service_account_token_file".into(),
            message,
        })?;
        Ok(ControlPlaneAuth {
            header: None,
            rotating: Some(Arc::new(Rotating {
                path: path.to_owned(),
                last: Mutex::new(header),
            })),
        })
    }

    /// The header to send now.
    fn current(&self) -> Option<MetadataValue<Ascii>> {
        let Some(r) = &self.rotating else {
            return self.header.clone();
        };
        let mut last = r
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match read_header(&r.path) {
            Ok(header) => *last = header,
            Err(error) => tracing::warn!(
                message = "service-account token not re-read; the previous one is presented",
                %error
            ),
        }
        Some(last.clone())
    }

    /// No credentials (a control plane without authentication, tests).
    pub fn none() -> Self {
        ControlPlaneAuth::default()
    }
}

impl tonic::service::Interceptor for ControlPlaneAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = self.current() {
            request.metadata_mut().insert("authorization", header);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    #[test]
    fn adds_the_bearer_token_and_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        let mut auth = ControlPlaneAuth::from_file(&path).unwrap();
        let request = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret-token"
        );
        assert!(!format!("{auth:?}").contains("s3cret"));
        let mut none = ControlPlaneAuth::none();
        assert!(
            none.call(tonic::Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .is_none()
        );
    }

    #[test]
    fn the_service_account_token_is_read_again_on_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first.jwt.sig\n").unwrap();
        let mut auth = ControlPlaneAuth::from_service_account_token_file(&path).unwrap();
        let header = |auth: &mut ControlPlaneAuth| {
            auth.call(tonic::Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(header(&mut auth), "Bearer first.jwt.sig");
        // The kubelet swaps the file: the next call presents the new token.
        std::fs::write(&path, "second.jwt.sig").unwrap();
        assert_eq!(header(&mut auth), "Bearer second.jwt.sig");
        // Mid-rotation the file may be missing: the last token is kept.
        std::fs::remove_file(&path).unwrap();
        let mut clone = auth.clone();
        assert_eq!(header(&mut clone), "Bearer second.jwt.sig");
        assert!(!format!("{auth:?}").contains("second"));
        match ControlPlaneAuth::from_service_account_token_file(&path) {
            Err(ConfigError::Field { field, .. }) => {
                assert_eq!(field, "control_plane.service_account_token_file")
            }
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn refuses_unusable_token_files_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "  \n").unwrap();
        for path in [empty, dir.path().join("missing")] {
            match ControlPlaneAuth::from_file(&path) {
                Err(ConfigError::Field { field, .. }) => {
                    assert_eq!(field, "control_plane.token_file")
                }
                other => panic!("expected a field error, got {other:?}"),
            }
        }
    }
}
