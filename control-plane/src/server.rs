//! Wiring: opens the store, loads the root key and the policy in force,
//! binds the gRPC and HTTP listeners, and runs the background jobs
//! (assembly, retention, store size).
//!
//! ```text
//! sidecars, agents ──gRPC──▶ Ingest ──▶ Store ◀── Assembler (dirty chains)
//!                  ◀─stream─ PolicyDistribution ◀── PolicyCenter ◀── HTTP /v1/policies, /v1/contain
//!                  ──gRPC──▶ Trust (signing keys → key set → every subscriber)
//! operators, CLI   ──HTTP──▶ /v1/chains, /v1/blast-radius ──▶ Store
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::assembler::{ASSEMBLY_NICE, Assembler, Background, Dirty};
use crate::assembly::ChainSummary;
use crate::auth::{AuthError, Authenticator, Caller};
use crate::config::{Config, ConfigError};
use crate::distribution::PolicyCenter;
use crate::metrics::{AuthRefusedLabels, Metrics};
use crate::store::{PostgresStore, Retention, SqliteOptions, SqliteStore, Store, StoreError};
use crate::trust::{Trust, TrustError};
use crate::{config, unix_nanos};

/// What every handler shares.
pub struct Shared {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Token checks.
    pub auth: Authenticator,
    /// The policy in force.
    pub policy: PolicyCenter,
    /// Keys.
    pub trust: Trust,
    /// Chains waiting for assembly.
    pub dirty: Arc<Dirty>,
    /// Newly assembled chains, for streaming.
    pub chain_updates: broadcast::Sender<Arc<ChainSummary>>,
    /// Becomes `true` when the server stops: long streams end.
    pub stopping: watch::Receiver<bool>,
    clients: Mutex<HashMap<String, &'static str>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Remembers the kind a client subscribed as.
    pub fn remember_client(&self, client: String, kind: &'static str) {
        let mut map = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(client, kind);
    }

