//! Graceful shutdown of the real binary: SIGTERM stops it within the grace
//! period, and a request in flight completes.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Request, Response};
use tokio::sync::Notify;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits() {
    let trust = Trust::new(&["svc"]);
    let arrived = Arc::new(Notify::new());
    let arrived2 = Arc::clone(&arrived);
    let app = App::start(Arc::new(move |_req| {
        let arrived = Arc::clone(&arrived2);
        Box::pin(async move {
            arrived.notify_one();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Response::new(full("slow but complete"))
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let spec = Spec {
        extra: "",
        ..Spec::new("svc", app.addr)
    };
    let yaml = config_yaml(&spec, &trust, dir.path(), ports)
        .replace("grace_period_secs: 0", "grace_period_secs: 3");
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_custody-proxy"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(ports[0]).await.is_err() {
        assert!(Instant::now() < deadline, "binary did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let inbound = ports[0];
    let request = tokio::spawn(async move {
        let resp = client()
            .request(
                Request::get(format!("http://{inbound}/slow"))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        body_string(resp).await
    });
    tokio::time::timeout(Duration::from_secs(20), arrived.notified())
        .await
        .expect("request never reached the app");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let (code, body) = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("in-flight request did not complete")
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "slow but complete"));

    // Exits on its own once the grace period is over (the guard is generous).
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("custody-proxy did not exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    // No longer listening.
    assert!(tokio::net::TcpStream::connect(ports[0]).await.is_err());
}

#[test]
fn an_invalid_configuration_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        r#"
workload: { trust_domain: td, namespace: shop, service_account: web }
listeners: { inbound: "127.0.0.1:1", outbound: "127.0.0.1:2", admin: "127.0.0.1:3" }
inbound: { upstream: "not an address" }
outbound: { mode: transparent }
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_custody-proxy"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("inbound.upstream"), "{stderr}");
}

/// The tunnel sockets of `dir` (`<tmp>/custody-<uid>/`).
fn tunnel_sockets(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tls-tunnel-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_with_sigkill_restarts_and_its_stale_tunnel_socket_is_removed() {
    use std::os::unix::fs::MetadataExt as _;
    let trust = Trust::new(&["svc"]);
    let app = App::ok().await;
    let certs = tempfile::tempdir().unwrap();
    mesh_ca(certs.path(), "mesh");
    mesh_cert(certs.path(), "mesh", "svc", Some(&uri_of("svc")));
    let tmp = tempfile::tempdir().unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let sockets = tmp.path().join(format!("custody-{uid}"));
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    // The sidecar calls its own inbound port as a mesh peer: the request
    // crosses the tunnel, then mesh mTLS, then reaches the app.
    let mesh = mesh_tls_yaml(certs.path(), "mesh", "svc", "peers: [self]");
    let mut spec = Spec::new("svc", app.addr);
    spec.upstreams = vec![("self".into(), ports[0])];
    spec.extra = &mesh;
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, config_yaml(&spec, &trust, dir.path(), ports)).unwrap();
    let launch = || {
        Command::new(env!("CARGO_BIN_EXE_custody-proxy"))
            .arg("--config")
            .arg(&config)
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let serve_through_the_tunnel = |round: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(ports[1]).await.is_err() {
            assert!(Instant::now() < deadline, "binary did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let resp = call_out(ports[1], "self", None).await;
        assert_eq!(resp.status(), 200, "round {round}");
    };

    let mut first = launch();
    serve_through_the_tunnel(1).await;
    assert_eq!(app.seen().len(), 1);
    let stale = tunnel_sockets(&sockets);
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert!(stale[0].starts_with(&format!("tls-tunnel-{}-", first.id())));
    let mode = std::fs::metadata(&sockets).unwrap().mode();
    assert_eq!(mode & 0o777, 0o700);
    // SIGKILL: no chance to remove the socket.
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(tunnel_sockets(&sockets), stale);

    let mut second = launch();
    serve_through_the_tunnel(2).await;
    assert_eq!(app.seen().len(), 2);
    let now = tunnel_sockets(&sockets);
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(now[0].starts_with(&format!("tls-tunnel-{}-", second.id())));
    let status = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(second.wait().unwrap().success());
    // A graceful stop removes its own socket.
    assert_eq!(tunnel_sockets(&sockets), Vec::<String>::new());
}
