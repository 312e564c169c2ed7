//! Mesh mutual TLS for connections that are not HTTP: a database session
//! (real PostgreSQL 15) and raw TCP to a mesh peer leave the client sidecar
//! in mesh mTLS (ALPN `custody-mesh-tcp`), the peer's sidecar ends it and
//! relays the stream to its application as TCP. A relay between the
//! sidecars records the bytes on the wire.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use custody_testkit::Postgres;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::NoTls;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::mesh::{ChainOnly, mesh_certificates, roots};
use crate::support::*;

const INBOUND_MTLS: &str =
    "custody_proxy_mesh_tls_connections_total{direction=\"inbound\",result=\"mtls\"}";
const OUTBOUND_MTLS: &str =
    "custody_proxy_mesh_tls_connections_total{direction=\"outbound\",result=\"mtls\"}";

/// A relay to `to` that keeps every byte the client side sent.
async fn tap(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(to).await else {
                continue;
            };
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let index = {
                    let mut seen = record.lock().unwrap();
                    seen.push(Vec::new());
                    seen.len() - 1
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                record.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                                if sw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, seen)
}

/// A TCP echo server.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A test client as a sidecar opens mesh mTLS for raw TCP: certificate
/// `name` of CA `ca`, trusting the `mesh` CA, ALPN `custody-mesh-tcp` and
/// `custody-mesh`.
fn tcp_client(dir: &Path, name: &str) -> TlsConnector {
    let provider = Arc::new(ring::default_provider());
    let verifier =
        WebPkiServerVerifier::builder_with_provider(roots(dir, "mesh"), provider.clone())
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"custody-mesh-tcp".to_vec(), b"custody-mesh".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Sends `message` over mesh mTLS for raw TCP with certificate `name` and
/// reads as many bytes back; `Err` when the connection was refused.
async fn echo_over_mtls(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    message: &[u8],
) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tcp_client(dir, name)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(message).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; message.len()];
    tls.read_exact(&mut back).await.map_err(|e| e.to_string())?;
    let _ = tls.shutdown().await;
    Ok(back)
}

fn is_inbound(h: &Value) -> bool {
    h["direction"] == "DIRECTION_INBOUND"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_over_mesh_mtls_is_relayed_to_the_app_and_the_client_recorded() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let app = echo().await;
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: strict");
    let mut spec = Spec::new("server", app);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;

    let message = b"\x00\x01 not http, not a database \xff\r\n".repeat(200);
    let back = echo_over_mtls(dir, "client", server.inbound, &message).await;
    assert_eq!(back.as_deref(), Ok(&message[..]));
    let hop = server.wait_hop(is_inbound).await;
    assert_eq!(hop["protocol"], "PROTOCOL_TCP");
    assert_eq!(hop["transport_security"], "TRANSPORT_SECURITY_MESH_MTLS");
    assert_eq!(hop["peer_identity"], uri_of("client"));
    assert_eq!(hop["bytes_in"], message.len());
    assert_eq!(server.metric(INBOUND_MTLS).await, 1.0);

    // A client certificate from another CA: refused, nothing relayed.
    let rogue = echo_over_mtls(dir, "rogue-client", server.inbound, b"hello").await;
    assert!(rogue.is_err(), "a foreign CA was relayed: {rogue:?}");
    // A mesh certificate without a SPIFFE ID: refused.
    let nameless = echo_over_mtls(dir, "nameless", server.inbound, b"hello").await;
    assert!(nameless.is_err(), "no identity was relayed: {nameless:?}");
    // Plaintext TCP in strict mode: closed unanswered.
    let mut plain = TcpStream::connect(server.inbound).await.unwrap();
    let _ = plain.write_all(b"hello").await;
    let mut buf = [0u8; 8];
    let read = plain.read(&mut buf).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "plaintext was answered: {read:?}"
    );
    assert_eq!(server.metric(INBOUND_MTLS).await, 1.0);
    let refused = |result: &str| {
        format!(
            "custody_proxy_mesh_tls_connections_total{{direction=\"inbound\",result=\"{result}\"}}"
        )
    };
    assert_eq!(server.metric(&refused("plaintext_refused")).await, 1.0);
    assert!(server.metric(&refused("handshake_failed")).await >= 1.0);
    assert!(
        server.metric(&refused("handshake_failed")).await
            + server.metric(&refused("identity_refused")).await
            >= 2.0
    );
    // Only the verified connection reached the app.
    assert_eq!(server.hops_where(1, is_inbound).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_relays_plaintext_tcp_and_mesh_tcp() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let app = echo().await;
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: permissive");
    let mut spec = Spec::new("server", app);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;

    let mut plain = TcpStream::connect(server.inbound).await.unwrap();
    plain.write_all(b"\x00plain tcp").await.unwrap();
    let mut back = [0u8; 10];
    plain.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"\x00plain tcp");
    drop(plain);
    let back = echo_over_mtls(dir, "client", server.inbound, b"\x00mesh tcp").await;
    assert_eq!(back.as_deref(), Ok(&b"\x00mesh tcp"[..]));
    let hops = server.hops_where(2, is_inbound).await;
    let security: Vec<&Value> = hops.iter().map(|h| &h["transport_security"]).collect();
    assert!(
        security.contains(&&Value::from("TRANSPORT_SECURITY_PLAINTEXT")),
        "{security:?}"
    );
    assert!(
        security.contains(&&Value::from("TRANSPORT_SECURITY_MESH_MTLS")),
        "{security:?}"
    );
}

