//! The reference topology of the demo and the scenarios.
//!
//! ```text
//!  client ──► web ──► orders ──► api.partner.example      (third party)
//!   (user)     │  ▲
//!              │  └── reports (legacy: forwards no header) ◄── web
//!              └────► paste.risky.example                 (third party)
//!  control: custody-control (embedded store), reached by every sidecar
//! ```
//!
//! Each sidecar proves its workload to the control plane with a projected
//! service-account token of its own, as the kubelet would write it: the
//! harness stands in for the cluster's service-account issuer
//! ([`SA_ISSUER`]), writes the issuer's JWKS where the control plane's
//! `workload_auth.jwks_file` points, and gives each sidecar a token for
//! namespace `shop`, its service account and its pod
//! (`control_plane.service_account_token_file`). The control plane accepts
//! hops only for the workload a token proves; the shared node token
//! ([`NODE_TOKEN`]) is left to node agents (flows and policy).
//!
//! `web`, `orders` and `reports` run the sample application behind a
//! `custody-proxy` sidecar (own user, iptables redirect, transparent
//! outbound); `web` is the mesh edge and starts chains from the user's
//! `Authorization: Bearer` JWT, signed by the shop's login service
//! ([`ISSUER`]): the harness makes that issuer's Ed25519 key pair at start,
//! keeps the private half in memory and writes the public half as the JWKS
//! file of `web`'s sidecar. The third parties and the client have no sidecar.
//!
//! `job` is background work: a sidecar and no server. [`Topology::run_job`]
//! runs its nightly task, a process of the pod that places an order with
//! `orders` over gRPC with no request behind it; the chain starts at the
//! job's sidecar, with the job's workload as initiator.
//!
//! The data pods and the agents:
//!
//! ```text
//!  client ──► web ──► orders ──► postgres (shop: customers, orders) ──► api.partner.example
//!       (gRPC PlaceOrder reads emails, HTTP /ssn-check reads SSNs, then calls the partner)
//!  client ──MCP──► assistant ──MCP tools/call──► researcher ──► mariadb (crm)
//!   (user)        (AI agent, for the user)      (sub-agent)
//! ```
//!
//! `postgres` and `mariadb` are real servers ([`custody_testkit`]) in pods of
//! their own, listening on the pod's address (5432, 3306), loaded with the
//! shop fixtures; each service logs in as a database user of its own. The
//! applications reach them through their sidecars (transparent redirect),
//! which decode the sessions: every statement is a hop with the database
//! user and the data classes read. `assistant` starts chains from the
//! `x-custody-user` header with the MCP agent acting; `researcher` takes the
//! task over (the token's actor becomes `researcher`, `assistant` nested).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custody_context::keys::SigningKey;
use custody_testkit::service_account::{self, Issuer, KeyKind};
use custody_testkit::{MariaDb, Options, Postgres, fixtures};
use ed25519_dalek::Signer as _;

use crate::mesh::{ADMIN_PORT, Mesh, Pod, sidecar_uid};

