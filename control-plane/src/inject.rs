//! Sidecar injection: the pure core of the mutating admission webhook.
//!
//! The Kubernetes API server sends an `admission.k8s.io/v1` `AdmissionReview`
//! for every pod created in a namespace labelled `custody.io/inject=enabled`
//! (the selector lives in the Helm chart's `MutatingWebhookConfiguration`);
//! [`review`] answers with an `AdmissionReview` whose response carries a
//! JSON Patch (RFC 6902) that adds:
//!
//! - `custody-init`: an init container that installs the same iptables
//!   redirect as the end-to-end mesh (`e2e/src/mesh.rs`): chain
//!   `CUSTODY_OUT` sends the pod's outbound TCP to the sidecar's outbound
//!   port except traffic of the sidecar's own uid and loopback; chain
//!   `CUSTODY_IN` sends inbound TCP for the application port to the inbound
//!   port. The sidecar forwards inbound traffic to that one port, so other
//!   ports (metrics, probes, admin) reach the pod untouched;
//! - `custody-proxy`: the sidecar, as its own user, with its workload identity
//!   from the pod's metadata (downward API environment), probes on the admin
//!   listener, resources, and a configuration rendered for this pod;
//! - the volumes it reads (the node-token Secret, or with
//!   `service_account_token` a projected service-account token for the
//!   audience `custody`, which the kubelet rotates), and annotations: `custody.io/status`, the
//!   rendered configuration, and Prometheus scrape annotations when the pod
//!   has none of its own; the label `custody.io/injected: "true"`.
//!
//! Never twice: a pod that already has the sidecar (or the status annotation)
//! is admitted unchanged, so a re-invocation (`reinvocationPolicy`) or a
//! re-created pod spec is idempotent. A pod annotated
//! `custody.io/inject: "false"` is admitted unchanged. Objects that are not
//! pods, and operations other than `CREATE`, are admitted unchanged.
//!
//! No I/O here: the HTTP handler lives in [`crate::http`].

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The annotation that opts a pod out (`"false"`).
pub const INJECT_ANNOTATION: &str = "custody.io/inject";
/// The annotation that marks a pod as injected.
pub const STATUS_ANNOTATION: &str = "custody.io/status";
/// The annotation that carries the sidecar's rendered configuration; the
/// sidecar reads it through a downward API volume.
pub const CONFIG_ANNOTATION: &str = "custody.io/proxy-config";
/// The annotation that names the application port inbound traffic goes to.
pub const INBOUND_PORT_ANNOTATION: &str = "custody.io/inbound-port";
/// The label on injected pods (`"true"`), for a PodMonitor's selector.
pub const INJECTED_LABEL: &str = "custody.io/injected";
/// The sidecar container's name.
pub const SIDECAR_NAME: &str = "custody-proxy";
/// The init container's name.
pub const INIT_NAME: &str = "custody-init";

/// What injection adds, from the control plane's configuration (`inject:`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    /// The `custody-proxy` image.
    pub proxy_image: String,
    /// The init container's image: anything with `sh` and `iptables`.
    pub init_image: String,
    /// `imagePullPolicy` of both containers (default `IfNotPresent`).
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// The sidecar's uid and gid; traffic of this uid bypasses the redirect
    /// (default 1337). Applications must not run as this uid.
    #[serde(default = "default_uid")]
    pub proxy_uid: u32,
    /// The trust domain (the tokens' audience).
    pub trust_domain: String,
    /// The control plane's gRPC address as sidecars reach it
    /// (`http://custody-control.custody.svc:7070`).
    pub control_plane_url: String,
    /// The Secret, in the pod's own namespace, holding the node token under
    /// the key `token` (default `custody-node-token`).
    #[serde(default = "default_token_secret")]
    pub token_secret: String,
    /// Run the sidecar as a Kubernetes native sidecar (an init container with
    /// `restartPolicy: Always`, Kubernetes 1.29 and later): it starts before
    /// the application and stops after it (default true).
    #[serde(default = "default_true")]
    pub native_sidecar: bool,
    /// The application port inbound traffic goes to when the pod names none
    /// (annotation `custody.io/inbound-port`, else the first TCP
    /// `containerPort`) (default 8080).
    #[serde(default = "default_app_port")]
    pub default_app_port: u16,
    /// The sidecar's inbound listener port (default 15006).
    #[serde(default = "default_inbound")]
    pub inbound_port: u16,
    /// The sidecar's outbound listener port (default 15001).
    #[serde(default = "default_outbound")]
    pub outbound_port: u16,
    /// The sidecar's admin port: `/metrics`, `/ready`, `/live` (default 15020).
    #[serde(default = "default_admin")]
    pub admin_port: u16,
    /// Outbound destination CIDRs left out of the redirect.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The sidecar's `resources` (a Kubernetes `ResourceRequirements`).
    #[serde(default = "default_resources")]
    pub resources: Value,
    /// The init container's `resources`.
    #[serde(default = "default_init_resources")]
    pub init_resources: Value,
    /// `RUST_LOG` of the sidecar (default `info`).
    #[serde(default = "default_log")]
    pub log: String,
    /// When set, the sidecar authenticates with a projected service-account
    /// token (the control plane's `workload_auth`) instead of the node token:
    /// the pod gets a `serviceAccountToken` volume, and no node-token Secret
    /// is mounted.
    #[serde(default)]
    pub service_account_token: Option<ProjectedTokenConfig>,
}