fn conninfo(pg: &Postgres, addr: SocketAddr) -> String {
    format!(
        "host={} port={} user={} password={} dbname={} sslmode=disable connect_timeout=20",
        addr.ip(),
        addr.port(),
        pg.user(),
        pg.password(),
        pg.database()
    )
}

/// A client sidecar `name` with a PostgreSQL listener forwarding to
/// `upstream`, a mesh peer expected to show `identity`.
async fn db_client(
    dir: &Path,
    trust: &Trust,
    upstream: SocketAddr,
    identity: &str,
) -> (Proxy, SocketAddr) {
    let listen = free_port();
    let peers = format!("peers: [{{ destination: \"127.0.0.1\", identity: \"{identity}\" }}]");
    let extra = format!(
        "databases:\n  - {{ protocol: postgres, listen: \"{listen}\", upstream: \"{upstream}\" }}\n{}\n",
        mesh_tls_yaml(dir, "mesh", "client", &peers)
    );
    let mut spec = Spec::new("client", free_port());
    spec.extra = &extra;
    let client = start(spec, trust).await;
    // The probe's connection is a session too: it goes to the peer (or is
    // refused) before the test's own.
    wait_listening(listen).await;
    (client, listen)
}

/// Waits until `sample` on `proxy` reaches `at_least` (20 s at most).
async fn wait_metric(proxy: &Proxy, sample: &str, at_least: f64) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let value = proxy.metric(sample).await;
        if value >= at_least || std::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_sessions_to_a_mesh_peer_go_over_mtls_and_are_still_decoded() {
    let pg = Postgres::start().unwrap();
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: strict");
    let mut spec = Spec::new("server", pg.addr());
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;
    let (wire, seen) = tap(server.inbound).await;
    let (client, listen) = db_client(dir, &trust, wire, &uri_of("server")).await;
    assert_eq!(wait_metric(&client, OUTBOUND_MTLS, 1.0).await, 1.0);
    assert_eq!(wait_metric(&server, INBOUND_MTLS, 1.0).await, 1.0);

    // app → client sidecar (decoded) → mesh mTLS → server sidecar → PostgreSQL.
    let (db, conn) = tokio_postgres::connect(&conninfo(&pg, listen), NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let row = db
        .query_one("SELECT 'wire-secret-' || (41 + 1)::text", &[])
        .await
        .unwrap();
    let answer: String = row.get(0);
    assert_eq!(answer, "wire-secret-42");
    drop(db);
    let _ = conn.await;

    let hop = client
        .wait_hop(|h| db_of(h)["statement_kind"] == "select")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_POSTGRES");
    assert_eq!(db_of(&hop)["user"], pg.user());
    assert_eq!(db_of(&hop)["parsed"], true);
    assert_eq!(hop["transport_security"], "TRANSPORT_SECURITY_MESH_MTLS");
    assert_eq!(hop["peer_identity"], uri_of("server"));
    assert_eq!(client.metric(OUTBOUND_MTLS).await, 2.0);
    assert_eq!(server.metric(INBOUND_MTLS).await, 2.0);
    let inbound = server
        .wait_hop(|h| is_inbound(h) && h["bytes_in"].as_u64() > Some(100))
        .await;
    assert_eq!(inbound["protocol"], "PROTOCOL_TCP");
    assert_eq!(
        inbound["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(inbound["peer_identity"], uri_of("client"));

    // On the wire between the sidecars: a TLS handshake record first, and
    // neither the statement nor the startup message (`user\0<name>`) in
    // clear.
    let startup = [b"user\0", pg.user().as_bytes()].concat();
    let wire_bytes = seen.lock().unwrap().clone();
    assert_eq!(wire_bytes.len(), 2);
    for bytes in &wire_bytes {
        assert_eq!(bytes.first(), Some(&0x16), "not TLS: {:?}", &bytes[..8]);
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!contains(b"wire-secret-"));
        assert!(!contains(&startup));
    }

    // Plaintext straight to the strict peer: refused.
    let direct = tokio_postgres::connect(&conninfo(&pg, server.inbound), NoTls).await;
    assert!(direct.is_err(), "strict peer served plaintext");

    // A client sidecar expecting another identity: the session is closed,
    // never sent in plaintext, and the reason recorded.
    let (wrong, listen) = db_client(dir, &trust, wire, &uri_of("intruder")).await;
    let mismatch = "custody_proxy_mesh_tls_connections_total{direction=\"outbound\",result=\"peer_identity_mismatch\"}";
    assert_eq!(wait_metric(&wrong, mismatch, 1.0).await, 1.0);
    let refused = tokio_postgres::connect(&conninfo(&pg, listen), NoTls).await;
    assert!(refused.is_err(), "session to the wrong identity went on");
    let hop = wrong
        .wait_hop(|h| h["transport_error"] == "peer_identity_mismatch")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_POSTGRES");
    assert_eq!(wrong.metric(mismatch).await, 2.0);
    assert_eq!(wrong.metric(OUTBOUND_MTLS).await, 0.0);
    assert_eq!(server.metric(INBOUND_MTLS).await, 2.0);
    let wire_bytes = seen.lock().unwrap().clone();
    assert_eq!(wire_bytes.len(), 4);
    for bytes in &wire_bytes[2..] {
        assert_eq!(bytes.first(), Some(&0x16));
        assert!(!bytes.windows(startup.len()).any(|w| w == startup));
    }
}

fn db_of(hop: &Value) -> &Value {
    &hop["database"]
}

const ECHO_SERVER: &str = r#"
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000))
s.listen()
def handle(c):
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

