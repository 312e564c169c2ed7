//! Bare pingora, as the benchmarks' floor: a proxy with no Custody logic at
//! all, forwarding everything to one upstream.
//!
//! With a third argument `mint`, it also mints and signs one Txn-Token per
//! request (the sidecar's own `Issuer`, the same claims as an edge-header
//! initiator) and forwards it: the floor of a sidecar that starts a chain
//! per request, since the Ed25519 signature cannot be skipped.
//!
//! Run: `cargo run --release -p custody-proxy --example bare_pingora -- 127.0.0.1:18082 127.0.0.1:18081 [mint]`.

use std::net::SocketAddr;

use async_trait::async_trait;
use custody_context::issue::{Issuer, Mint};
use custody_context::keys::SigningKey;
use custody_context::token::{InitiatorKind, RequestContext};
use custody_context::traceparent::TraceId;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: SocketAddr,
    issuer: Option<Issuer>,
}

impl Bare {
    fn mint(&self) -> Option<String> {
        let issuer = self.issuer.as_ref()?;
        let mint = Mint {
            txn: TraceId::random(),
            sub: "bench".into(),
            kind: InitiatorKind::Human,
            scope: "default".into(),
            act: None,
            tctx: None,
            rctx: Some(RequestContext {
                req_ip: Some("127.0.0.1".into()),
                authn: Some("header".into()),
            }),
            taint: vec![],
        };
        issuer
            .mint(mint, custody_context::unix_now())
            .ok()
            .map(|signed| signed.encoded)
    }
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = Option<String>;

    fn new_ctx(&self) -> Option<String> {
        None
    }

    async fn request_filter(
        &self,
        _session: &mut Session,
        ctx: &mut Option<String>,
    ) -> pingora::Result<bool> {
        *ctx = self.mint();
        Ok(false)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Option<String>,
    ) -> pingora::Result<()> {
        if let Some(token) = ctx.take() {
            upstream_request.insert_header("txn-token", token)?;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Option<String>,
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18082".into());
    let upstream: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18081".into())
        .parse()?;
    let issuer = (args.next().as_deref() == Some("mint")).then(|| {
        Issuer::new(
            SigningKey::from_seed("bench", &[7; 32]),
            "spiffe://bench/ns/bench/sa/bare",
            "bench",
            300,
        )
    });
    let conf = ServerConf {
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service =
        pingora::proxy::http_proxy_service(&server.configuration, Bare { upstream, issuer });
    service.add_tcp(&listen);
    server.add_service(service);
    server.run(pingora::server::RunArgs::default());
    Ok(())
}