/// The projected service-account token injected sidecars present.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectedTokenConfig {
    /// The audience the kubelet requests the token for (default `custody`;
    /// the control plane's `workload_auth.audience`).
    #[serde(default = "default_token_audience")]
    pub audience: String,
    /// The token's lifetime; the kubelet renews it at 80 % (default 3600,
    /// at least 600, as the API server requires).
    #[serde(default = "default_token_expiration")]
    pub expiration_seconds: u32,
}

/// Where the projected token is mounted in the sidecar.
pub const SERVICE_ACCOUNT_TOKEN_DIR: &str = "/var/run/secrets/custody";

fn default_token_audience() -> String {
    "custody".into()
}
fn default_token_expiration() -> u32 {
    3600
}

fn default_pull_policy() -> String {
    "IfNotPresent".into()
}
fn default_uid() -> u32 {
    1337
}
fn default_token_secret() -> String {
    "custody-node-token".into()
}
fn default_true() -> bool {
    true
}
fn default_app_port() -> u16 {
    8080
}
fn default_inbound() -> u16 {
    15006
}
fn default_outbound() -> u16 {
    15001
}
fn default_admin() -> u16 {
    15020
}
fn default_log() -> String {
    "info".into()
}
fn default_resources() -> Value {
    json!({"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
}
fn default_init_resources() -> Value {
    json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
}

impl InjectConfig {
    /// Checks what serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |f: &str, m: &str| Err((format!("inject.{f}"), m.to_owned()));
        if self.proxy_image.is_empty() {
            return fail("proxy_image", "must not be empty");
        }
        if self.init_image.is_empty() {
            return fail("init_image", "must not be empty");
        }
        if self.trust_domain.is_empty() {
            return fail("trust_domain", "must not be empty");
        }
        if !self.control_plane_url.starts_with("http://")
            && !self.control_plane_url.starts_with("https://")
        {
            return fail("control_plane_url", "must start with http:// or https://");
        }
        if self.proxy_uid == 0 {
            return fail("proxy_uid", "must not be 0 (root's traffic would bypass)");
        }
        let ports = [self.inbound_port, self.outbound_port, self.admin_port];
        if ports.contains(&0)
            || ports[0] == ports[1]
            || ports[1] == ports[2]
            || ports[0] == ports[2]
        {
            return fail(
                "inbound_port",
                "the inbound, outbound and admin ports must be distinct and non-zero",
            );
        }
        for (i, cidr) in self.exclude_outbound_cidrs.iter().enumerate() {
            if !valid_cidr(cidr) {
                return Err((
                    format!("inject.exclude_outbound_cidrs[{i}]"),
                    format!("{cidr:?} is not an address or CIDR"),
                ));
            }
        }
        if !self.resources.is_object() {
            return fail("resources", "must be a mapping");
        }
        if !self.init_resources.is_object() {
            return fail("init_resources", "must be a mapping");
        }
        if let Some(token) = &self.service_account_token {
            if token.audience.is_empty() {
                return fail("service_account_token.audience", "must not be empty");
            }
            if token.expiration_seconds < 600 {
                return fail(
                    "service_account_token.expiration_seconds",
                    "at least 600 (the API server's minimum)",
                );
            }
        }
        Ok(())
    }
}

/// Only digits, dots, colons, hex and one `/prefix`: what reaches the init
/// container's shell is never more than an address.
fn valid_cidr(s: &str) -> bool {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr_ok = addr.parse::<std::net::IpAddr>().is_ok();
    let prefix_ok = prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|n| n <= 128));
    addr_ok && prefix_ok
}