const ECHO_CLIENT: &str = r#"
import socket, sys
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sport:
    c.bind(("0.0.0.0", sport))
c.settimeout(10)
c.connect((host, port))
message = b"\x00raw tcp between meshed pods\n"
data = b""
try:
    c.sendall(message)
    while len(data) < len(message):
        d = c.recv(100)
        if not d:
            break
        data += d
except OSError:
    pass
c.close()
sys.stdout.write(data.decode(errors="replace"))
"#;

/// A sidecar binary's configuration in the namespace: workload `name`,
/// listeners at `inbound`, `outbound`, `admin`, the application at `app`,
/// hops to `hops`, and `mesh` (a `mesh_tls` line).
fn netns_config(
    name: &str,
    [inbound, outbound, admin]: [&str; 3],
    app: &str,
    hops: &Path,
    mesh: &str,
) -> String {
    format!(
        r#"
workload: {{ trust_domain: {TD}, namespace: test, service_account: {name} }}
listeners: {{ inbound: "{inbound}", outbound: "{outbound}", admin: "{admin}" }}
inbound: {{ upstream: "{app}" }}
outbound: {{ mode: transparent }}
exporter: {{ jsonl_file: "{}", flush_interval_ms: 20 }}
shutdown: {{ grace_period_secs: 0 }}
{mesh}
"#,
        hops.display()
    )
}

