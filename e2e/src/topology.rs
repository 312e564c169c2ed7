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
//! `web`, `orders` and `reports` run the sample application behind a
//! `custody-proxy` sidecar (own user, iptables redirect, transparent
//! outbound); `web` is the mesh edge and starts chains from the
//! `x-custody-user` header. The third parties and the client have no sidecar.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use custody_context::keys::SigningKey;

use crate::mesh::{ADMIN_PORT, Mesh, Pod, sidecar_uid};

/// The trust domain of the topology.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The admin token of the control plane in the topology.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";
/// The token sidecars present to the control plane.
pub const NODE_TOKEN: &str = "e2e-node-token-0123456789";
/// The control plane's gRPC port.
pub const GRPC_PORT: u16 = 7070;
/// The control plane's HTTP port.
pub const HTTP_PORT: u16 = 7080;

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

/// A running topology.
pub struct Topology {
    /// The mesh (dropping the topology tears it down).
    pub mesh: Mesh,
    uid: u32,
    keys: Vec<(String, SigningKey)>,
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
        ],
        edge: true,
    },
    AppSpec {
        name: "orders",
        forward: true,
        routes: &[
            "/checkout=http://api.partner.example/orders",
            "/forge=forge+http://api.partner.example/orders",
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
        let mut topology = Topology {
            mesh,
            uid,
            keys: Vec::new(),
        };
        topology.start_control(&control)?;
        topology.write_keys(APPS.iter().map(|spec| spec.name))?;
        for (spec, pod) in APPS.iter().zip(&app_pods) {
            topology.start_app_pod(spec, pod, &control)?;
        }
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
            mesh,
            uid,
            keys: Vec::new(),
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

    /// A signing key per workload, the key set naming them all, and the
    /// sidecars' control-plane token.
    fn write_keys<'a>(&mut self, names: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
        for name in names {
            let seed: [u8; 32] = rand_seed();
            self.keys.push((
                name.to_owned(),
                SigningKey::from_seed(format!("{name}-1"), &seed),
            ));
            fs::write(self.mesh.dir().join(format!("{name}.seed")), hex(&seed))?;
        }
        self.write_key_set()?;
        // Written once, before any sidecar starts: a sidecar reading it while
        // it is rewritten would see it empty.
        fs::write(self.mesh.dir().join("node-token"), NODE_TOKEN)?;
        Ok(())
    }

    fn start_control(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let data = self.mesh.dir().join("control-data");
        fs::create_dir_all(&data)?;
        let config = self.mesh.dir().join("control.yaml");
        fs::write(
            &config,
            format!(
                "data_dir: {}\ngrpc_listen: 0.0.0.0:{GRPC_PORT}\nhttp_listen: 0.0.0.0:{HTTP_PORT}\n\
                 tokens:\n  - {{ name: oncall, role: admin, secret: {ADMIN_TOKEN} }}\n  - {{ name: mesh, role: node, secret: {NODE_TOKEN} }}\n\
                 assembly: {{ interval_millis: 100 }}\n",
                data.display()
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

    fn start_app_pod(&mut self, spec: &AppSpec, pod: &Pod, control: &Pod) -> anyhow::Result<()> {
        let mut args = Vec::new();
        if spec.forward {
            args.push("--forward".to_owned());
        }
        for route in spec.routes {
            args.push("--route".to_owned());
            args.push((*route).to_owned());
        }
        self.start_sidecar_pod(spec.name, spec.edge, pod, control, &args)
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
        let dir = self.mesh.dir().to_path_buf();
        let state = dir.join(format!("{name}-state"));
        fs::create_dir_all(&state)?;
        let uid = self.uid.to_string();
        crate::cmd::run(&["chown", "-R", &uid, text(&state)?])?;
        let seed = dir.join(format!("{name}.seed"));
        crate::cmd::run(&["chown", &uid, text(&seed)?])?;
        crate::cmd::run(&["chmod", "600", text(&seed)?])?;
        let token = dir.join("node-token");
        let sources = if edge {
            "  identity_sources:\n    - { type: edge_header, header: x-custody-user, kind: human }\n    - { type: agent_header, header: x-custody-agent }\n"
        } else {
            ""
        };
        let control_url = format!("http://{}:{GRPC_PORT}", control.ip);
        let config = dir.join(format!("{name}-proxy.yaml"));
        fs::write(
            &config,
            format!(
                "workload: {{ trust_domain: {TRUST_DOMAIN}, namespace: shop, service_account: {name}, pod: {name}-0 }}\n\
                 listeners: {{ inbound: \"0.0.0.0:15006\", outbound: \"127.0.0.1:15001\", admin: \"0.0.0.0:{ADMIN_PORT}\" }}\n\
                 inbound:\n  upstream: \"127.0.0.1:8080\"\n  refuse_invalid_tokens: false\n{sources}\
                 outbound: {{ mode: transparent }}\n\
                 signing: {{ seed_file: {seed}, kid: {name}-1, token_ttl_secs: 300 }}\n\
                 trust: {{ key_set_file: {keys} }}\n\
                 control_plane: {{ token_file: {token} }}\n\
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

    /// A request from the client pod (outside the mesh) to `web`, as `user`.
    pub fn request(&self, path: &str, user: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let client = self.pod("client")?;
        let url = format!("http://web:8080{path}");
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
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        let body = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_owned()));
        Ok((code.trim().parse().context("status code")?, body))
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
            if let Some(found) = chains.into_iter().find(|c| want(c)) {
                return Ok(found);
            }
            self.mesh.check_alive()?;
            if Instant::now() > deadline {
                bail!("no chain matching the expectation after {within:?} (filter {filter:?})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
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
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