/// Why a request could not be answered at all (the handler answers 400).
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The body is not JSON, or not an `AdmissionReview` with a request.
    #[error("not an AdmissionReview: {0}")]
    Malformed(String),
}

/// Why a pod was admitted unchanged (logged, and counted by the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The object is not a pod, or the operation is not `CREATE`.
    NotAPodCreate,
    /// The pod opted out (`custody.io/inject: "false"`).
    OptedOut,
    /// The pod already has the sidecar.
    AlreadyInjected,
    /// The pod uses the host's network: a redirect would capture the node.
    HostNetwork,
    /// The application port is one of the sidecar's ports.
    PortConflict,
}

impl Skip {
    /// A bounded label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotAPodCreate => "not_a_pod_create",
            Skip::OptedOut => "opted_out",
            Skip::AlreadyInjected => "already_injected",
            Skip::HostNetwork => "host_network",
            Skip::PortConflict => "port_conflict",
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct Reviewed {
    /// The `AdmissionReview` to send back.
    pub response: Value,
    /// `None` when a patch was returned, else why not.
    pub skipped: Option<Skip>,
}

#[derive(Deserialize)]
struct Review {
    #[serde(rename = "apiVersion")]
    api_version: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Request {
    uid: String,
    #[serde(default)]
    kind: Option<GroupVersionKind>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Answers one `AdmissionReview` (the request body, JSON).
pub fn review(config: &InjectConfig, body: &[u8]) -> Result<Reviewed, InjectError> {
    let review: Review =
        serde_json::from_slice(body).map_err(|e| InjectError::Malformed(e.to_string()))?;
    if review.api_version != "admission.k8s.io/v1" {
        return Err(InjectError::Malformed(format!(
            "apiVersion {:?}, expected admission.k8s.io/v1",
            review.api_version
        )));
    }
    let request = review
        .request
        .ok_or_else(|| InjectError::Malformed("no request".into()))?;
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    let is_create = request.operation.as_deref() == Some("CREATE");
    let decision = match (&request.object, is_pod && is_create) {
        (Some(pod), true) => patch_for(config, pod, request.namespace.as_deref()),
        _ => Err(Skip::NotAPodCreate),
    };
    let mut response = json!({ "uid": request.uid, "allowed": true });
    let skipped = match decision {
        Ok(ops) => {
            let patch = serde_json::to_vec(&ops).unwrap_or_default();
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            None
        }
        Err(skip) => Some(skip),
    };
    Ok(Reviewed {
        response: json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }),
        skipped,
    })
}

/// The JSON Patch operations that inject `pod`, or why it is left alone.
pub fn patch_for(
    config: &InjectConfig,
    pod: &Value,
    request_namespace: Option<&str>,
) -> Result<Vec<Value>, Skip> {
    let empty = Map::new();
    let meta = pod.get("metadata").and_then(Value::as_object);
    let annotations = meta
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let spec = pod.get("spec").and_then(Value::as_object).unwrap_or(&empty);
    if annotations.get(INJECT_ANNOTATION).and_then(Value::as_str) == Some("false") {
        return Err(Skip::OptedOut);
    }
    let has_sidecar = ["containers", "initContainers"].iter().any(|key| {
        spec.get(*key).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c["name"] == SIDECAR_NAME || c["name"] == INIT_NAME)
        })
    });
    if has_sidecar || annotations.contains_key(STATUS_ANNOTATION) {
        return Err(Skip::AlreadyInjected);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(Skip::HostNetwork);
    }

    let namespace = request_namespace
        .filter(|n| !n.is_empty())
        .or_else(|| {
            meta.and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
        })
        .unwrap_or("default");
    let service_account = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let app_port = app_port(config, annotations, spec);
    if [config.inbound_port, config.outbound_port, config.admin_port].contains(&app_port) {
        return Err(Skip::PortConflict);
    }

    let mut ops = Vec::new();
    // Annotations: the map is created when the pod has none.
    let mut add_annotations = vec![
        (STATUS_ANNOTATION, "injected".to_owned()),
        (
            CONFIG_ANNOTATION,
            proxy_config(config, namespace, service_account, app_port),
        ),
    ];
    let scraped = annotations.keys().any(|k| k.starts_with("prometheus.io/"));
    if !scraped {
        add_annotations.push(("prometheus.io/scrape", "true".to_owned()));
        add_annotations.push(("prometheus.io/port", config.admin_port.to_string()));
        add_annotations.push(("prometheus.io/path", "/metrics".to_owned()));
    }
    if meta.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata", "value": {}}));
    }
    add_entries(&mut ops, meta, "annotations", add_annotations);
    // A label, so a PodMonitor can select injected pods.
    add_entries(
        &mut ops,
        meta,
        "labels",
        vec![(INJECTED_LABEL, "true".to_owned())],
    );

    // Containers. Native sidecar: [custody-init, custody-proxy, ...the pod's
    // init containers], so the pod's own init containers already run behind
    // a working sidecar. Classic: the pod's init containers run first
    // (without the redirect), custody-init last, the sidecar first of the
    // containers.
    let init = init_container(config, app_port);
    let sidecar = sidecar_container(config);
    let has_inits = spec
        .get("initContainers")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if config.native_sidecar {
        let mut sidecar = sidecar;
        sidecar["restartPolicy"] = json!("Always");
        sidecar["startupProbe"] = probe(config, "/ready", 1, 120);
        if has_inits {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
            ops.push(json!({"op": "add", "path": "/spec/initContainers/1", "value": sidecar}));
        } else {
            ops.push(
                json!({"op": "add", "path": "/spec/initContainers", "value": [init, sidecar]}),
            );
        }
    } else {
        if has_inits {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/-", "value": init}));
        } else {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init]}));
        }
        ops.push(json!({"op": "add", "path": "/spec/containers/0", "value": sidecar}));
    }

    let volumes = [
        json!({"name": "custody-config", "downwardAPI": {"items": [{
            "path": "proxy.yaml",
            "fieldRef": {"fieldPath": format!("metadata.annotations['{CONFIG_ANNOTATION}']")},
        }]}}),
        match &config.service_account_token {
            Some(token) => json!({"name": "custody-token", "projected": {
                "sources": [{"serviceAccountToken": {
                    "audience": token.audience,
                    "expirationSeconds": token.expiration_seconds,
                    "path": "token",
                }}],
                "defaultMode": 0o444,
            }}),
            None => json!({"name": "custody-token", "secret": {
                "secretName": config.token_secret,
                "items": [{"key": "token", "path": "token"}],
                "defaultMode": 0o444,
            }}),
        },
        json!({"name": "custody-state", "emptyDir": {"sizeLimit": "16Mi"}}),
    ];
    let has_volumes = spec
        .get("volumes")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if has_volumes {
        for v in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    Ok(ops)
}

