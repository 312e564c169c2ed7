//! Real peers for the sidecar tests: hyper apps and clients, sidecars on
//! ephemeral ports, key material, and readers for hop events and metrics.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use custody_context::keys::SigningKey;
use custody_proxy::trust::{KeyEntry, KeySetFile, signing_key_from_seed};
use custody_proxy::{Config, Running, Sidecar};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) const TD: &str = "td.test";

/// A port nobody listens on right now (for pingora, which binds by
/// address), never the same twice in this process: the kernel may hand out
/// a port again once its probe socket is closed, and two listeners of one
/// sidecar on one address are refused by its configuration.
pub(crate) fn free_port() -> SocketAddr {
    static GIVEN: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());
    loop {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&addr) {
            given.push(addr);
            return addr;
        }
    }
}

pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn uri_of(name: &str) -> String {
    format!("spiffe://{TD}/ns/test/sa/{name}")
}

/// Keys for a set of workloads, and the key-set file trusting them all.
pub(crate) struct Trust {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) seeds: BTreeMap<String, [u8; 32]>,
    pub(crate) key_set: PathBuf,
}

impl Trust {
    pub(crate) fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut seeds = BTreeMap::new();
        let mut file = KeySetFile::default();
        for (i, name) in names.iter().enumerate() {
            let mut seed = [0u8; 32];
            seed[0] = i as u8 + 1;
            seed[31] = 0x5a;
            let key = signing_key_from_seed(&seed, None);
            file.keys.push(KeyEntry::for_public_key(
                &key.public_key().bound_to(uri_of(name)),
            ));
            std::fs::write(dir.path().join(format!("{name}.seed")), hex::encode(seed)).unwrap();
            seeds.insert(name.to_string(), seed);
        }
        let key_set = dir.path().join("keys.json");
        std::fs::write(&key_set, serde_json::to_vec(&file).unwrap()).unwrap();
        Trust {
            dir,
            seeds,
            key_set,
        }
    }

    pub(crate) fn key(&self, name: &str) -> SigningKey {
        signing_key_from_seed(&self.seeds[name], None)
    }

    pub(crate) fn seed_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.seed"))
    }
}

/// How a sidecar is set up for a test.
pub(crate) struct Spec<'a> {
    pub(crate) name: &'a str,
    pub(crate) app: SocketAddr,
    pub(crate) upstreams: Vec<(String, SocketAddr)>,
    pub(crate) extra_inbound: &'a str,
    pub(crate) extra: &'a str,
    /// More fields of the `signing` section.
    pub(crate) signing: &'a str,
    /// More fields of the `listeners` section.
    pub(crate) listeners: &'a str,
    /// More entries of `outbound.upstreams` (YAML, `name: {...}, `).
    pub(crate) upstreams_yaml: &'a str,
}

impl<'a> Spec<'a> {
    pub(crate) fn new(name: &'a str, app: SocketAddr) -> Self {
        Spec {
            name,
            app,
            upstreams: vec![],
            extra_inbound: "",
            extra: "",
            signing: "",
            listeners: "",
            upstreams_yaml: "",
        }
    }
}

pub(crate) struct Proxy {
    pub(crate) inbound: SocketAddr,
    pub(crate) outbound: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) hops_file: PathBuf,
    pub(crate) running: Option<Running>,
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) fn config_yaml(
    spec: &Spec<'_>,
    trust: &Trust,
    dir: &Path,
    ports: [SocketAddr; 3],
) -> String {
    let upstreams: String = spec
        .upstreams
        .iter()
        .map(|(h, a)| format!("\"{h}\": \"{a}\", "))
        .collect();
    format!(
        r#"
workload: {{ trust_domain: {TD}, namespace: test, service_account: {name}, pod: {name}-0 }}
listeners: {{ inbound: "{inb}", outbound: "{outb}", admin: "{adm}", {listeners} }}
inbound:
  upstream: "{app}"
  identity_sources:
    - {{ type: edge_header, header: x-custody-user, kind: human }}
    - {{ type: agent_header, header: x-custody-agent }}
    - {{ type: mcp, agent_key: agent }}
{extra_inbound}
outbound: {{ mode: explicit, upstreams: {{ {upstreams}{upstreams_yaml} }} }}
signing: {{ seed_file: "{seed}", {signing} }}
trust: {{ key_set_file: "{keys}" }}
exporter: {{ jsonl_file: "{hops}", flush_interval_ms: 20 }}
shutdown: {{ grace_period_secs: 0, final_timeout_secs: 1 }}
{extra}
"#,
        name = spec.name,
        inb = ports[0],
        outb = ports[1],
        adm = ports[2],
        app = spec.app,
        extra_inbound = spec.extra_inbound,
        seed = trust.seed_file(spec.name).display(),
        keys = trust.key_set.display(),
        hops = dir.join("hops.jsonl").display(),
        extra = spec.extra,
        signing = spec.signing,
        listeners = spec.listeners,
        upstreams_yaml = spec.upstreams_yaml,
    )
}

