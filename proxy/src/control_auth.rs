//! How the sidecar proves itself to the control plane: a bearer token,
//! read from a file (a mounted secret), on every `custody.v1` call.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};

use crate::config::ConfigError;

/// Adds `authorization: Bearer <token>` to control-plane requests; does
/// nothing when no token is configured. `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct ControlPlaneAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for ControlPlaneAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneAuth")
            .field("token", &self.header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ControlPlaneAuth {
    /// Reads the token from `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let field = |message: String| ConfigError::Field {
            field: "control_plane.token_file".into(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| field(format!("cannot read {}: {e}", path.display())))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(field(format!("{} is empty", path.display())));
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| field("the token is not printable ASCII".into()))?;
        Ok(ControlPlaneAuth {
            header: Some(header),
        })
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
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
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