/// Adds `entries` to `metadata.<map>`, creating the map when the pod has none.
fn add_entries(
    ops: &mut Vec<Value>,
    meta: Option<&Map<String, Value>>,
    map: &str,
    entries: Vec<(&str, String)>,
) {
    if meta.and_then(|m| m.get(map)).is_none_or(Value::is_null) {
        let value: Map<String, Value> = entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        ops.push(json!({"op": "add", "path": format!("/metadata/{map}"), "value": value}));
    } else {
        for (k, v) in entries {
            ops.push(json!({
                "op": "add",
                "path": format!("/metadata/{map}/{}", escape(k)),
                "value": v,
            }));
        }
    }
}

/// JSON Pointer escaping (RFC 6901) of one path segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn app_port(
    config: &InjectConfig,
    annotations: &Map<String, Value>,
    spec: &Map<String, Value>,
) -> u16 {
    if let Some(port) = annotations
        .get(INBOUND_PORT_ANNOTATION)
        .and_then(Value::as_str)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
    {
        return port;
    }
    spec.get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter(|p| {
            p.get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|p| p == "TCP")
        })
        .find_map(|p| p.get("containerPort").and_then(Value::as_u64))
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(config.default_app_port)
}

/// The sidecar's configuration for this pod (`proxy/src/config.rs`). The
/// workload fields are also given by the downward API environment, which the
/// sidecar prefers: the pod's name is not known at admission.
pub fn proxy_config(
    config: &InjectConfig,
    namespace: &str,
    service_account: &str,
    app_port: u16,
) -> String {
    // JSON is YAML: every value is quoted and escaped by serde_json.
    let doc = json!({
        "workload": {
            "trust_domain": config.trust_domain,
            "namespace": namespace,
            "service_account": service_account,
        },
        "listeners": {
            "inbound": format!("0.0.0.0:{}", config.inbound_port),
            "outbound": format!("127.0.0.1:{}", config.outbound_port),
            "admin": format!("0.0.0.0:{}", config.admin_port),
        },
        "inbound": { "upstream": format!("127.0.0.1:{app_port}") },
        "outbound": { "mode": "transparent" },
        "control_plane": match config.service_account_token {
            Some(_) => json!({ "service_account_token_file": format!("{SERVICE_ACCOUNT_TOKEN_DIR}/token") }),
            None => json!({ "token_file": "/var/run/custody/token" }),
        },
        // The control plane issues the signing key, bound to this workload,
        // and publishes it mesh-wide; it is renewed before it expires.
        "signing": { "register": true },
        "policy": { "control_plane": config.control_plane_url, "state_dir": "/var/lib/custody" },
        "exporter": { "control_plane": config.control_plane_url },
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// The redirect of `e2e/src/mesh.rs`, as a shell script, with inbound
/// capture limited to the application port (the sidecar's one upstream).
pub fn redirect_script(config: &InjectConfig, app_port: u16) -> String {
    let mut s = String::from("set -eu\n");
    let mut line = |l: String| {
        s.push_str("iptables -t nat ");
        s.push_str(&l);
        s.push('\n');
    };
    line("-N CUSTODY_OUT".into());
    line("-A OUTPUT -p tcp -j CUSTODY_OUT".into());
    line(format!(
        "-A CUSTODY_OUT -m owner --uid-owner {} -j RETURN",
        config.proxy_uid
    ));
    line("-A CUSTODY_OUT -d 127.0.0.0/8 -j RETURN".into());
    for cidr in &config.exclude_outbound_cidrs {
        if valid_cidr(cidr) {
            line(format!("-A CUSTODY_OUT -d {cidr} -j RETURN"));
        }
    }
    line(format!(
        "-A CUSTODY_OUT -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    ));
    line("-N CUSTODY_IN".into());
    line("-A PREROUTING -p tcp -j CUSTODY_IN".into());
    line(format!(
        "-A CUSTODY_IN -p tcp --dport {app_port} -j REDIRECT --to-ports {}",
        config.inbound_port
    ));
    s
}

fn init_container(config: &InjectConfig, app_port: u16) -> Value {
    json!({
        "name": INIT_NAME,
        "image": config.init_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["sh", "-c", redirect_script(config, app_port)],
        "resources": config.init_resources,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn probe(config: &InjectConfig, path: &str, period: u32, failures: u32) -> Value {
    json!({
        "httpGet": {"path": path, "port": config.admin_port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    })
}

fn sidecar_container(config: &InjectConfig) -> Value {
    let token_dir = match config.service_account_token {
        Some(_) => SERVICE_ACCOUNT_TOKEN_DIR,
        None => "/var/run/custody",
    };
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    json!({
        "name": SIDECAR_NAME,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["--config", "/etc/custody/proxy.yaml"],
        "env": [
            field("CUSTODY_WORKLOAD_NAMESPACE", "metadata.namespace"),
            field("CUSTODY_WORKLOAD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field("CUSTODY_WORKLOAD_POD", "metadata.name"),
            {"name": "RUST_LOG", "value": config.log},
        ],
        "ports": [
            {"name": "custody-in", "containerPort": config.inbound_port, "protocol": "TCP"},
            {"name": "custody-admin", "containerPort": config.admin_port, "protocol": "TCP"},
        ],
        "resources": config.resources,
        "readinessProbe": probe(config, "/ready", 5, 3),
        "livenessProbe": probe(config, "/live", 10, 3),
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "custody-config", "mountPath": "/etc/custody", "readOnly": true},
            {"name": "custody-token", "mountPath": token_dir, "readOnly": true},
            {"name": "custody-state", "mountPath": "/var/lib/custody"},
        ],
    })
}

#[cfg(test)]
mod tests;
