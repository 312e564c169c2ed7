//! Transparent mode: the application dials the real destination, iptables
//! redirects the connection to the sidecar, and the sidecar serves it at its
//! original destination (`SO_ORIGINAL_DST`), enforcing egress by address.
//!
//! Runs inside a network namespace the test creates (root needed: CI runs
//! as root); all traffic stays inside it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace the test made, deleted with the processes it ran.
pub(crate) struct Netns {
    pub(crate) name: String,
    pub(crate) children: Vec<Child>,
}

impl Netns {
    pub(crate) fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    pub(crate) fn spawn(&mut self, args: &[&str]) {
        let child = self
            .exec(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// `curl` from a source port the redirect rule catches.
    fn curl(&self, url: &str, host: &str) -> (String, String) {
        let out = self
            .exec(&[
                "curl",
                "-s",
                "--max-time",
                "10",
                "--local-port",
                "20000-20100",
                "-H",
                &format!("host: {host}"),
                "-w",
                "\n%{http_code}",
                url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn transparent_mode_serves_the_original_destination() {
    assert_eq!(
        run(&["id", "-u"]).trim(),
        "0",
        "this test creates a network namespace and needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let name = format!("custody-proxy-{}", std::process::id());
    run(&["ip", "netns", "add", &name]);
    let mut ns = Netns {
        name: name.clone(),
        children: vec![],
    };
    for args in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.99.0.2/32", "dev", "lo"],
        vec!["ip", "addr", "add", "10.99.0.3/32", "dev", "lo"],
        // The app's connections (from ports 20000-20100) go to the sidecar;
        // the sidecar's own connections use ephemeral ports and go out.
        vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.99.0.0/24",
            "--sport",
            "20000:20100",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ] {
        let status = ns.exec(&args).status().unwrap();
        assert!(status.success(), "{args:?}");
    }

    std::fs::write(dir.path().join("hello.txt"), "hello from 10.99.0.2\n").unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        r#"
version: 1
defaultVerdict: allow
policies:
  - apiVersion: custody.dev/v1
    kind: EgressPolicy
    metadata: { name: internal-only }
    spec:
      rules:
        - name: no-10-99-0-3
          destination: { cidrs: ["10.99.0.3/32"] }
          verdict: block
        - name: no-partner-tls
          destination: { hosts: ["*.partner.example"] }
          verdict: block
"#,
    )
    .unwrap();
    let hops = dir.path().join("hops.jsonl");
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
workload: {{ trust_domain: td.test, namespace: test, service_account: client }}
listeners: {{ inbound: "127.0.0.1:15006", outbound: "127.0.0.1:15001", admin: "127.0.0.1:15020" }}
inbound: {{ upstream: "127.0.0.1:8080" }}
outbound: {{ mode: transparent }}
policy: {{ file: "{}" }}
exporter: {{ jsonl_file: "{}", flush_interval_ms: 20 }}
shutdown: {{ grace_period_secs: 0 }}
tcp_ports: [2525]
"#,
            policy.display(),
            hops.display()
        ),
    )
    .unwrap();
    let served = dir.path().to_str().unwrap().to_owned();
    ns.spawn(&[
        "python3",
        "-m",
        "http.server",
        "80",
        "--bind",
        "10.99.0.2",
        "--directory",
        &served,
    ]);
    ns.spawn(&[
        env!("CARGO_BIN_EXE_custody-proxy"),
        "--config",
        config.to_str().unwrap(),
    ]);
    let tcp_server = dir.path().join("tcp_server.py");
    std::fs::write(&tcp_server, TCP_SERVER).unwrap();
    ns.spawn(&["python3", tcp_server.to_str().unwrap()]);
    let tcp_client = dir.path().join("tcp_client.py");
    std::fs::write(&tcp_client, TCP_CLIENT).unwrap();
    // A TLS server on 10.99.0.2:443 with a self-signed certificate.
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=files.internal",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    let tls_server = dir.path().join("tls_server.py");
    std::fs::write(&tls_server, TLS_SERVER).unwrap();
    ns.spawn(&[
        "python3",
        tls_server.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        &served,
    ]);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = ns
            .exec(&["curl", "-sf", "http://127.0.0.1:15020/ready"])
            .output()
            .unwrap();
        let app = ns
            .exec(&["curl", "-sf", "http://10.99.0.2/hello.txt"])
            .output()
            .unwrap();
        if ready.status.success() && app.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "sidecar or app did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (code, body) = ns.curl("http://10.99.0.2/hello.txt", "files.internal");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "hello from 10.99.0.2\n")
    );
    let (code, body) = ns.curl("http://10.99.0.3/anything", "elsewhere.internal");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("internal-only"), "{body}");

    // Not HTTP: passed through as TCP, client-first (sniffed) and
    // server-first (a `tcp_ports` port); blocked by address.
    let tcp = |host: &str, port: &str, sport: &str, greet: &str| {
        let out = ns
            .exec(&[
                "python3",
                tcp_client.to_str().unwrap(),
                host,
                port,
                sport,
                greet,
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while ns
        .exec(&[
            "python3",
            "-c",
            "import socket; socket.create_connection(('10.99.0.2', 2525), 1)",
        ])
        .status()
        .map_or(true, |s| !s.success())
    {
        assert!(Instant::now() < deadline, "tcp server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tcp("10.99.0.2", "7000", "20060", "0"), "ping\n");
    assert_eq!(tcp("10.99.0.2", "2525", "20061", "1"), "greeting\nping\n");
    assert_eq!(tcp("10.99.0.3", "7000", "20062", "0"), "");

    // TLS: the server name decides; the bytes pass through untouched.
    let https = |name: &str, sport: &str| {
        ns.exec(&[
            "curl",
            "-sk",
            "--max-time",
            "10",
            "--local-port",
            sport,
            "--resolve",
            &format!("{name}:443:10.99.0.2"),
            &format!("https://{name}/hello.txt"),
        ])
        .output()
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ns
        .exec(&[
            "curl",
            "-sk",
            "--max-time",
            "2",
            "https://10.99.0.2/hello.txt",
        ])
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "tls server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let allowed = https("files.internal", "20070");
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        "hello from 10.99.0.2\n"
    );
    let blocked = https("api.partner.example", "20071");
    assert!(!blocked.status.success());

    let deadline = Instant::now() + Duration::from_secs(20);
    let events: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&hops).unwrap_or_default();
        let events: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if events.len() >= 7 {
            break events;
        }
        assert!(Instant::now() < deadline, "hop events missing: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let dest = &events[0]["egress"]["destination"];
    assert_eq!(dest["ip"], "10.99.0.2");
    assert_eq!(dest["port"], 80);
    assert_eq!(dest["host"], "files.internal");
    assert_eq!(events[0]["status"], 200);
    assert_eq!(events[1]["egress"]["verdict"], "VERDICT_BLOCK");
    assert_eq!(events[1]["egress"]["destination"]["ip"], "10.99.0.3");

    let tcp_hops: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["protocol"] == "PROTOCOL_TCP")
        .collect();
    assert_eq!(tcp_hops.len(), 3, "{events:#?}");
    let to = |port: u64, ip: &str| {
        tcp_hops
            .iter()
            .find(|h| {
                h["egress"]["destination"]["port"] == port && h["egress"]["destination"]["ip"] == ip
            })
            .unwrap_or_else(|| panic!("no tcp hop to {ip}:{port}: {tcp_hops:#?}"))
    };
    assert_eq!(to(7000, "10.99.0.2")["bytes_in"], 5);
    assert_eq!(to(7000, "10.99.0.2")["bytes_out"], 5);
    assert_eq!(to(2525, "10.99.0.2")["bytes_out"], 14);
    assert_eq!(to(7000, "10.99.0.3")["egress"]["verdict"], "VERDICT_BLOCK");
    assert_eq!(to(7000, "10.99.0.3")["bytes_out"], 0);

    let tls_hops: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["protocol"] == "PROTOCOL_TLS_OPAQUE")
        .collect();
    assert_eq!(tls_hops.len(), 2, "{events:#?}");
    let by_host = |host: &str| {
        tls_hops
            .iter()
            .find(|h| h["egress"]["destination"]["host"] == host)
            .unwrap_or_else(|| panic!("no tls hop for {host}: {tls_hops:#?}"))
    };
    assert_eq!(
        by_host("files.internal")["egress"]["verdict"],
        "VERDICT_ALLOW"
    );
    assert!(by_host("files.internal")["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(
        by_host("api.partner.example")["egress"]["verdict"],
        "VERDICT_BLOCK"
    );
    assert_eq!(
        by_host("api.partner.example")["egress"]["policy"],
        "internal-only"
    );
}

const TLS_SERVER: &str = r#"
import functools, http.server, ssl, sys
cert, key, directory = sys.argv[1:4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
server = http.server.ThreadingHTTPServer(("10.99.0.2", 443), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

const TCP_SERVER: &str = r#"
import socket, threading

def serve(port, greet):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.99.0.2", port))
    s.listen()
    while True:
        c, _ = s.accept()
        def handle(c):
            if greet:
                c.sendall(b"greeting\n")
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
            c.close()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

threading.Thread(target=serve, args=(7000, False), daemon=True).start()
serve(2525, True)
"#;

const TCP_CLIENT: &str = r#"
import socket, sys
host, port, sport, greet = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("0.0.0.0", sport))
c.settimeout(10)
c.connect((host, port))
out = b""
if greet:
    while len(out) < 9:
        d = c.recv(100)
        if not d:
            break
        out += d
try:
    c.sendall(b"ping\n")
    data = b""
    while len(data) < 5:
        d = c.recv(100)
        if not d:
            break
        data += d
    out += data
except OSError:
    pass
c.close()
sys.stdout.write(out.decode())
"#;