    /// The caller presenting `authorization`; a refusal is logged and
    /// counted under `api` (`grpc` or `http`).
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        api: &'static str,
    ) -> Result<Caller, AuthError> {
        self.auth.authenticate(authorization).inspect_err(|e| {
            self.refused(api, e.as_str());
            if matches!(e, AuthError::Workload(_)) {
                tracing::warn!(api, reason = e.as_str(), "workload token refused");
            } else {
                tracing::debug!(api, reason = e.as_str(), "caller not authenticated");
            }
        })
    }

    /// Counts a refused caller.
    pub fn refused(&self, api: &'static str, reason: &'static str) {
        self.metrics
            .auth_refused
            .get_or_create(&AuthRefusedLabels { api, reason })
            .inc();
    }

    /// The kind a client subscribed as (`other` if unknown).
    pub fn client_kind(&self, client: &str) -> String {
        let map = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(client).copied().unwrap_or("other").to_owned()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The root key could not be loaded.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The HTTPS certificate could not be loaded.
    #[error("https: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The assembly thread could not be started.
    #[error("assembly thread: {0}")]
    Thread(std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// Where HTTPS listens, when configured.
    pub https_addr: Option<SocketAddr>,
    /// The shared state (for tests and embedding).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets requests in flight finish, and waits.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the server.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let tokens = config.tokens()?;
    let workload_auth = match &config.workload_auth {
        Some(w) => Some(
            crate::workload_auth::WorkloadVerifier::load(w.clone()).map_err(|e| {
                ConfigError::Field {
                    field: "workload_auth.jwks_file".into(),
                    message: e.to_string(),
                }
            })?,
        ),
        None => None,
    };
    let data_dir = config.data_dir.clone();
    let sync_full = config.sync == config::SyncMode::Full;
    let postgres = match (config.store.backend, &config.store.postgres) {
        (config::Backend::Postgres, Some(pg)) => Some(pg.options()?),
        (config::Backend::Postgres, None) => {
            return Err(ConfigError::Field {
                field: "store.postgres".into(),
                message: "required with backend: postgres".into(),
            }
            .into());
        }
        (config::Backend::Sqlite, _) => None,
    };
    let store: Arc<dyn Store> = tokio::task::spawn_blocking(move || {
        Ok::<Arc<dyn Store>, StoreError>(match postgres {
            Some(options) => Arc::new(PostgresStore::open(&options)?),
            None => Arc::new(SqliteStore::open(&SqliteOptions {
                data_dir,
                sync_full,
            })?),
        })
    })
    .await
    .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
    let root = crate::trust::load_or_create_root(&config.data_dir)?;
    let trust = Trust::new(root, store.clone(), config.trust.signing_key_ttl_secs);
    let keys = trust.key_set(custody_context::unix_now())?;
    let policy = PolicyCenter::load(store.clone(), keys)?;
    let metrics = Arc::new(Metrics::new());
    let dirty = Arc::new(Dirty::default());
    // Resume the assembly of what was acknowledged before a stop or crash.
    let s = store.clone();
    let pending = tokio::task::spawn_blocking(move || s.pending_chains(u32::MAX))
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
    if !pending.is_empty() {
        tracing::info!(chains = pending.len(), "resuming assembly");
        dirty.mark(pending);
    }
    let (chain_updates, _) = broadcast::channel(1024);
    let (shutdown, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        store: store.clone(),
        metrics: metrics.clone(),
        auth: Authenticator::new(tokens, workload_auth),
        policy,
        trust,
        dirty: dirty.clone(),
        chain_updates: chain_updates.clone(),
        stopping: stop.clone(),
        clients: Mutex::new(HashMap::new()),
    });
    tracing::info!(root_key = shared.trust.root_kid(), "trust root loaded");

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let grpc_listener = bind(config.grpc_listen).await?;
    let http_listener = bind(config.http_listen).await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut tasks = Vec::new();
    let (ingest, distribution, trust_svc) = crate::grpc::services(&shared);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
    let grpc_stop = stopped(stop.clone());
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(ingest)
            .add_service(distribution)
            .add_service(trust_svc)
            .serve_with_incoming_shutdown(incoming, grpc_stop)
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "gRPC server failed");
        }
    }));
    let mut app = crate::http::router(shared.clone());
    if let Some(inject) = &config.inject {
        app = app.merge(crate::http::inject_router(Arc::new(inject.clone())));
    }
    let https_addr = match &config.https {
        Some(https) => {
            let cert = Arc::new(crate::tls::ReloadingCert::new(
                &https.cert_file,
                &https.key_file,
            )?);
            let tls = crate::tls::server_config(cert)?;
            let tcp = bind(https.listen).await?;
            let listener =
                crate::tls::TlsListener::new(tcp, tls).map_err(|source| StartError::Bind {
                    addr: https.listen,
                    source,
                })?;
            let addr = axum::serve::Listener::local_addr(&listener).ok();
            let app = app.clone();
            let https_stop = stopped(stop.clone());
            tasks.push(tokio::spawn(async move {
                let result = axum::serve(listener, app)
                    .with_graceful_shutdown(https_stop)
                    .await;
                if let Err(error) = result {
                    tracing::error!(%error, "HTTPS server failed");
                }
            }));
            addr
        }
        None => None,
    };
    let http_stop = stopped(stop.clone());
    tasks.push(tokio::spawn(async move {
        let result = axum::serve(http_listener, app)
            .with_graceful_shutdown(http_stop)
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "HTTP server failed");
        }
    }));

    // Assembly.
    let assembler = Arc::new(Assembler::new(
        store.clone(),
        metrics.clone(),
        dirty.clone(),
        chain_updates,
        config.assembly.max_request_secs,
    ));
    let interval = Duration::from_millis(config.assembly.interval_millis);
    let mut stop_rx = stop.clone();
    let background =
        Background::spawn("custody-assembly", ASSEMBLY_NICE).map_err(StartError::Thread)?;
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => break,
                () = tokio::time::sleep(interval) => {}
            }
            // Passes back to back while chains wait; each pass's trees
            // are stored while the next one is assembled.
            let mut storing: Option<tokio::task::JoinHandle<_>> = None;
            loop {
                let a = assembler.clone();
                let prepared = background
                    .run(move || timed(&a, "assemble", Assembler::prepare))
                    .await;
                if let Some(previous) = storing.take() {
                    log_pass(previous.await);
                }
                match prepared {
                    Some(Ok(Some(p))) => {
                        let a = assembler.clone();
                        storing = Some(tokio::task::spawn_blocking(move || {
                            timed(&a, "store", |a| a.store(p))
                        }));
                    }
                    Some(Ok(None)) => break,
                    Some(Err(error)) => {
                        tracing::error!(%error, "assembly failed");
                        break;
                    }
                    None => {
                        tracing::error!("assembly pass panicked");
                        break;
                    }
                }
            }
            if let Some(previous) = storing.take() {
                log_pass(previous.await);
            }
        }
    }));

    // Retention, store size, and expiry of signing keys.
    let retention = Retention {
        max_age_secs: config.retention.max_age_secs,
        max_bytes: config.retention.max_bytes,
    };
    let every = Duration::from_secs(config.retention.interval_secs);
    let mut stop_rx = stop.clone();
    let keys_of = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let s = store.clone();
            let m = metrics.clone();
            let k = keys_of.clone();
            let result = tokio::task::spawn_blocking(move || {
                // Expired signing keys leave the published key set.
                match k.trust.key_set(custody_context::unix_now()) {
                    Ok(keys) => {
                        if k.policy.refresh_keys(keys) {
                            tracing::info!("key set refreshed");
                        }
                    }
                    Err(error) => tracing::error!(%error, "key set refresh failed"),
                }
                let out = s.retain(retention, unix_nanos())?;
                let size = s.size_bytes()?;
                m.store_bytes.set(i64::try_from(size).unwrap_or(i64::MAX));
                Ok::<_, StoreError>(out)
            })
            .await;
            match result {
                Ok(Ok(out)) if out.hops + out.chains + out.flows > 0 => {
                    tracing::info!(
                        hops = out.hops,
                        chains = out.chains,
                        flows = out.flows,
                        "retention deleted"
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(%error, "retention failed"),
                Err(error) => tracing::error!(%error, "retention task failed"),
            }
            tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => break,
                () = tokio::time::sleep(every) => {}
            }
        }
    }));

    tracing::info!(%grpc_addr, %http_addr, ?https_addr, "custody-control listening");
    Ok(Running {
        grpc_addr,
        http_addr,
        https_addr,
        shared,
        shutdown,
        tasks,
    })
}

/// Runs one stage of an assembly pass, observing how long it took.
fn timed<T>(assembler: &Assembler, stage: &'static str, run: impl FnOnce(&Assembler) -> T) -> T {
    let started = std::time::Instant::now();
    let out = run(assembler);
    assembler.observe_stage(stage, started.elapsed());
    out
}

/// Logs a failed store of an assembly pass (its chains stay pending).
fn log_pass(result: Result<Result<usize, crate::store::StoreError>, tokio::task::JoinError>) {
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, "storing assembled chains failed"),
        Err(error) => tracing::error!(%error, "storing assembled chains: task failed"),
    }
}