/// The trust domain of the topology.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The admin token of the control plane in the topology.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";
/// The control plane's node token, for node agents (flows and policy);
/// sidecars present workload tokens ([`SA_ISSUER`]) instead.
pub const NODE_TOKEN: &str = "e2e-node-token-0123456789";
/// The Kubernetes namespace of every workload of the topology.
pub const NAMESPACE: &str = "shop";
/// The service-account issuer the harness stands in for (`iss` of the
/// sidecars' projected tokens).
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience the sidecars' projected tokens are for.
pub const SA_AUDIENCE: &str = "custody";
/// How long a sidecar's projected token is valid; a long-running demo
/// writes fresh ones every [`SA_TOKEN_REFRESH_SECS`]
/// ([`Topology::refresh_workload_tokens`]).
pub const SA_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// How often a long-running demo writes fresh sidecar tokens (the kubelet
/// rotates at 80% of the lifetime; this is well before).
pub const SA_TOKEN_REFRESH_SECS: u64 = 3600;
/// The control plane's gRPC port.
pub const GRPC_PORT: u16 = 7070;
/// The control plane's HTTP port.
pub const HTTP_PORT: u16 = 7080;
/// The gRPC method of `orders` that `web` calls for `/order`.
pub const PLACE_ORDER: &str = "/shop.Orders/PlaceOrder";
/// The PostgreSQL pod's database (the shop fixtures).
pub const PG_DATABASE: &str = "shop";
/// The database user `orders` logs in to PostgreSQL as.
pub const PG_USER: &str = "orders_svc";
/// The MariaDB pod's database (the shop fixtures).
pub const MARIADB_DATABASE: &str = "crm";
/// The database user `researcher` logs in to MariaDB as.
pub const MARIADB_USER: &str = "research_svc";
/// The statement `orders` runs for [`PLACE_ORDER`]: names and emails.
pub const SQL_EMAILS: &str = "SELECT name, email FROM customers ORDER BY id LIMIT 5";
/// The statement `orders` runs for `/ssn-check`: names and SSNs.
pub const SQL_SSNS: &str = "SELECT name, ssn FROM customers ORDER BY id LIMIT 5";
/// The statement `researcher` runs for a task: names, emails and phones.
pub const SQL_RESEARCH: &str = "SELECT name, email, phone FROM customers ORDER BY id LIMIT 5";
/// The agent acting for the user at `assistant` (`_meta.agent`).
pub const ASSISTANT_AGENT: &str = "assistant";
/// The sub-agent `assistant` hands tasks to (`_meta.agent` of its tool call).
pub const RESEARCH_AGENT: &str = "researcher";
/// The tool `assistant` calls on `researcher`.
pub const RESEARCH_TOOL: &str = "lookup_customers";
/// The issuer of the users' JWTs that `web` accepts (the shop's login service).
pub const ISSUER: &str = "https://login.shop.example";
/// The audience of the users' JWTs that `web` accepts.
pub const AUDIENCE: &str = "shop";
/// The key id of the issuer's signing key in `web`'s JWKS.
pub const ISSUER_KID: &str = "login-1";
/// The background job's pod, service and service-account name.
pub const JOB: &str = "job";
/// What the background job does: a gRPC `PlaceOrder` on `orders`.
pub const JOB_ROUTE: &str = "grpc+http://orders:8080/shop.Orders/PlaceOrder";

/// Where the workspace's binaries are: next to the running executable (or
/// its parent, for test executables in `deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn text(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

/// The database servers of a topology; declared before the mesh, so they
/// stop before its namespaces go.
#[derive(Debug, Default)]
struct Databases {
    postgres: Option<Postgres>,
    mariadb: Option<MariaDb>,
}

/// A running topology.
pub struct Topology {
    databases: Databases,
    /// The mesh (dropping the topology tears it down).
    pub mesh: Mesh,
    uid: u32,
    keys: Vec<(String, SigningKey)>,
    /// The users' JWT issuer's key (in memory only; its JWKS is on disk).
    login: ed25519_dalek::SigningKey,
    /// The service-account issuer the sidecars' tokens come from.
    service_accounts: Issuer,
    /// The workloads whose sidecars run, in start order.
    sidecars: Vec<String>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("mesh", &self.mesh)
            .finish_non_exhaustive()
    }
}

/// An application pod of a topology of one's own ([`Topology::start_apps`]):
/// the sample application behind a sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppPod {
    /// Pod, service and service-account name (1-10 lowercase letters).
    pub name: String,
    /// Whether its sidecar starts chains from the `x-custody-user` header.
    pub edge: bool,
    /// `custody-e2e-app` arguments after `--name` and `--listen`.
    pub args: Vec<String>,
}

/// An application pod of the reference topology.
struct AppSpec {
    name: &'static str,
    forward: bool,
    routes: &'static [&'static str],
    edge: bool,
}

