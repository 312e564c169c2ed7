//! Shared by the integration tests: a config, the real binary or an
//! in-process server, authenticated tonic clients, generated hops.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custody_context::api::v1;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ADMIN: &str = "admin-token-0123456789";
pub const NODE: &str = "node-token-0123456789";

pub fn config_text(dir: &Path) -> String {
    config_text_with(dir, "")
}

/// The test config followed by `extra` YAML lines (e.g. a `store:` section).
pub fn config_text_with(dir: &Path, extra: &str) -> String {
    format!(
        "data_dir: {}\ngrpc_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nsync: full\n\
         tokens:\n  - {{ name: oncall, role: admin, secret: {ADMIN} }}\n  - {{ name: nodes, role: node, secret: {NODE} }}\n\
         assembly: {{ interval_millis: 20 }}\n{extra}",
        dir.display()
    )
}

/// A `store:` section for `pg`, its password in a file in `dir`.
pub fn postgres_store(dir: &Path, pg: &custody_testkit::Postgres) -> String {
    let password_file = dir.join("postgres-password");
    std::fs::write(&password_file, format!("{}\n", pg.password())).unwrap();
    format!(
        "store:\n  backend: postgres\n  postgres: {{ host: {}, port: {}, user: {}, dbname: {}, password_file: {} }}\n",
        pg.host(),
        pg.port(),
        pg.user(),
        pg.database(),
        password_file.display()
    )
}

/// The PostgreSQL store of `pg`, opened directly (to count what the server stored).
pub fn open_postgres(
    dir: &Path,
    pg: &custody_testkit::Postgres,
) -> custody_control::store::PostgresStore {
    let config =
        custody_control::config::Config::parse(&config_text_with(dir, &postgres_store(dir, pg)))
            .unwrap();
    let options = config.store.postgres.unwrap().options().unwrap();
    custody_control::store::PostgresStore::open(&options).unwrap()
}

pub fn config(dir: &Path) -> custody_control::config::Config {
    custody_control::config::Config::parse(&config_text(dir)).unwrap()
}

/// The real `custody-control` binary, killed (SIGKILL) on drop.
pub struct Binary {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Binary {
    pub fn start(dir: &Path) -> Binary {
        Binary::start_with(dir, "")
    }

    /// Started with `extra` YAML after the test config.
    pub fn start_with(dir: &Path, extra: &str) -> Binary {
        let cfg = dir.join("control.yaml");
        std::fs::write(&cfg, config_text_with(dir, extra)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_custody-control"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut grpc = None;
        let mut http = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("grpc=") {
                grpc = Some(a.parse().unwrap());
            }
            if let Some(a) = part.strip_prefix("http=") {
                http = Some(a.parse().unwrap());
            }
        }
        Binary {
            child,
            grpc: grpc.unwrap_or_else(|| panic!("no addresses in {line:?}")),
            http: http.unwrap(),
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

pub async fn ingest(
    addr: SocketAddr,
    token: Option<&str>,
) -> v1::ingest_client::IngestClient<Authed> {
    v1::ingest_client::IngestClient::with_interceptor(
        channel(addr).await,
        Bearer(token.map(str::to_owned)),
    )
}

pub async fn distribution(
    addr: SocketAddr,
    token: Option<&str>,
) -> v1::policy_distribution_client::PolicyDistributionClient<Authed> {
    v1::policy_distribution_client::PolicyDistributionClient::with_interceptor(
        channel(addr).await,
        Bearer(token.map(str::to_owned)),
    )
}

pub async fn trust(addr: SocketAddr, token: Option<&str>) -> v1::trust_client::TrustClient<Authed> {
    v1::trust_client::TrustClient::with_interceptor(
        channel(addr).await,
        Bearer(token.map(str::to_owned)),
    )
}

pub fn workload(sa: &str) -> v1::WorkloadId {
    v1::WorkloadId {
        trust_domain: "td".into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        pod: String::new(),
    }
}

/// A propagated chain of `n` hops (a root inbound hop and nested calls),
/// with event ids `{prefix}-{i}` and chain id from `seed`.
pub fn chain(seed: u64, prefix: &str, n: usize, start: u64) -> Vec<v1::HopEvent> {
    let chain_id = format!("{:016x}{:016x}", seed | 1 << 60, seed + 1);
    let mut hops: Vec<v1::HopEvent> = Vec::new();
    for i in 0..n {
        let span = format!("{:016x}", ((seed << 8) + i as u64 + 1) | (1 << 62));
        let parent = if i == 0 {
            String::new()
        } else {
            hops[i - 1].span_id.clone()
        };
        let sa = ["web", "orders", "payments", "ledger", "search"][i % 5];
        hops.push(v1::HopEvent {
            schema_version: 1,
            event_id: format!("{prefix}-{i}"),
            chain_id: chain_id.clone(),
            span_id: span,
            parent_span_id: parent,
            workload: Some(workload(sa)),
            direction: if i % 2 == 0 {
                v1::Direction::Inbound
            } else {
                v1::Direction::Outbound
            } as i32,
            protocol: v1::Protocol::Http1 as i32,
            operation: format!("GET /{sa}"),
            status: 200,
            initiator: Some(v1::Initiator {
                subject: "alice@example.com".into(),
                kind: v1::InitiatorKind::Human as i32,
                actors: vec!["spiffe://td/ns/shop/sa/agent".into()],
                scope: "orders.read".into(),
            }),
            attribution: Some(v1::Attribution {
                method: v1::AttributionMethod::Propagated as i32,
                confidence: 1.0,
            }),
            context_outcome: v1::ContextOutcome::Propagated as i32,
            start_unix_nanos: start + i as u64 * 10,
            duration_nanos: 1_000_000 - i as u64 * 20,
            ..Default::default()
        });
    }
    hops
}

/// Polls `f` until it returns `Some`, failing after a generous guard.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A blocking HTTP GET with the admin token, as JSON, from async code.
pub async fn get_json(
    base: &str,
    path: &str,
) -> Result<serde_json::Value, custody_control::client::ClientError> {
    let client = custody_control::client::Client::new(base, Some(ADMIN.to_owned()));
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || client.get(&path, &[]))
        .await
        .unwrap()
}