/// The hop events of a JSON-lines file once there are `n` matching `pred`.
fn hops_in(file: &Path, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e| pred(e))
            .collect();
        if events.len() >= n {
            return events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hop events missing in {}: {text}",
            file.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Transparent mode in a network namespace: the application dials the
/// peer pod's address, iptables hands the connection to its sidecar, which
/// reaches the peer's sidecar over mesh mTLS; that one relays to an echo
/// server. Root is needed (CI runs as root).
#[test]
fn transparent_tcp_to_a_mesh_peer_goes_sidecar_to_sidecar_over_mtls() {
    use crate::transparent::{Netns, run};
    assert_eq!(
        run(&["id", "-u"]).trim(),
        "0",
        "this test creates a network namespace and needs root"
    );
    let certs = mesh_certificates();
    let dir = certs.path();
    let work = tempfile::tempdir().unwrap();
    let name = format!("custody-meshtcp-{}", std::process::id());
    run(&["ip", "netns", "add", &name]);
    let mut ns = Netns {
        name: name.clone(),
        children: vec![],
    };
    let redirect = |sports: &str, to: &str| {
        vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.98.0.2",
            "--dport",
            "7000",
            "--sport",
            sports,
            "-j",
            "REDIRECT",
            "--to-ports",
            to,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<String>>()
    };
    for args in [
        ["ip", "link", "set", "lo", "up"]
            .map(str::to_owned)
            .to_vec(),
        ["ip", "addr", "add", "10.98.0.2/32", "dev", "lo"]
            .map(str::to_owned)
            .to_vec(),
        // The client app's connections (source ports 20000-20100) go to the
        // client sidecar, those from 20200-20300 to the sidecar expecting
        // another identity; the sidecars' own use ephemeral ports.
        redirect("20000:20100", "15001"),
        redirect("20200:20300", "16001"),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let status = ns.exec(&args).status().unwrap();
        assert!(status.success(), "{args:?}");
    }
    let server_peer = format!(
        "peers: [{{ destination: \"10.98.0.0/24\", identity: \"{}\" }}]",
        uri_of("server")
    );
    let intruder_peer = format!(
        "peers: [{{ destination: \"10.98.0.2\", identity: \"{}\" }}]",
        uri_of("intruder")
    );
    let sidecars = [
        (
            "server",
            ["10.98.0.2:7000", "127.0.0.1:25001", "127.0.0.1:25020"],
            "127.0.0.1:9000",
            mesh_tls_yaml(dir, "mesh", "server", "mode: strict"),
        ),
        (
            "client",
            ["127.0.0.1:15006", "127.0.0.1:15001", "127.0.0.1:15020"],
            "127.0.0.1:8080",
            mesh_tls_yaml(dir, "mesh", "client", &server_peer),
        ),
        (
            "client",
            ["127.0.0.1:16006", "127.0.0.1:16001", "127.0.0.1:16020"],
            "127.0.0.1:8080",
            mesh_tls_yaml(dir, "mesh", "client", &intruder_peer),
        ),
    ];
    let mut hops = Vec::new();
    for (i, (workload, listeners, app, mesh)) in sidecars.iter().enumerate() {
        let file = work.path().join(format!("hops-{i}.jsonl"));
        let config = work.path().join(format!("proxy-{i}.yaml"));
        std::fs::write(
            &config,
            netns_config(workload, *listeners, app, &file, mesh),
        )
        .unwrap();
        ns.spawn(&[
            env!("CARGO_BIN_EXE_custody-proxy"),
            "--config",
            config.to_str().unwrap(),
        ]);
        hops.push(file);
    }
    let echo_server = work.path().join("echo_server.py");
    std::fs::write(&echo_server, ECHO_SERVER).unwrap();
    ns.spawn(&["python3", echo_server.to_str().unwrap()]);
    let echo_client = work.path().join("echo_client.py");
    std::fs::write(&echo_client, ECHO_CLIENT).unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for probe in [
        "http://127.0.0.1:25020/ready",
        "http://127.0.0.1:15020/ready",
        "http://127.0.0.1:16020/ready",
    ] {
        while !ns
            .exec(&["curl", "-sf", probe])
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(std::time::Instant::now() < deadline, "{probe} not ready");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    while !ns
        .exec(&[
            "python3",
            "-c",
            "import socket; socket.create_connection(('127.0.0.1', 9000), 1)",
        ])
        .status()
        .unwrap()
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "echo did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let echo = |sport: &str| {
        let out = ns
            .exec(&[
                "python3",
                echo_client.to_str().unwrap(),
                "10.98.0.2",
                "7000",
                sport,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metric = |admin: &str, sample: &str| -> f64 {
        let out = ns
            .exec(&["curl", "-sf", &format!("http://{admin}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    let mesh = |direction: &str, result: &str| {
        format!(
            "custody_proxy_mesh_tls_connections_total{{direction=\"{direction}\",result=\"{result}\"}}"
        )
    };

    // app → (iptables) client sidecar → mesh mTLS → server sidecar → echo.
    assert_eq!(echo("20010"), "\u{0}raw tcp between meshed pods\n");
    let outbound = hops_in(&hops[1], 1, |h| h["protocol"] == "PROTOCOL_TCP");
    assert_eq!(outbound[0]["direction"], "DIRECTION_OUTBOUND");
    assert_eq!(
        outbound[0]["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(outbound[0]["peer_identity"], uri_of("server"));
    assert_eq!(outbound[0]["egress"]["destination"]["ip"], "10.98.0.2");
    assert_eq!(outbound[0]["bytes_in"], 29);
    let inbound = hops_in(&hops[0], 1, |h| h["protocol"] == "PROTOCOL_TCP");
    assert_eq!(inbound[0]["direction"], "DIRECTION_INBOUND");
    assert_eq!(
        inbound[0]["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(inbound[0]["peer_identity"], uri_of("client"));
    assert_eq!(metric("127.0.0.1:25020", &mesh("inbound", "mtls")), 1.0);
    assert_eq!(metric("127.0.0.1:15020", &mesh("outbound", "mtls")), 1.0);

    // Plaintext straight to the strict peer: closed.
    assert_eq!(echo("0"), "");
    assert_eq!(
        metric("127.0.0.1:25020", &mesh("inbound", "plaintext_refused")),
        1.0
    );

    // A sidecar expecting another identity: closed, recorded with the
    // reason, nothing reaches the echo server.
    assert_eq!(echo("20210"), "");
    let refused = hops_in(&hops[2], 1, |h| h["protocol"] == "PROTOCOL_TCP");
    assert_eq!(refused[0]["transport_error"], "peer_identity_mismatch");
    assert_eq!(refused[0]["bytes_out"], 0);
    assert_eq!(
        metric(
            "127.0.0.1:16020",
            &mesh("outbound", "peer_identity_mismatch")
        ),
        1.0
    );
    assert_eq!(metric("127.0.0.1:25020", &mesh("inbound", "mtls")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_database_tls_session_runs_inside_mesh_mtls() {
    let pg = Postgres::start().unwrap();
    let pg_certs = tempfile::tempdir().unwrap();
    crate::postgres::enable_tls(&pg, pg_certs.path());
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: strict");
    let mut spec = Spec::new("server", pg.addr());
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;

    let c = pg_certs.path();
    let listen = free_port();
    let peers = format!(
        "peers: [{{ destination: \"127.0.0.1\", identity: \"{}\" }}]",
        uri_of("server")
    );
    let extra = format!(
        "databases:\n  - protocol: postgres\n    listen: \"{listen}\"\n    upstream: \"{}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", upstream_server_name: db.test }}\n{}\n",
        server.inbound,
        c.join("tls.crt").display(),
        c.join("tls.key").display(),
        c.join("ca.crt").display(),
        mesh_tls_yaml(dir, "mesh", "client", &peers)
    );
    let mut spec = Spec::new("client", free_port());
    spec.extra = &extra;
    let client = start(spec, &trust).await;
    wait_listening(listen).await;

    // psql → (TLS, ended by the client sidecar) → decoded → mesh mTLS →
    // server sidecar → (the client sidecar's TLS to PostgreSQL) → PostgreSQL.
    let via = conninfo(&pg, listen).replace("sslmode=disable", "sslmode=require");
    let mut answer = String::new();
    for _ in 0..50 {
        answer = crate::postgres::try_psql(
            &via,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .unwrap_or_default();
        if answer.trim() == "t" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(answer.trim(), "t");
    let hop = client
        .wait_hop(|h| db_of(h)["statement_kind"] == "select")
        .await;
    assert_eq!(db_of(&hop)["transport"], "tls_terminated");
    assert_eq!(db_of(&hop)["parsed"], true);
    assert_eq!(hop["transport_security"], "TRANSPORT_SECURITY_MESH_MTLS");
    assert_eq!(hop["peer_identity"], uri_of("server"));
    assert!(server.metric(INBOUND_MTLS).await >= 2.0);
    assert_eq!(
        server
            .metric("custody_proxy_mesh_tls_connections_total{direction=\"inbound\",result=\"plaintext_refused\"}")
            .await,
        0.0
    );
}

/// The serial number of the leaf of a PEM file or DER certificate.
fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.raw_serial_as_string()
}

fn file_serial(path: &Path) -> String {
    serial(leaf_of(path).as_ref())
}

/// Replaces `to` with a copy of `from` in one step (write, then rename).
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A mesh peer's sidecar stand-in speaking mesh mTLS for raw TCP (ALPN
/// `custody-mesh-tcp`, a client certificate of the `mesh` CA required):
/// the serial of each client certificate it was shown.
async fn recording_tcp_peer(dir: &Path) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    let provider = Arc::new(ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(dir, "mesh"), provider.clone())
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"custody-mesh-tcp".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    record.lock().unwrap().push(serial(leaf.as_ref()));
                }
                let mut buf = [0u8; 1024];
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, seen)
}

/// Serial of the certificate the server sidecar shows to a raw-TCP mesh
/// mTLS client (after an echo through it).
async fn server_serial(dir: &Path, addr: SocketAddr) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tcp_client(dir, "client")
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    tls.write_all(b"\x00x").await.unwrap();
    let mut back = [0u8; 2];
    tls.read_exact(&mut back).await.unwrap();
    serial(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_handshakes_take_a_rotated_certificate_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mesh_ca(d, "mesh");
    for (name, uri) in [
        ("server", "server"),
        ("server-next", "server"),
        ("client", "client"),
        ("client-next", "client"),
    ] {
        mesh_cert(d, "mesh", name, Some(&uri_of(uri)));
    }
    let live = tempfile::tempdir().unwrap();
    let l = live.path();
    for (from, to) in [
        ("server.crt", "server.crt"),
        ("server.key", "server.key"),
        ("client.crt", "client.crt"),
        ("client.key", "client.key"),
        ("mesh.crt", "mesh.crt"),
    ] {
        std::fs::copy(d.join(from), l.join(to)).unwrap();
    }
    let trust = Trust::new(&["client", "server"]);
    let applied = "custody_proxy_tls_reloads_total{material=\"mesh_tls\",result=\"applied\"}";

    // Inbound: the server sidecar's raw-TCP acceptor.
    let app = echo().await;
    let server_mesh = mesh_tls_yaml(l, "mesh", "server", "mode: strict, reload_interval_ms: 50");
    let mut spec = Spec::new("server", app);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;
    assert_eq!(
        server_serial(d, server.inbound).await,
        file_serial(&d.join("server.crt"))
    );
    replace(&d.join("server-next.key"), &l.join("server.key.next"));
    replace(&d.join("server-next.crt"), &l.join("server.crt.next"));
    std::fs::rename(l.join("server.key.next"), l.join("server.key")).unwrap();
    std::fs::rename(l.join("server.crt.next"), l.join("server.crt")).unwrap();
    assert_eq!(wait_metric(&server, applied, 1.0).await, 1.0);
    assert_eq!(
        server_serial(d, server.inbound).await,
        file_serial(&d.join("server-next.crt"))
    );

    // Outbound: the client sidecar's certificate on a database session.
    let (peer, seen) = recording_tcp_peer(d).await;
    let listen = free_port();
    let peers = format!(
        "peers: [{{ destination: \"127.0.0.1\", identity: \"{}\" }}], reload_interval_ms: 50",
        uri_of("server")
    );
    let extra = format!(
        "databases:\n  - {{ protocol: postgres, listen: \"{listen}\", upstream: \"{peer}\" }}\n{}\n",
        mesh_tls_yaml(l, "mesh", "client", &peers)
    );
    let mut spec = Spec::new("client", free_port());
    spec.extra = &extra;
    let client = start(spec, &trust).await;
    wait_listening(listen).await;
    assert_eq!(wait_metric(&client, OUTBOUND_MTLS, 1.0).await, 1.0);
    replace(&d.join("client-next.key"), &l.join("client.key.next"));
    replace(&d.join("client-next.crt"), &l.join("client.crt.next"));
    std::fs::rename(l.join("client.key.next"), l.join("client.key")).unwrap();
    std::fs::rename(l.join("client.crt.next"), l.join("client.crt")).unwrap();
    assert_eq!(wait_metric(&client, applied, 1.0).await, 1.0);
    let session = TcpStream::connect(listen).await.unwrap();
    assert_eq!(wait_metric(&client, OUTBOUND_MTLS, 2.0).await, 2.0);
    drop(session);
    // The peer records a client certificate once its side of the
    // handshake is done, which may come after the sidecar's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while seen.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            file_serial(&d.join("client.crt")),
            file_serial(&d.join("client-next.crt"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_session_where_the_server_speaks_first_goes_over_mesh_mtls() {
    use mysql_async::prelude::Queryable as _;
    let db = custody_testkit::MariaDb::start().unwrap();
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: strict");
    let mut spec = Spec::new("server", db.addr());
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;
    let listen = free_port();
    let peers = format!(
        "peers: [{{ destination: \"127.0.0.1\", identity: \"{}\" }}]",
        uri_of("server")
    );
    let extra = format!(
        "databases:\n  - {{ protocol: mysql, listen: \"{listen}\", upstream: \"{}\" }}\n{}\n",
        server.inbound,
        mesh_tls_yaml(dir, "mesh", "client", &peers)
    );
    let mut spec = Spec::new("client", free_port());
    spec.extra = &extra;
    let client = start(spec, &trust).await;
    wait_listening(listen).await;

    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(listen.ip().to_string())
        .tcp_port(listen.port())
        .user(Some(db.user()))
        .pass(Some(db.password()))
        .db_name(Some(db.database()))
        .prefer_socket(false);
    let mut conn = mysql_async::Conn::new(opts).await.unwrap();
    let answer: Option<String> = conn
        .query_first("SELECT CONCAT('wire-secret-', 41 + 1)")
        .await
        .unwrap();
    assert_eq!(answer.as_deref(), Some("wire-secret-42"));
    conn.disconnect().await.unwrap();

    let hop = client
        .wait_hop(|h| db_of(h)["statement_kind"] == "select")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_MYSQL");
    assert_eq!(db_of(&hop)["user"], db.user());
    assert_eq!(hop["transport_security"], "TRANSPORT_SECURITY_MESH_MTLS");
    assert_eq!(hop["peer_identity"], uri_of("server"));
    let inbound = server
        .wait_hop(|h| is_inbound(h) && h["bytes_in"].as_u64() > Some(50))
        .await;
    assert_eq!(inbound["protocol"], "PROTOCOL_TCP");
    assert_eq!(inbound["peer_identity"], uri_of("client"));
    assert_eq!(
        server
            .metric("custody_proxy_mesh_tls_connections_total{direction=\"inbound\",result=\"plaintext_refused\"}")
            .await,
        0.0
    );
}