const APPS: [AppSpec; 3] = [
    AppSpec {
        name: "web",
        forward: true,
        routes: &[
            "/checkout=http://orders:8080/checkout",
            "/report=http://reports:8080/report",
            "/export=http://paste.risky.example/upload",
            "/partner=http://api.partner.example/orders",
            "/forge=http://orders:8080/forge",
            "/order=grpc+http://orders:8080/shop.Orders/PlaceOrder",
            "/ssn-check=http://orders:8080/ssn-check",
        ],
        edge: true,
    },
    AppSpec {
        name: "orders",
        forward: true,
        routes: &[
            "/checkout=http://api.partner.example/orders",
            "/forge=forge+http://api.partner.example/orders",
            "/shop.Orders/PlaceOrder=http://api.partner.example/orders",
            "/ssn-check=http://api.partner.example/orders",
        ],
        edge: false,
    },
    AppSpec {
        name: "reports",
        forward: false,
        routes: &["/report=http://orders:8080/checkout"],
        edge: false,
    },
];

/// An AI agent's pod of the reference topology: its sidecar reads MCP
/// `tools/call` requests for the acting agent.
struct AgentSpec {
    name: &'static str,
    routes: &'static [&'static str],
    /// Whether its sidecar also starts chains from `x-custody-user`.
    edge: bool,
}

const AGENTS: [AgentSpec; 2] = [
    AgentSpec {
        name: "assistant",
        routes: &["/mcp=mcp:researcher:lookup_customers+http://researcher:8080/mcp"],
        edge: true,
    },
    AgentSpec {
        name: "researcher",
        routes: &[],
        edge: false,
    },
];

impl Topology {
    /// Builds and starts everything, and waits until it answers.
    pub fn start(label: &str) -> anyhow::Result<Topology> {
        let uid = sidecar_uid()?;
        let mut mesh = Mesh::new(label)?;
        let control = mesh.add_pod("control")?;
        let client = mesh.add_pod("client")?;
        let mut app_pods = Vec::new();
        for spec in &APPS {
            app_pods.push(mesh.add_pod(spec.name)?);
        }
        let partner = mesh.add_pod("partner")?;
        let risky = mesh.add_pod("risky")?;
        mesh.alias("api.partner.example", &partner)?;
        mesh.alias("paste.risky.example", &risky)?;
        let postgres = mesh.add_pod("postgres")?;
        let mariadb = mesh.add_pod("mariadb")?;
        let mut agent_pods = Vec::new();
        for agent in &AGENTS {
            agent_pods.push(mesh.add_pod(agent.name)?);
        }
        let job = mesh.add_pod(JOB)?;
        let mut topology = Topology {
            databases: Databases::default(),
            mesh,
            uid,
            keys: Vec::new(),
            login: ed25519_dalek::SigningKey::from_bytes(&rand_seed()),
            service_accounts: Issuer::new(KeyKind::Rsa, SA_ISSUER)
                .context("making the service-account issuer's key")?,
            sidecars: Vec::new(),
        };
        topology.start_control(&control)?;
        topology.start_databases(&postgres, &mariadb)?;
        let names = APPS.iter().map(|spec| spec.name);
        let names = names.chain(AGENTS.iter().map(|agent| agent.name));
        topology.write_keys(names.chain([JOB]))?;
        topology.write_jwks()?;
        for (spec, pod) in APPS.iter().zip(&app_pods) {
            topology.start_app_pod(spec, pod, &control)?;
        }
        for (agent, pod) in AGENTS.iter().zip(&agent_pods) {
            topology.start_agent_pod(agent, pod, &control)?;
        }
        topology.start_sidecar(JOB, "", &job, &control)?;
        app_pods.extend(agent_pods);
        app_pods.push(job);
        for pod in [&partner, &risky] {
            let app = binary("custody-e2e-app")?;
            let name = pod.name.clone();
            topology.mesh.spawn(
                pod,
                None,
                &format!("{name}-app"),
                &[text(&app)?, "--name", &name, "--listen", "0.0.0.0:80"],
            )?;
        }
        let deadline = Duration::from_secs(60);
        let control_health = format!("http://{}:{HTTP_PORT}/metrics", control.ip);
        topology
            .mesh
            .wait_http(&client, &control_health, deadline)?;
        for pod in &app_pods {
            let ready = format!("http://{}:{ADMIN_PORT}/ready", pod.ip);
            topology.mesh.wait_http(&client, &ready, deadline)?;
        }
        for pod in [&partner, &risky] {
            topology
                .mesh
                .wait_http(&client, &format!("http://{}/healthz", pod.ip), deadline)?;
        }
        Ok(topology)
    }

