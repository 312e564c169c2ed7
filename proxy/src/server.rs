//! Wiring: builds the pingora server (inbound, outbound and admin listeners,
//! background tasks) from a [`Config`], and runs it in this thread or in a
//! thread of its own (tests).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use custody_context::issue::Issuer;
use custody_context::keys::SigningKey;
use custody_context::verify::{Verifier, VerifierConfig};
use pingora::apps::HttpServerOptions;
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use tokio::sync::Mutex;

use crate::admin::Admin;
use crate::bearer::BearerVerifier;
use crate::config::{Config, ConfigError, IdentitySource};
use crate::control_auth::ControlPlaneAuth;
use crate::export::{self, ExportTarget, HopQueue};
use crate::inflight::InFlightTable;
use crate::metrics::Metrics;
use crate::policy_store::{self, PolicyLoadError, PolicyStore};
use crate::proxy::{Direction, DirectionProxy, Shared};
use crate::tcp::Sniffing;
use crate::trust::{self, KeySetFile, TrustError};

/// Why the sidecar could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key or key set could not be loaded.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The policy file could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyLoadError),
    /// A bearer-JWT issuer's JWKS could not be loaded.
    #[error(transparent)]
    Bearer(#[from] custody_context::jwks::JwksError),
    /// The own key could not join the key set.
    #[error("signing key: {0}")]
    OwnKey(String),
    /// The control plane did not issue a signing key.
    #[error("{0}")]
    Registration(String),
    /// A TLS certificate, key or CA (inbound TLS listener, mesh mTLS, TLS
    /// origination) cannot be used.
    #[error("{0}")]
    Tls(String),
    /// The SQL analyzer or the classifier could not be built.
    #[error("{0}")]
    Database(String),
}

