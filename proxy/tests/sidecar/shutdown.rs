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