    /// Builds and starts a topology of one's own: the control plane, a
    /// `client` pod without sidecar, and `apps`, each the sample application
    /// behind a sidecar; waits until everything answers.
    pub fn start_apps(label: &str, apps: &[AppPod]) -> anyhow::Result<Topology> {
        let uid = sidecar_uid()?;
        let mut mesh = Mesh::new(label)?;
        let control = mesh.add_pod("control")?;
        let client = mesh.add_pod("client")?;
        let mut pods = Vec::new();
        for app in apps {
            pods.push(mesh.add_pod(&app.name)?);
        }
        let mut topology = Topology {
            databases: Databases::default(),
            mesh,
            uid,
            keys: Vec::new(),
            login: ed25519_dalek::SigningKey::from_bytes(&rand_seed()),
            service_accounts: Issuer::new(KeyKind::Rsa, SA_ISSUER)
                .context("making the service-account issuer's key")?,
            sidecars: Vec::new(),
        };
        topology.start_control(&control)?;
        topology.write_keys(apps.iter().map(|a| a.name.as_str()))?;
        for (app, pod) in apps.iter().zip(&pods) {
            topology.start_sidecar_pod(&app.name, app.edge, pod, &control, &app.args)?;
        }
        let deadline = Duration::from_secs(60);
        let control_health = format!("http://{}:{HTTP_PORT}/metrics", control.ip);
        topology
            .mesh
            .wait_http(&client, &control_health, deadline)?;
        for pod in &pods {
            let ready = format!("http://{}:{ADMIN_PORT}/ready", pod.ip);
            topology.mesh.wait_http(&client, &ready, deadline)?;
        }
        Ok(topology)
    }