pub(crate) async fn start(spec: Spec<'_>, trust: &Trust) -> Proxy {
    start_on(spec, trust, [free_port(), free_port(), free_port()]).await
}

pub(crate) async fn start_on(spec: Spec<'_>, trust: &Trust, ports: [SocketAddr; 3]) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(&spec, trust, dir.path(), ports);
    let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let running = Sidecar::build(config).unwrap().spawn();
    let proxy = Proxy {
        inbound: ports[0],
        outbound: ports[1],
        admin: ports[2],
        hops_file: dir.path().join("hops.jsonl"),
        running: Some(running),
        _dir: dir,
    };
    proxy.wait_ready().await;
    proxy
}

impl Proxy {
    pub(crate) async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for addr in [self.admin, self.inbound, self.outbound] {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "sidecar did not start listening on {addr}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    pub(crate) async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = client()
            .request(
                Request::get(format!("http://{}{path}", self.admin))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The value of a metric sample (exact name with labels), or 0.
    pub(crate) async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Waits until a hop event matching `pred` is exported.
    pub(crate) async fn wait_hop(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.hops_file).unwrap_or_default();
            if let Some(hop) = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|h| pred(h))
            {
                return hop;
            }
            assert!(Instant::now() < deadline, "no matching hop event:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` hop events matching `pred` are exported, and
    /// returns every hop exported so far.
    pub(crate) async fn hops_where(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&self.hops_file).unwrap_or_default();
            let hops: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let matching = hops.iter().filter(|h| pred(h)).count();
            if matching >= n {
                return hops;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} matching hop events, have {matching}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` hop events are exported, and returns them all.
    pub(crate) async fn hops(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.hops_file).unwrap_or_default();
            let hops: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if hops.len() >= n {
                return hops;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} hop events, have {}: {hops:#?}",
                hops.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

pub(crate) fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub(crate) fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// The claims of a token, unverified (the tests check what the sidecar sent).
pub(crate) fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWS");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// What an app saw of one request.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) version: hyper::Version,
}

impl Seen {
    pub(crate) fn token(&self) -> Option<Value> {
        self.headers
            .get("txn-token")
            .map(|v| claims(v.to_str().unwrap()))
    }

    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

pub(crate) type Handler = Arc<
    dyn Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// A hyper app (HTTP/1.1 and h2c) recording what it saw, answering with `handler`.
pub(crate) struct App {
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
}

impl App {
    pub(crate) async fn start(handler: Handler) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = Arc::clone(&handler);
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(Seen {
                            headers: req.headers().clone(),
                            version: req.version(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        App { addr, seen }
    }

    /// An app answering `ok`.
    pub(crate) async fn ok() -> App {
        App::start(Arc::new(|_req| {
            Box::pin(async { Response::new(full("ok")) })
        }))
        .await
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Calls `host` through a sidecar's outbound listener, optionally forwarding
/// the identity headers of `incoming`.
pub(crate) async fn call_out(
    outbound: SocketAddr,
    host: &str,
    forward: Option<&hyper::HeaderMap>,
) -> Response<Body> {
    let mut req = Request::get(format!("http://{outbound}/next"))
        .header("host", host)
        .body(full(""))
        .unwrap();
    if let Some(headers) = forward {
        for name in ["txn-token", "traceparent"] {
            if let Some(v) = headers.get(name) {
                req.headers_mut().insert(name, v.clone());
            }
        }
    }
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, full(body))
}

/// The status of `GET /rotation` with `Host: host` on an open HTTP/1.1
/// connection (the rotation tests' upstreams answer 200).
pub(crate) async fn get_rotation(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    host: &str,
) -> u16 {
    let resp = sender
        .send_request(
            Request::get("/rotation")
                .header("host", host)
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    body_string(resp).await.0
}

pub(crate) async fn body_string(resp: Response<Incoming>) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The `database` object of a hop event.
pub(crate) fn db(hop: &Value) -> &Value {
    &hop["database"]
}

/// The data classes a hop event records.
pub(crate) fn classes(hop: &Value) -> Vec<String> {
    hop["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|c| c["class"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until something accepts connections on `addr`.
pub(crate) async fn wait_listening(addr: SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {addr}");
}

/// A test CA (`ca.crt`) and a certificate for `dns_name` signed by it
/// (`tls.crt`, `tls.key`), written to `dir` with the openssl command.
pub(crate) fn tls_certificates(dir: &Path, dns_name: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subject = format!("/CN={dns_name}");
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "1",
            "-subj",
            "/CN=test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &["-subj", &subject, "-keyout", "tls.key", "-out", "tls.csr"],
    ]
    .concat());
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=DNS:{dns_name}\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "tls.crt",
    ]);
}

pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mesh CA `<ca>.crt` / `<ca>.key` in `dir`.
pub(crate) fn mesh_ca(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
    );
}

/// A workload certificate `<name>.crt` / `<name>.key` signed by `ca`, whose
/// URI SAN is `uri` (a SPIFFE ID) when given.
pub(crate) fn mesh_cert(dir: &Path, ca: &str, name: &str, uri: Option<&str>) {
    let mut ext = String::from("extendedKeyUsage=serverAuth,clientAuth\n");
    if let Some(uri) = uri {
        ext.push_str(&format!("subjectAltName=URI:{uri}\n"));
    }
    signed_cert(dir, ca, name, &ext);
}

/// A P-256 key `<name>.key` and its certificate `<name>.crt` with
/// `CN=<name>` and the extensions `ext`, signed by `ca` for a day.
fn signed_cert(dir: &Path, ca: &str, name: &str, ext: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// The first certificate of a PEM file (its leaf).
pub(crate) fn leaf_of(path: &Path) -> tokio_rustls::rustls::pki_types::CertificateDer<'static> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

/// `notAfter` of the leaf of a PEM file, in Unix seconds.
pub(crate) fn file_not_after(path: &Path) -> i64 {
    let cert = leaf_of(path);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    parsed.validity().not_after.timestamp()
}

/// The `mesh_tls` section for certificate `name` under CA `ca` in `dir`,
/// with `more` fields (`mode`, `peers`).
pub(crate) fn mesh_tls_yaml(dir: &Path, ca: &str, name: &str, more: &str) -> String {
    format!(
        "mesh_tls: {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", {more} }}",
        dir.join(format!("{name}.crt")).display(),
        dir.join(format!("{name}.key")).display(),
        dir.join(format!("{ca}.crt")).display(),
    )
}

/// A certificate `<name>.crt` / `<name>.key` signed by `ca` (see
/// [`mesh_ca`]) for the DNS name `dns`, with `CN=<name>`.
pub(crate) fn dns_cert(dir: &Path, ca: &str, name: &str, dns: &str) {
    signed_cert(dir, ca, name, &format!("subjectAltName=DNS:{dns}\n"));
}

/// Warnings logged in this process (every sidecar the tests run), kept
/// once [`capture_warnings`] was called.
static WARNINGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct WarningSink;

impl std::io::Write for WarningSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        WARNINGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps every warning the sidecars of this process log from now on (see
/// [`warnings`]).
pub(crate) fn capture_warnings() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| WarningSink)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

/// The warnings logged since [`capture_warnings`], one a line.
pub(crate) fn warnings() -> String {
    String::from_utf8_lossy(&WARNINGS.lock().unwrap()).into_owned()
}

/// Waits until `sample` of `proxy` reaches `value`.
pub(crate) async fn wait_metric(proxy: &Proxy, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = proxy.metric(sample).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} is {now}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a warning logged contains every one of `parts`; the line.
pub(crate) async fn wait_warning(parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = warnings()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no warning with {parts:?}:\n{}",
            warnings()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
