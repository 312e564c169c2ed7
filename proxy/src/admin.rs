//! The admin listener: `/metrics`, `/live`, `/ready`, `/policy`, `/keys`.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus_client::registry::Registry;

use crate::proxy::Shared;
use crate::trust::KeySetFile;

/// Serves the admin endpoints.
#[derive(Debug)]
pub struct Admin {
    shared: Arc<Shared>,
    registry: Registry,
}

impl Admin {
    /// The admin app, with its metrics registered.
    pub fn new(shared: Arc<Shared>) -> Self {
        let mut registry = Registry::default();
        shared.metrics.register(&mut registry);
        Admin { shared, registry }
    }

    fn render(&self, path: &str) -> (u16, &'static str, Vec<u8>) {
        match path {
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => (
                        200,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text.into_bytes(),
                    ),
                    Err(_) => (500, "text/plain", b"cannot encode metrics\n".to_vec()),
                }
            }
            "/live" | "/ready" => (200, "text/plain", b"ok\n".to_vec()),
            "/policy" => {
                let bundle = self.shared.policy.current();
                let body = serde_json::to_vec_pretty(&*bundle).unwrap_or_default();
                (200, "application/json", body)
            }
            "/keys" => {
                let keys = KeySetFile::from_key_set(&self.shared.verifier.keys());
                let body = serde_json::to_vec_pretty(&keys).unwrap_or_default();
                (200, "application/json", body)
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        let (status, content_type, body) = self.render(&path);
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .unwrap_or_default()
    }
}