/// A sidecar ready to run.
pub struct Sidecar {
    server: Server,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// Background work: the hop exporter, the policy-file watcher and the mesh
/// certificate watcher.
struct Tasks {
    shared: Arc<Shared>,
    queue: Mutex<Option<HopQueue>>,
    target: ExportTarget,
    auth: ControlPlaneAuth,
    /// When the control-plane-issued signing key expires, if there is one.
    key_not_after: Option<u64>,
}

#[async_trait]
impl BackgroundService for Tasks {
    async fn start(&self, shutdown: ShutdownWatch) {
        let config = &self.shared.config;
        let watcher = config.policy.file.clone().map(|path| {
            tokio::spawn(Arc::clone(&self.shared.policy).watch_file(
                path,
                Duration::from_millis(config.policy.poll_interval_ms.max(10)),
                shutdown.clone(),
            ))
        });
        let subscription = config.policy.control_plane.clone().map(|address| {
            tokio::spawn(crate::control::subscribe(
                Arc::clone(&self.shared),
                address,
                self.auth.clone(),
                shutdown.clone(),
            ))
        });
        let rotation = self.rotation(&shutdown);
        let renewal = match (config.policy.control_plane.clone(), self.key_not_after) {
            (Some(address), Some(not_after)) => Some(tokio::spawn(crate::registration::renew(
                Arc::clone(&self.shared),
                address,
                self.auth.clone(),
                not_after,
                shutdown.clone(),
            ))),
            _ => None,
        };
        if let Some(queue) = self.queue.lock().await.take() {
            queue
                .run(
                    self.target.clone(),
                    config.exporter.batch_size,
                    Duration::from_millis(config.exporter.flush_interval_ms.max(1)),
                    shutdown,
                )
                .await;
        }
        for task in [watcher, subscription, renewal]
            .into_iter()
            .flatten()
            .chain(rotation)
        {
            task.abort();
        }
    }
}

impl Tasks {
    /// Starts watching every file of TLS material the sidecar holds
    /// (certificate rotation without a restart).
    fn rotation(&self, shutdown: &ShutdownWatch) -> Vec<tokio::task::JoinHandle<()>> {
        let shared = &self.shared;
        let config = &shared.config;
        let interval = |ms: u64| Duration::from_millis(ms.max(10));
        let metrics = || Arc::clone(&shared.metrics);
        let mut tasks = Vec::new();
        if let (Some(c), Some(mesh)) = (&config.mesh_tls, &shared.mesh) {
            tasks.push(tokio::spawn(Arc::clone(mesh.reloader()).watch(
                metrics(),
                interval(c.reload_interval_ms),
                shutdown.clone(),
            )));
        }
        if let (Some(c), Some(certificate)) = (&config.listeners.inbound_tls, &shared.inbound_tls) {
            tasks.push(tokio::spawn(Arc::clone(certificate).watch(
                metrics(),
                interval(c.reload_interval_ms),
                shutdown.clone(),
            )));
        }
        for (reloader, ms) in shared.db.tls_reloaders(config) {
            tasks.push(tokio::spawn(reloader.watch(
                metrics(),
                interval(ms),
                shutdown.clone(),
            )));
        }
        for (reloader, ms) in shared.origination.reloaders(config) {
            tasks.push(tokio::spawn(reloader.watch(
                metrics(),
                interval(ms),
                shutdown.clone(),
            )));
        }
        tasks
    }
}

impl Sidecar {
    /// Builds the sidecar: keys, policy, listeners and background tasks.
    /// Listeners bind when it runs.
    pub fn build(config: Config) -> Result<Self, BuildError> {
        let workload = config.workload_id()?;
        let workload_uri = workload.uri();
        let seed = match &config.signing.seed_file {
            Some(path) => Some(trust::load_seed(path)?),
            None => None,
        };
        let auth = match (
            &config.control_plane.service_account_token_file,
            &config.control_plane.token_file,
        ) {
            (Some(path), _) => ControlPlaneAuth::from_service_account_token_file(path)?,
            (None, Some(path)) => ControlPlaneAuth::from_file(path)?,
            (None, None) => ControlPlaneAuth::none(),
        };
        let mut keys = match &config.trust.key_set_file {
            Some(path) => KeySetFile::load(path)?,
            None => custody_context::keys::KeySet::new(),
        };
        let (signing, own, key_not_after) =
            match (&config.policy.control_plane, config.signing.register) {
                (Some(address), true) => {
                    let granted = crate::registration::register_blocking(
                        address.clone(),
                        auth.clone(),
                        workload.clone(),
                        seed,
                        Duration::from_secs(config.signing.register_timeout_secs),
                    )
                    .map_err(BuildError::Registration)?;
                    (granted.key, granted.public, Some(granted.not_after))
                }
                _ => {
                    let signing = match seed {
                        Some(seed) => {
                            trust::signing_key_from_seed(&seed, config.signing.kid.as_deref())
                        }
                        None => SigningKey::generate(),
                    };
                    let own = signing.public_key().bound_to(&workload_uri);
                    (signing, own, None)
                }
            };
        if keys.keys().all(|k| k.kid() != own.kid()) {
            keys.insert(own.clone())
                .map_err(|e| BuildError::OwnKey(e.to_string()))?;
        }
        let audience = config.workload.trust_domain.clone();
        let issuer = Issuer::new(
            signing,
            workload_uri.clone(),
            audience.clone(),
            config.signing.token_ttl_secs.unwrap_or(300),
        );
        let mut verifier_config = VerifierConfig::new(audience);
        verifier_config.cache_capacity = config.trust.verify_cache_size.max(1);
        verifier_config.leeway_secs = config.trust.leeway_secs;
        let anchor_keys = keys.clone();
        let verifier = Verifier::new(verifier_config, keys);
        let metrics = Arc::new(Metrics::default());
        let policy = Arc::new(PolicyStore::open(
            config.policy.state_dir.clone(),
            Arc::clone(&metrics),
        ));
        if let Some(path) = &config.policy.file {
            policy.apply(policy_store::load_bundle(path)?);
        }
        let (hops, queue) = export::queue(config.exporter.queue_size, Arc::clone(&metrics));
        let target = match (&config.exporter.control_plane, &config.exporter.jsonl_file) {
            (Some(address), _) => ExportTarget::ControlPlane(address.clone(), auth.clone()),
            (None, Some(path)) => ExportTarget::JsonlFile(path.clone()),
            (None, None) => ExportTarget::Discard,
        };

        let mut conf = ServerConf {
            threads: config.threads,
            grace_period_seconds: Some(config.shutdown.grace_period_secs),
            graceful_shutdown_timeout_seconds: Some(config.shutdown.final_timeout_secs),
            ..ServerConf::default()
        };
        conf.pid_file = String::new();
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let bearer = config
            .inbound
            .identity_sources
            .iter()
            .map(|source| match source {
                IdentitySource::BearerJwt {
                    issuer,
                    jwks_file,
                    audience,
                    kind,
                } => BearerVerifier::load(issuer, audience.as_deref(), *kind, jwks_file).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inbound_tls = match &config.listeners.inbound_tls {
            Some(tls) => Some(Arc::new(
                crate::reload::server_certificate(
                    "listeners.inbound_tls",
                    &tls.cert_file,
                    &tls.key_file,
                )
                .map_err(BuildError::Tls)?,
            )),
            None => None,
        };
        let mesh = match &config.mesh_tls {
            Some(mesh) => Some(Arc::new(
                crate::mesh::MeshTls::load(mesh, &workload, &config.workload.trust_domain)
                    .map_err(BuildError::Tls)?,
            )),
            None => None,
        };
        let origination = crate::mesh::OriginationRoots::load(&config).map_err(BuildError::Tls)?;
        let tls_upstreams = matches!(&config.outbound, crate::config::OutboundMode::Explicit { upstreams, .. }
            if upstreams.values().any(|u| u.tls.is_some()));
        let tunnel = match mesh.is_some() || !config.tls_origination.is_empty() || tls_upstreams {
            true => Some(crate::mesh::tunnel_socket_path().map_err(BuildError::Tls)?),
            false => None,
        };
        let db = crate::db::Engines::new(&config).map_err(BuildError::Database)?;
        if let Some(mesh) = &mesh {
            mesh.reloader().publish(&metrics);
        }
        if let Some(certificate) = &inbound_tls {
            certificate.publish(&metrics);
        }
        for (reloader, _) in db.tls_reloaders(&config) {
            reloader.publish(&metrics);
        }
        let taint_ttl =
            std::time::Duration::from_secs(config.signing.token_ttl_secs.unwrap_or(300).max(60));
        let shared = Arc::new(Shared {
            taint: crate::taint::TaintTable::new(16_384, taint_ttl),
            db,
            mesh,
            inbound_tls,
            origination,
            tunnel,
            bearer,
            workload,
            workload_uri,
            issuer: arc_swap::ArcSwap::from_pointee(issuer),
            verifier,
            anchor_keys: arc_swap::ArcSwap::from_pointee(anchor_keys),
            policy,
            inflight: InFlightTable::new(),
            metrics,
            hops,
            config,
        });

        let listeners = shared.config.listeners.clone();
        for (name, direction, addr) in [
            ("custody inbound", Direction::Inbound, listeners.inbound),
            ("custody outbound", Direction::Outbound, listeners.outbound),
        ] {
            let mut http = pingora::proxy::http_proxy(
                &server.configuration,
                DirectionProxy::new(Arc::clone(&shared), direction),
            );
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            http.server_options = Some(options);
            let mut service = Service::new(
                name.to_owned(),
                Sniffing::new(http, Arc::clone(&shared), direction),
            );
            service.add_tcp(&addr.to_string());
            if let (Direction::Inbound, Some(tls), Some(certificate)) =
                (direction, &listeners.inbound_tls, &shared.inbound_tls)
            {
                // Each handshake takes the certificate in force.
                let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")
                    .map_err(|e| BuildError::Tls(format!("listeners.inbound_tls: {e}")))?;
                settings.set_cert_resolver(Arc::new(crate::reload::CertResolver(Arc::clone(
                    certificate,
                ))));
                settings.enable_h2();
                service.add_tls_with_settings(&tls.address.to_string(), None, settings);
            }
            server.add_service(service);
        }
        for (index, database) in shared.config.databases.iter().enumerate() {
            if let Some(listen) = database.listen {
                let mut service = Service::new(
                    format!("custody database {index}"),
                    crate::db::DatabaseListener::new(Arc::clone(&shared), index),
                );
                service.add_tcp(&listen.to_string());
                server.add_service(service);
            }
        }
        if let Some(path) = &shared.tunnel {
            use std::os::unix::fs::PermissionsExt as _;
            let mut service = Service::new(
                "custody tls tunnel".to_owned(),
                crate::mesh::Tunnel::new(Arc::clone(&shared)),
            );
            // Only this sidecar's user may open TLS with its certificate.
            service.add_uds(
                &path.to_string_lossy(),
                Some(std::fs::Permissions::from_mode(0o600)),
            );
            server.add_service(service);
        }
        let mut admin = Service::new(
            "custody admin".to_owned(),
            HttpServer::new_app(Admin::new(Arc::clone(&shared))),
        );
        admin.add_tcp(&listeners.admin.to_string());
        server.add_service(admin);
        server.add_service(background_service(
            "custody tasks",
            Tasks {
                shared: Arc::clone(&shared),
                queue: Mutex::new(Some(queue)),
                target,
                auth,
                key_not_after,
            },
        ));
        Ok(Sidecar { server, shared })
    }

    /// Builds from a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, BuildError> {
        Sidecar::build(Config::load(path)?)
    }

    /// The shared state (metrics, policy, in-flight table).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Runs until SIGTERM (graceful: stop accepting, drain for the grace
    /// period, exit), SIGINT (fast) or SIGQUIT.
    pub fn run(self) {
        let tunnel = self.shared.tunnel.clone();
        self.server.run(RunArgs::default());
        if let Some(path) = tunnel {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Runs in a thread of its own until [`Running::stop`].
    pub fn spawn(self) -> Running {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let shared = Arc::clone(&self.shared);
        let thread = std::thread::spawn(move || {
            self.server.run(RunArgs {
                shutdown_signal: Box::new(StopSignal(rx)),
            });
        });
        Running {
            stop: tx,
            thread: Some(thread),
            shared,
        }
    }
}

struct StopSignal(tokio::sync::watch::Receiver<Option<bool>>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        loop {
            if let Some(graceful) = *rx.borrow_and_update() {
                return if graceful {
                    ShutdownSignal::GracefulTerminate
                } else {
                    ShutdownSignal::FastShutdown
                };
            }
            if rx.changed().await.is_err() {
                return ShutdownSignal::FastShutdown;
            }
        }
    }
}

/// A sidecar running in a thread of its own.
#[derive(Debug)]
pub struct Running {
    stop: tokio::sync::watch::Sender<Option<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Running {
    /// The shared state (metrics, policy, in-flight table).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Stops (gracefully: within the grace period) and waits for the end.
    pub fn stop(mut self) {
        self.stop.send_replace(Some(true));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(path) = &self.shared.tunnel {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.send_replace(Some(false));
        }
    }
}