    /// A signing key per workload and the key set naming them all.
    fn write_keys<'a>(&mut self, names: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
        for name in names {
            let seed: [u8; 32] = rand_seed();
            self.keys.push((
                name.to_owned(),
                SigningKey::from_seed(format!("{name}-1"), &seed),
            ));
            fs::write(self.mesh.dir().join(format!("{name}.seed")), hex(&seed))?;
        }
        self.write_key_set()
    }

    /// The projected service-account token file of the sidecar `name`.
    fn workload_token_file(&self, name: &str) -> PathBuf {
        self.mesh.dir().join(format!("{name}-sa-token"))
    }

    /// Writes the projected service-account token of the sidecar `name`'s
    /// pod, naming the workload `claims` (its own, unless a test makes it
    /// lie): namespace [`NAMESPACE`], service account `claims`, pod
    /// `<claims>-0`. The file is replaced whole, as the kubelet does, and
    /// the sidecar reads it again on its next control-plane call.
    pub fn write_workload_token(&self, name: &str, claims: &str) -> anyhow::Result<()> {
        let pod = service_account::Pod::new(NAMESPACE, claims, &format!("{claims}-0"));
        let token = self
            .service_accounts
            .token(&pod, SA_AUDIENCE, SA_TOKEN_TTL_SECS);
        let path = self.workload_token_file(name);
        let next = path.with_extension("next");
        fs::write(&next, token)?;
        crate::cmd::run(&["chown", &self.uid.to_string(), text(&next)?])?;
        crate::cmd::run(&["chmod", "600", text(&next)?])?;
        fs::rename(&next, &path)?;
        Ok(())
    }

    /// Writes every sidecar's own token again, valid for another
    /// [`SA_TOKEN_TTL_SECS`], as the kubelet rotates projected tokens
    /// before they expire.
    pub fn refresh_workload_tokens(&self) -> anyhow::Result<()> {
        for name in &self.sidecars {
            self.write_workload_token(name, name)?;
        }
        Ok(())
    }

    fn start_control(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let data = self.mesh.dir().join("control-data");
        fs::create_dir_all(&data)?;
        // The service-account issuer's keys, as the API server publishes
        // them at /openid/v1/jwks.
        let jwks = self.mesh.dir().join("sa-jwks.json");
        fs::copy(self.service_accounts.jwks_file(), &jwks)?;
        let config = self.mesh.dir().join("control.yaml");
        fs::write(
            &config,
            format!(
                "data_dir: {}\ngrpc_listen: 0.0.0.0:{GRPC_PORT}\nhttp_listen: 0.0.0.0:{HTTP_PORT}\n\
                 tokens:\n  - {{ name: oncall, role: admin, secret: {ADMIN_TOKEN} }}\n  - {{ name: node-agents, role: node, secret: {NODE_TOKEN} }}\n\
                 workload_auth: {{ issuer: \"{SA_ISSUER}\", jwks_file: {jwks}, audience: {SA_AUDIENCE}, trust_domain: {TRUST_DOMAIN} }}\n\
                 assembly: {{ interval_millis: 100 }}\n",
                data.display(),
                jwks = jwks.display(),
            ),
        )?;
        self.start_control_process(pod)
    }

    fn start_control_process(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let config = self.mesh.dir().join("control.yaml");
        let server = binary("custody-control")?;
        self.mesh.spawn(
            pod,
            None,
            "control",
            &[text(&server)?, "--config", text(&config)?],
        )
    }

    /// Kills the control plane (SIGKILL: no chance to flush anything).
    pub fn kill_control(&mut self) -> anyhow::Result<()> {
        self.mesh.stop("control", Duration::ZERO)?;
        Ok(())
    }

    /// Starts the control plane again on the same data directory.
    pub fn start_control_again(&mut self) -> anyhow::Result<()> {
        let control = self.pod("control")?;
        self.start_control_process(&control)?;
        let client = self.pod("client")?;
        let url = format!("http://{}:{HTTP_PORT}/metrics", control.ip);
        self.mesh.wait_http(&client, &url, Duration::from_secs(30))
    }

    fn write_key_set(&self) -> anyhow::Result<()> {
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|(name, key)| {
                let public = key.public_key();
                serde_json::json!({
                    "kid": public.kid(),
                    "ed25519": base64url(public.bytes()),
                    "workload": format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{name}"),
                })
            })
            .collect();
        let file = serde_json::json!({"version": 1, "keys": keys, "revoked": []});
        fs::write(self.mesh.dir().join("keys.json"), file.to_string())?;
        Ok(())
    }

    /// The JWKS of the users' JWT issuer: its public key, for `web`'s sidecar.
    fn write_jwks(&self) -> anyhow::Result<()> {
        let jwks = serde_json::json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": ISSUER_KID, "alg": "EdDSA", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(self.login.verifying_key().to_bytes()),
        }]});
        fs::write(self.jwks_file(), jwks.to_string())?;
        Ok(())
    }

    fn jwks_file(&self) -> PathBuf {
        self.mesh.dir().join("login-jwks.json")
    }

    fn start_app_pod(&mut self, spec: &AppSpec, pod: &Pod, control: &Pod) -> anyhow::Result<()> {
        let mut args = Vec::new();
        if spec.forward {
            args.push("--forward".to_owned());
        }
        for route in spec.routes {
            args.push("--route".to_owned());
            args.push((*route).to_owned());
        }
        args.extend(self.sql_args(spec.name));
        if !spec.edge {
            return self.start_sidecar_pod(spec.name, false, pod, control, &args);
        }
        // The edge trusts the login service's JWTs only: no header a client
        // could set names anyone.
        let sources = format!(
            "  identity_sources:\n    - {{ type: bearer_jwt, issuer: \"{ISSUER}\", audience: {AUDIENCE}, jwks_file: \"{}\", kind: human }}\n",
            self.jwks_file().display()
        );
        self.start_sidecar_pod_with(spec.name, &sources, pod, control, &args)
    }

    fn start_agent_pod(
        &mut self,
        spec: &AgentSpec,
        pod: &Pod,
        control: &Pod,
    ) -> anyhow::Result<()> {
        let mut args = vec!["--forward".to_owned()];
        for route in spec.routes {
            args.push("--route".to_owned());
            args.push((*route).to_owned());
        }
        args.extend(self.sql_args(spec.name));
        let edge = if spec.edge {
            "    - { type: edge_header, header: x-custody-user, kind: human }\n"
        } else {
            ""
        };
        let sources =
            format!("  identity_sources:\n{edge}    - {{ type: mcp, agent_key: agent }}\n");
        self.start_sidecar_pod_with(spec.name, &sources, pod, control, &args)
    }

    /// Starts PostgreSQL and MariaDB in their pods, on the pods' addresses,
    /// and loads the shop fixtures into both.
    fn start_databases(&mut self, postgres: &Pod, mariadb: &Pod) -> anyhow::Result<()> {
        let options = |pod: &Pod, port: u16, user: &str, database: &str| {
            let mut options = Options::default()
                .listen(IpAddr::V4(pod.ip))
                .port(port)
                .command_prefix(&["ip", "netns", "exec", pod.ns.as_str()]);
            options.user = user.to_owned();
            options.database = database.to_owned();
            options
        };
        let pg = Postgres::start_with(options(postgres, 5432, PG_USER, PG_DATABASE))
            .context("starting PostgreSQL in its pod")?;
        fixtures::load_shop(&pg).context("loading the shop into PostgreSQL")?;
        self.databases.postgres = Some(pg);
        let maria = MariaDb::start_with(options(mariadb, 3306, MARIADB_USER, MARIADB_DATABASE))
            .context("starting MariaDB in its pod")?;
        fixtures::load_shop(&maria).context("loading the shop into MariaDB")?;
        self.databases.mariadb = Some(maria);
        Ok(())
    }

    /// The `--sql` arguments of the service `name`: what it reads from which
    /// database, through the pod's host name.
    fn sql_args(&self, name: &str) -> Vec<String> {
        let pg = self.databases.postgres.as_ref().map(|pg| {
            format!(
                "postgres://{}:{}@postgres:5432/{}?sslmode=disable",
                pg.user(),
                pg.password(),
                pg.database()
            )
        });
        let maria = self.databases.mariadb.as_ref().map(|db| {
            format!(
                "mysql://{}:{}@mariadb:3306/{}?prefer_socket=false",
                db.user(),
                db.password(),
                db.database()
            )
        });
        let queries: Vec<(&str, Option<&String>, &str)> = match name {
            "orders" => vec![
                (PLACE_ORDER, pg.as_ref(), SQL_EMAILS),
                ("/ssn-check", pg.as_ref(), SQL_SSNS),
            ],
            "researcher" => vec![("/mcp", maria.as_ref(), SQL_RESEARCH)],
            _ => Vec::new(),
        };
        queries
            .into_iter()
            .filter_map(|(path, url, sql)| {
                Some(["--sql".to_owned(), format!("{path}={}|{sql}", url?)])
            })
            .flatten()
            .collect()
    }

    /// The sample application (`app_args` after `--name` and `--listen`)
    /// behind a sidecar in `pod`.
    fn start_sidecar_pod(
        &mut self,
        name: &str,
        edge: bool,
        pod: &Pod,
        control: &Pod,
        app_args: &[String],
    ) -> anyhow::Result<()> {
        let sources = if edge {
            "  identity_sources:\n    - { type: edge_header, header: x-custody-user, kind: human }\n    - { type: agent_header, header: x-custody-agent }\n"
        } else {
            ""
        };
        self.start_sidecar_pod_with(name, sources, pod, control, app_args)
    }

    /// [`Topology::start_sidecar_pod`] with the sidecar's
    /// `inbound.identity_sources` YAML given.
    fn start_sidecar_pod_with(
        &mut self,
        name: &str,
        sources: &str,
        pod: &Pod,
        control: &Pod,
        app_args: &[String],
    ) -> anyhow::Result<()> {
        let app = binary("custody-e2e-app")?;
        let mut args = vec![
            text(&app)?.to_owned(),
            "--name".into(),
            name.into(),
            "--listen".into(),
            "127.0.0.1:8080".into(),
        ];
        args.extend_from_slice(app_args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.mesh.spawn(pod, None, &format!("{name}-app"), &args)?;
        self.start_sidecar(name, sources, pod, control)
    }

    /// The sidecar of the workload `name` in `pod`, its
    /// `inbound.identity_sources` YAML given, and the pod's redirect.
    fn start_sidecar(
        &mut self,
        name: &str,
        sources: &str,
        pod: &Pod,
        control: &Pod,
    ) -> anyhow::Result<()> {
        let dir = self.mesh.dir().to_path_buf();
        let state = dir.join(format!("{name}-state"));
        fs::create_dir_all(&state)?;
        let uid = self.uid.to_string();
        crate::cmd::run(&["chown", "-R", &uid, text(&state)?])?;
        let seed = dir.join(format!("{name}.seed"));
        crate::cmd::run(&["chown", &uid, text(&seed)?])?;
        crate::cmd::run(&["chmod", "600", text(&seed)?])?;
        self.write_workload_token(name, name)?;
        self.sidecars.push(name.to_owned());
        let token = self.workload_token_file(name);
        let control_url = format!("http://{}:{GRPC_PORT}", control.ip);
        let config = dir.join(format!("{name}-proxy.yaml"));
        fs::write(
            &config,
            format!(
                "workload: {{ trust_domain: {TRUST_DOMAIN}, namespace: {NAMESPACE}, service_account: {name}, pod: {name}-0 }}\n\
                 listeners: {{ inbound: \"0.0.0.0:15006\", outbound: \"127.0.0.1:15001\", admin: \"0.0.0.0:{ADMIN_PORT}\" }}\n\
                 inbound:\n  upstream: \"127.0.0.1:8080\"\n  refuse_invalid_tokens: false\n{sources}\
                 outbound: {{ mode: transparent }}\n\
                 signing: {{ seed_file: {seed}, kid: {name}-1, token_ttl_secs: 300 }}\n\
                 trust: {{ key_set_file: {keys} }}\n\
                 control_plane: {{ service_account_token_file: {token} }}\n\
                 policy: {{ control_plane: \"{control_url}\", state_dir: {state} }}\n\
                 exporter: {{ control_plane: \"{control_url}\", flush_interval_ms: 50 }}\n\
                 shutdown: {{ grace_period_secs: 1 }}\n",
                seed = seed.display(),
                keys = dir.join("keys.json").display(),
                token = token.display(),
                state = state.display(),
            ),
        )?;
        self.mesh.redirect(pod, self.uid)?;
        let proxy = binary("custody-proxy")?;
        self.mesh.spawn(
            pod,
            Some(self.uid),
            &format!("{name}-proxy"),
            &[text(&proxy)?, "--config", text(&config)?],
        )
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> anyhow::Result<Pod> {
        self.mesh.pod(name).cloned()
    }

    /// A JWT for `user` from the users' issuer ([`ISSUER`], [`AUDIENCE`]),
    /// valid for five minutes.
    pub fn user_jwt(&self, user: &str) -> String {
        let exp = custody_context::unix_now() + 300;
        self.login_jwt(
            &serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "sub": user, "exp": exp}),
        )
    }

    /// A JWT of `claims` signed with the users' issuer's key ([`ISSUER_KID`]).
    pub fn login_jwt(&self, claims: &serde_json::Value) -> String {
        sign_jwt(&self.login, ISSUER_KID, claims)
    }

    /// A request from the client pod (outside the mesh) to `web`, as `user`:
    /// with `Authorization: Bearer` and a JWT from the users' issuer.
    pub fn request(&self, path: &str, user: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        self.request_with(
            path,
            &format!("authorization: Bearer {}", self.user_jwt(user)),
        )
    }

    /// A request from the client pod to `web` with `header` (`name: value`)
    /// as the only credential.
    pub fn request_with(
        &self,
        path: &str,
        header: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let client = self.pod("client")?;
        let url = format!("http://web:8080{path}");
        let out = self.mesh.exec(
            &client,
            &[
                "curl",
                "-s",
                "--max-time",
                "10",
                "-H",
                header,
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )?;
        parse_curl(&out.stdout)
    }

    /// Runs the background job once: a process of the `job` pod, not serving
    /// anything, places an order with `orders` ([`JOB_ROUTE`]); its call
    /// leaves through the job's sidecar. Answers the job's status and report.
    pub fn run_job(&self) -> anyhow::Result<(u16, serde_json::Value)> {
        let pod = self.pod(JOB)?;
        let app = binary("custody-e2e-app")?;
        let route = format!("/nightly={JOB_ROUTE}");
        let out = self.mesh.exec(
            &pod,
            &[
                text(&app)?,
                "--name",
                JOB,
                "--route",
                &route,
                "--once",
                "/nightly",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "the job failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let status = report["status"]
            .as_u64()
            .context("the job reported no status")?;
        Ok((u16::try_from(status)?, report["body"].clone()))
    }

    /// An MCP `tools/call` of `tool` from the client pod to the `assistant`
    /// agent, as `user`, with `agent` acting (`params._meta.agent`).
    pub fn mcp_request(
        &self,
        user: &str,
        agent: &str,
        tool: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let client = self.pod("client")?;
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {}, "_meta": {"agent": agent}},
        })
        .to_string();
        let header = format!("x-custody-user: {user}");
        let out = self.mesh.exec(
            &client,
            &[
                "curl",
                "-s",
                "--max-time",
                "10",
                "-H",
                &header,
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
                "-w",
                "\n%{http_code}",
                "http://assistant:8080/mcp",
            ],
        )?;
        parse_curl(&out.stdout)
    }

    /// The control plane's `/metrics` text (Prometheus exposition).
    pub fn control_metrics(&self) -> anyhow::Result<String> {
        let control = self.pod("control")?;
        let url = format!("http://127.0.0.1:{HTTP_PORT}/metrics");
        let out = self
            .mesh
            .exec(&control, &["curl", "-s", "--max-time", "10", &url])?;
        if !out.status.success() {
            bail!("curl {url} failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The value of the control plane's sample `series` (name and labels as
    /// exposed, e.g. `custody_ingest_rejected_total{reason="workload_mismatch"}`),
    /// 0 when it is not exposed yet.
    pub fn control_metric(&self, series: &str) -> anyhow::Result<f64> {
        let metrics = self.control_metrics()?;
        let value = metrics.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        });
        Ok(value.unwrap_or(0.0))
    }

    /// Runs the `custody` CLI against the control plane, from the client pod.
    pub fn custody(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let client = self.pod("client")?;
        let control = self.pod("control")?;
        let cli = binary("custody")?;
        let server = format!("http://{}:{HTTP_PORT}", control.ip);
        let mut full = vec![text(&cli)?, "--server", &server, "--token", ADMIN_TOKEN];
        full.extend_from_slice(args);
        self.mesh.exec(&client, &full)
    }

    /// `custody <args> --output json`, parsed; fails on a non-zero exit.
    pub fn custody_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--output", "json"]);
        let out = self.custody(&full)?;
        if !out.status.success() {
            bail!(
                "custody {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until `custody chains <filter>` lists a chain that satisfies `want`.
    pub fn wait_chain(
        &mut self,
        filter: &[&str],
        within: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut args = vec!["chains"];
        args.extend_from_slice(filter);
        loop {
            let listed = self.custody_json(&args)?;
            let chains = listed
                .get("chains")
                .cloned()
                .unwrap_or(listed)
                .as_array()
                .cloned()
                .unwrap_or_default();
            if let Some(found) = chains.iter().find(|c| want(c)) {
                return Ok(found.clone());
            }
            self.mesh.check_alive()?;
            if Instant::now() > deadline {
                // What was listed last tells a slow report from a wrong one.
                bail!(
                    "no chain matching the expectation after {within:?} (filter {filter:?}); last listed: {:#}",
                    serde_json::Value::Array(chains)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A body and the status `curl -w '\n%{http_code}'` printed after it.
fn parse_curl(stdout: &[u8]) -> anyhow::Result<(u16, serde_json::Value)> {
    let text = String::from_utf8_lossy(stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    let body = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_owned()));
    Ok((code.trim().parse().context("status code")?, body))
}

fn rand_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let bytes = custody_context::traceparent::TraceId::random().to_bytes();
    let more = custody_context::traceparent::TraceId::random().to_bytes();
    seed[..16].copy_from_slice(&bytes);
    seed[16..].copy_from_slice(&more);
    seed
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWT (`EdDSA`) of `claims`, signed with `key` and naming `kid`.
pub fn sign_jwt(key: &ed25519_dalek::SigningKey, kid: &str, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let signing_input = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", base64url(&signature.to_bytes()))
}
