//! MySQL through the sidecar: a real MariaDB 10.11 server (started by the
//! test in a temporary directory), the mariadb client and mysql_async.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use custody_testkit::MariaDb;
use custody_testkit::fixtures::{self, BIG_TABLE_ROWS};
use hyper::Response;
use mysql_async::prelude::Queryable as _;
use mysql_async::{Conn, OptsBuilder};
use serde_json::Value;

use crate::support::*;

fn opts(db: &MariaDb, addr: SocketAddr) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some(db.user()))
        .pass(Some(db.password()))
        .db_name(Some(db.database()))
        .prefer_socket(false)
}

fn mariadb_cli(db: &MariaDb, addr: SocketAddr, sql: &str) -> String {
    let out = Command::new("mariadb")
        .args([
            "--protocol=TCP",
            "-h",
            &addr.ip().to_string(),
            "-P",
            &addr.port().to_string(),
            "-u",
            db.user(),
            &format!("-p{}", db.password()),
            "-N",
            "-B",
            db.database(),
            "-e",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mariadb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_statements_are_forwarded_unchanged_and_recorded_classified() {
    let server = MariaDb::start().unwrap();
    let shop = fixtures::load_shop(&server).unwrap();
    fixtures::create_big_table(&server, "big").unwrap();
    let trust = Trust::new(&["reports"]);
    let listen = free_port();
    let extra = format!(
        "databases:\n  - {{ protocol: mysql, listen: \"{listen}\", upstream: \"{}\" }}\n",
        server.addr()
    );
    let ports = [free_port(), free_port(), free_port()];
    // The pod's app reads with the request's traceparent as a connection attribute.
    let app_opts = opts(&server, listen);
    let app = App::start(Arc::new(move |req| {
        let app_opts = app_opts.clone();
        Box::pin(async move {
            let traceparent = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let mut conn = Conn::new(app_opts.connect_attribute("traceparent", traceparent))
                .await
                .unwrap();
            let _: Vec<String> = conn
                .query("SELECT phone FROM customers ORDER BY id LIMIT 3")
                .await
                .unwrap();
            conn.disconnect().await.unwrap();
            Response::builder().status(200).body(full("")).unwrap()
        })
    }))
    .await;
    let mut spec = Spec::new("reports", app.addr);
    spec.extra = &extra;
    let sc = start_on(spec, &trust, ports).await;
    wait_listening(listen).await;

    // The mariadb client (mysql_native_password, text protocol): same answer.
    let sql = "SELECT name, email, phone, ssn, card_number FROM customers ORDER BY id";
    assert_eq!(
        mariadb_cli(&server, listen, sql),
        mariadb_cli(&server, server.addr(), sql)
    );
    let hop = sc
        .wait_hop(|h| {
            db(h)["tables_read"] == serde_json::json!(["customers"])
                && db(h)["rows_returned"] == shop.customers.len()
        })
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_MYSQL");
    assert_eq!(db(&hop)["system"], "mysql");
    assert_eq!(db(&hop)["user"], server.user());
    assert_eq!(db(&hop)["database"], server.database());
    assert_eq!(db(&hop)["statement_kind"], "select");
    let found = classes(&hop);
    for class in ["pii.email", "pii.ssn", "financial.card", "pii.phone"] {
        assert!(found.iter().any(|c| c == class), "{class} not in {found:?}");
    }

    // mysql_async: a prepared statement executed 1,000 times (binary protocol).
    let mut conn = Conn::new(opts(&server, listen)).await.unwrap();
    let stmt = conn
        .prep("SELECT email FROM customers WHERE id = ?")
        .await
        .unwrap();
    for i in 0..1000 {
        let want = &shop.customers[i % shop.customers.len()];
        let email: Option<String> = conn.exec_first(&stmt, (want.id,)).await.unwrap();
        assert_eq!(email.as_deref(), Some(want.email.as_str()));
    }
    let is_execution = |h: &Value| {
        db(h)["columns"] == serde_json::json!(["customers.email", "customers.id"])
            && classes(h) == vec!["pii.email".to_owned()]
    };
    let hops = sc.hops_where(1000, is_execution).await;
    let executions = hops.iter().filter(|h| is_execution(h)).count();
    assert!(executions >= 1000, "{executions} executions");

    // 100,000 rows arrive whole.
    let rows: Vec<(i64, String, String)> = conn
        .query("SELECT id, email, payload FROM big")
        .await
        .unwrap();
    assert_eq!(rows.len(), BIG_TABLE_ROWS);
    let big = sc
        .wait_hop(|h| db(h)["tables_read"] == serde_json::json!(["big"]))
        .await;
    assert_eq!(db(&big)["rows_returned"], BIG_TABLE_ROWS);

    // Errors pass through with the server's number.
    let err = conn
        .query_drop("SELECT nope FROM nowhere")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1146"), "{err}");
    sc.wait_hop(|h| db(h)["error_code"] == "1146").await;
    conn.disconnect().await.unwrap();

    // A connection attribute names the chain of the request in flight.
    let resp = client()
        .request(
            hyper::Request::get(format!("http://{}/report", sc.inbound))
                .header("x-custody-user", "dana@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let inbound = sc
        .wait_hop(|h| {
            h["initiator"]["subject"] == "dana@example.com" && h["direction"] == "DIRECTION_INBOUND"
        })
        .await;
    let query = sc
        .wait_hop(|h| {
            h["chain_id"] == inbound["chain_id"]
                && db(h)["tables_read"] == serde_json::json!(["customers"])
        })
        .await;
    assert_eq!(
        query["attribution"]["method"],
        "ATTRIBUTION_METHOD_CONNECTION_ATTRIBUTE"
    );
    assert_eq!(query["parent_span_id"], inbound["span_id"]);
    assert_eq!(classes(&query), vec!["pii.phone".to_owned()]);

    let text = std::fs::read_to_string(&sc.hops_file).unwrap();
    for c in &shop.customers {
        for value in [&c.email, &c.ssn, &c.card_number, &c.phone] {
            assert!(!text.contains(value.as_str()), "raw value leaked: {value}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_query_is_killed_from_a_second_session_through_the_sidecar() {
    let server = MariaDb::start().unwrap();
    let trust = Trust::new(&["reports"]);
    let listen = free_port();
    let extra = format!(
        "databases:\n  - {{ protocol: mysql, listen: \"{listen}\", upstream: \"{}\" }}\n",
        server.addr()
    );
    let mut spec = Spec::new("reports", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    let mut sleeper = Conn::new(opts(&server, listen)).await.unwrap();
    let id = sleeper.id();
    let sleeping = tokio::spawn(async move {
        let result: Result<Vec<i64>, _> = sleeper.query("SELECT SLEEP(30)").await;
        (sleeper, result)
    });
    // KILL QUERY from a second session, once the first one is running it.
    let mut killer = Conn::new(opts(&server, listen)).await.unwrap();
    let running = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {id} AND INFO LIKE 'SELECT SLEEP%'"
    );
    let mut seen_running = false;
    for _ in 0..500 {
        let n: Option<i64> = killer.query_first(&running).await.unwrap();
        if n == Some(1) {
            seen_running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen_running, "the sleep never started");
    killer.query_drop(format!("KILL QUERY {id}")).await.unwrap();

    // The bound only keeps a broken relay from hanging the test: the sleep
    // would otherwise end by itself after 30 s with no error.
    let (mut sleeper, result) = tokio::time::timeout(std::time::Duration::from_secs(25), sleeping)
        .await
        .expect("the kill reached the server")
        .unwrap();
    let err = result.expect_err("the query was interrupted");
    match &err {
        mysql_async::Error::Server(e) => assert_eq!(e.code, 1317, "{err}"),
        other => panic!("not a server error: {other}"),
    }
    // The interrupted session stays usable.
    let one: Option<i64> = sleeper.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    sleeper.disconnect().await.unwrap();
    killer.disconnect().await.unwrap();

    let killed = sc.wait_hop(|h| db(h)["error_code"] == "1317").await;
    assert_eq!(db(&killed)["statement_kind"], "select");
    assert_eq!(db(&killed)["user"], server.user());
    // Both statements are hops: the KILL on the second session, the one
    // that polled the process list.
    let is_poll = |h: &Value| {
        db(h)["tables_read"].as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t.as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase()
                    .contains("processlist")
            })
        })
    };
    let hops = sc
        .hops_where(1, |h| {
            h["protocol"] == "PROTOCOL_MYSQL" && db(h)["statement_kind"] == "other"
        })
        .await;
    let poll = hops
        .iter()
        .find(|h| is_poll(h))
        .expect("the polls are hops");
    let killer_port = &poll["connection"]["src_port"];
    assert_ne!(killer_port, &killed["connection"]["src_port"]);
    let kills: Vec<&Value> = hops
        .iter()
        .filter(|h| {
            &h["connection"]["src_port"] == killer_port && db(h)["statement_kind"] == "other"
        })
        .collect();
    assert_eq!(kills.len(), 1, "{kills:#?}");
    assert_eq!(db(kills[0])["error_code"], "");
    assert_eq!(db(kills[0])["user"], server.user());
}

/// What a statement reading its own text from the process list sees.
const OWN_TEXT: &str = "SELECT INFO FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()";

/// The texts the server saw for a `COM_QUERY`, the same query commented by
/// the app, and a prepared one; then a result set.
async fn own_texts(opts: OptsBuilder) -> Value {
    let mut conn = Conn::new(opts).await.unwrap();
    let simple: Option<String> = conn.query_first(OWN_TEXT).await.unwrap();
    let commented: Option<String> = conn
        .query_first(format!("{OWN_TEXT} /* mine */"))
        .await
        .unwrap();
    let prepared: Option<String> = conn.exec_first(OWN_TEXT, ()).await.unwrap();
    let rows: Vec<(String, String)> = conn
        .query("SELECT name, email FROM customers ORDER BY id;")
        .await
        .unwrap();
    conn.disconnect().await.unwrap();
    serde_json::json!({
        "simple": simple, "commented": commented, "prepared": prepared, "rows": rows,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_names_the_chain_in_the_process_list_and_changes_nothing_else() {
    let server = MariaDb::start().unwrap();
    fixtures::load_shop(&server).unwrap();
    let trust = Trust::new(&["reports"]);
    let annotating = free_port();
    let plain = free_port();
    let extra = format!(
        "databases:\n  - {{ protocol: mysql, listen: \"{annotating}\", upstream: \"{db}\", annotate: true }}\n  \
         - {{ protocol: mysql, listen: \"{plain}\", upstream: \"{db}\" }}\n",
        db = server.addr()
    );
    let (via_annotating, via_plain) = (opts(&server, annotating), opts(&server, plain));
    let app = App::start(Arc::new(move |req| {
        let opts = if req.uri().path() == "/annotated" {
            via_annotating.clone()
        } else {
            via_plain.clone()
        };
        Box::pin(async move { Response::new(full(own_texts(opts).await.to_string())) })
    }))
    .await;
    let spec = Spec {
        extra: &extra,
        ..Spec::new("reports", app.addr)
    };
    let sc = start(spec, &trust).await;
    wait_listening(annotating).await;
    wait_listening(plain).await;
    // The probes' sessions end before any request is in flight.
    sc.hops_where(2, |h| {
        h["protocol"] == "PROTOCOL_MYSQL" && h["operation"] == "connection"
    })
    .await;
    let ask = |path: &'static str| {
        let inbound = sc.inbound;
        async move {
            let resp = client()
                .request(
                    hyper::Request::get(format!("http://{inbound}{path}"))
                        .header("x-custody-user", "dana@example.com")
                        .body(full(""))
                        .unwrap(),
                )
                .await
                .unwrap();
            let (status, body) = body_string(resp).await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()
        }
    };

    let seen = ask("/annotated").await;
    let inbound = sc
        .wait_hop(|h| h["direction"] == "DIRECTION_INBOUND" && h["operation"] == "GET /annotated")
        .await;
    let chain = inbound["chain_id"].as_str().unwrap();
    let span = inbound["span_id"].as_str().unwrap();
    assert_eq!(
        seen["simple"],
        format!("{OWN_TEXT} /*custody_chain='{chain}',traceparent='00-{chain}-{span}-01'*/")
    );
    assert_eq!(seen["commented"], format!("{OWN_TEXT} /* mine */"));
    assert_eq!(seen["prepared"], OWN_TEXT);
    let annotated_metric = "custody_proxy_db_annotated_total{system=\"mysql\"}";
    // The self-read, the result set, and the client's own setup queries.
    let annotated = sc.metric(annotated_metric).await;
    assert!(annotated >= 2.0, "{annotated}");

    let unchanged = ask("/plain").await;
    assert_eq!(unchanged["simple"], OWN_TEXT);
    assert_eq!(unchanged["rows"], seen["rows"]);
    let direct = own_texts(opts(&server, server.addr())).await;
    assert_eq!(direct["rows"], seen["rows"]);
    assert_eq!(seen["rows"].as_array().unwrap().len(), 50);

    let hop = sc
        .wait_hop(|h| {
            h["chain_id"] == chain && db(h)["tables_read"] == serde_json::json!(["customers"])
        })
        .await;
    assert_eq!(hop["attribution"]["method"], "ATTRIBUTION_METHOD_STITCHED");
    assert_eq!(hop["parent_span_id"], span);

    // No chain in flight: nothing to annotate.
    let mut alone = Conn::new(opts(&server, annotating)).await.unwrap();
    let text: Option<String> = alone.query_first(OWN_TEXT).await.unwrap();
    assert_eq!(text.as_deref(), Some(OWN_TEXT));
    alone.disconnect().await.unwrap();
    assert_eq!(sc.metric(annotated_metric).await, annotated);
}

/// A MariaDB serving TLS with a certificate for `db.test` signed by the CA
/// in `certs` (see [`tls_certificates`]).
fn mariadb_with_tls(certs: &std::path::Path) -> MariaDb {
    use std::os::unix::fs::PermissionsExt;
    tls_certificates(certs, "db.test");
    // The server runs as its own user: it must be able to read them.
    std::fs::set_permissions(certs, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::set_permissions(certs.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let path = |file: &str| certs.join(file).display().to_string();
    MariaDb::start_with(
        custody_testkit::Options::default()
            .setting("ssl-cert", &path("tls.crt"))
            .setting("ssl-key", &path("tls.key"))
            .setting("ssl-ca", &path("ca.crt")),
    )
    .unwrap()
}

/// TLS required, the peer verified against the test CA as `db.test`.
fn tls_opts(db: &MariaDb, addr: SocketAddr, certs: &std::path::Path) -> OptsBuilder {
    opts(db, addr).ssl_opts(
        mysql_async::SslOpts::default()
            .with_root_certs(vec![certs.join("ca.crt").into()])
            .with_disable_built_in_roots(true)
            .with_danger_tls_hostname_override(Some("db.test")),
    )
}

/// The cipher the server sees on this session (empty: not TLS).
async fn server_cipher(conn: &mut Conn) -> String {
    let row: Option<(String, String)> = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await
        .unwrap();
    row.map(|(_, cipher)| cipher).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_mysql_session_passes_through_and_says_it_was_not_inspected() {
    let certs = tempfile::tempdir().unwrap();
    let server = mariadb_with_tls(certs.path());
    let trust = Trust::new(&["reports"]);
    let listen = free_port();
    let extra = format!(
        "databases:\n  - {{ protocol: mysql, listen: \"{listen}\", upstream: \"{}\" }}\n",
        server.addr()
    );
    let mut spec = Spec::new("reports", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    let mut conn = Conn::new(tls_opts(&server, listen, certs.path()))
        .await
        .unwrap();
    assert!(!server_cipher(&mut conn).await.is_empty(), "TLS end to end");
    conn.disconnect().await.unwrap();
    let hop = sc
        .wait_hop(|h| h["operation"] == "encrypted, not inspected")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_MYSQL");
    assert_eq!(db(&hop)["transport"], "tls_passthrough");
    assert_eq!(db(&hop)["parsed"], false);
    assert!(hop["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(
        sc.metric("custody_proxy_db_connections_total{system=\"mysql\",inspection=\"encrypted\"}")
            .await,
        1.0
    );
    // No statement of the encrypted session became a hop of its own.
    let text = std::fs::read_to_string(&sc.hops_file).unwrap();
    assert!(!text.contains("Ssl_cipher") && !text.contains("\"statement_kind\":\"select\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_mysql_tls_session_is_decoded_between_the_two_tls_ends() {
    let certs = tempfile::tempdir().unwrap();
    let server = mariadb_with_tls(certs.path());
    let shop = fixtures::load_shop(&server).unwrap();
    let trust = Trust::new(&["reports"]);
    let listen = free_port();
    let c = certs.path();
    let extra = format!(
        "databases:\n  - protocol: mysql\n    listen: \"{listen}\"\n    upstream: \"{}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", upstream_server_name: db.test }}\n",
        server.addr(),
        c.join("tls.crt").display(),
        c.join("tls.key").display(),
        c.join("ca.crt").display(),
    );
    let mut spec = Spec::new("reports", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    // The client required TLS and verified the sidecar's certificate; the
    // server sees TLS (from the sidecar).
    let mut conn = Conn::new(tls_opts(&server, listen, certs.path()))
        .await
        .unwrap();
    assert!(!server_cipher(&mut conn).await.is_empty());
    let sql = "SELECT email, ssn FROM customers ORDER BY id";
    let via: Vec<(String, String)> = conn.query(sql).await.unwrap();
    let mut direct_conn = Conn::new(opts(&server, server.addr())).await.unwrap();
    let direct: Vec<(String, String)> = direct_conn.query(sql).await.unwrap();
    direct_conn.disconnect().await.unwrap();
    assert_eq!(via, direct);
    // Prepared statements decode too.
    let email: Option<String> = conn
        .exec_first(
            "SELECT email FROM customers WHERE id = ?",
            (shop.customers[0].id,),
        )
        .await
        .unwrap();
    assert_eq!(email.as_deref(), Some(shop.customers[0].email.as_str()));
    conn.disconnect().await.unwrap();

    let hop = sc
        .wait_hop(|h| {
            db(h)["tables_read"] == serde_json::json!(["customers"])
                && db(h)["rows_returned"] == shop.customers.len()
        })
        .await;
    assert_eq!(db(&hop)["transport"], "tls_terminated");
    assert_eq!(db(&hop)["user"], server.user());
    assert_eq!(db(&hop)["database"], server.database());
    let found = classes(&hop);
    assert!(found.iter().any(|c| c == "pii.ssn"), "{found:?}");
    let prepared = sc
        .wait_hop(|h| db(h)["columns"] == serde_json::json!(["customers.email", "customers.id"]))
        .await;
    assert_eq!(db(&prepared)["transport"], "tls_terminated");

    // A client that does not ask for TLS goes on in plaintext, decoded.
    let mut plain = Conn::new(opts(&server, listen)).await.unwrap();
    assert_eq!(server_cipher(&mut plain).await, "");
    let _: Vec<String> = plain
        .query("SELECT phone FROM customers ORDER BY id LIMIT 2")
        .await
        .unwrap();
    plain.disconnect().await.unwrap();
    let plain_hop = sc
        .wait_hop(|h| db(h)["columns"] == serde_json::json!(["customers.id", "customers.phone"]))
        .await;
    assert_eq!(db(&plain_hop)["transport"], "plaintext");
    assert_eq!(db(&plain_hop)["user"], server.user());

    assert_eq!(
        sc.metric("custody_proxy_db_connections_total{system=\"mysql\",inspection=\"tls_failed\"}")
            .await,
        0.0
    );
    let text = std::fs::read_to_string(&sc.hops_file).unwrap();
    for c in &shop.customers {
        for value in [&c.email, &c.ssn] {
            assert!(!text.contains(value.as_str()), "raw value leaked: {value}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_greets_costs_a_terminating_client_its_connection() {
    use tokio::io::AsyncReadExt;
    let certs = tempfile::tempdir().unwrap();
    tls_certificates(certs.path(), "db.test");
    // A fault-injecting "server": accepts and never sends its greeting.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = silent.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                let _ = closed_tx.send(rest.len());
            });
        }
    });
    let trust = Trust::new(&["reports"]);
    let listen = free_port();
    let c = certs.path();
    let extra = format!(
        "databases:\n  - protocol: mysql\n    listen: \"{listen}\"\n    upstream: \"{silent_addr}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", \
         handshake_timeout_ms: 300 }}\n",
        c.join("tls.crt").display(),
        c.join("tls.key").display(),
        c.join("ca.crt").display(),
    );
    let mut spec = Spec::new("reports", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    // No probe here: every connection to the listener is one to the silent server.
    let mut client = loop {
        match tokio::net::TcpStream::connect(listen).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    // The bound only keeps a broken sidecar from hanging the test.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        client.read_to_end(&mut answer),
    )
    .await
    .expect("the sidecar closed the client's connection");
    assert!(read.is_err() || answer.is_empty(), "{answer:?}");
    let forwarded = tokio::time::timeout(std::time::Duration::from_secs(60), closed_rx.recv())
        .await
        .expect("the sidecar closed the server's connection")
        .unwrap();
    assert_eq!(forwarded, 0);
    let hop = sc
        .wait_hop(|h| h["operation"] == "tls termination failed: server_timeout")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_MYSQL");
    assert_eq!(
        sc.metric(
            "custody_proxy_db_tls_failures_total{system=\"mysql\",reason=\"server_timeout\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_sidecar_takes_a_replaced_certificate_while_a_mysql_session_stays() {
    let certs = tempfile::tempdir().unwrap();
    let server = mariadb_with_tls(certs.path());
    // The sidecar's certificates: `old` from CA `front1`, `new` from CA
    // `front2`, so a client trusting one CA only tells which it was shown.
    let front = tempfile::tempdir().unwrap();
    let f = front.path();
    mesh_ca(f, "front1");
    mesh_ca(f, "front2");
    dns_cert(f, "front1", "old", "orders-db.test");
    dns_cert(f, "front2", "new", "orders-db.test");
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    std::fs::copy(f.join("old.crt"), &cert).unwrap();
    std::fs::copy(f.join("old.key"), &key).unwrap();
    let trust = Trust::new(&["reports"]);
    let listen = free_port();
    let extra = format!(
        "databases:\n  - protocol: mysql\n    listen: \"{listen}\"\n    upstream: \"{}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", \
         upstream_server_name: db.test, reload_interval_ms: 50 }}\n",
        server.addr(),
        cert.display(),
        key.display(),
        certs.path().join("ca.crt").display(),
    );
    let mut spec = Spec::new("reports", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;
    let trusting = |ca: &str| {
        opts(&server, listen).ssl_opts(
            mysql_async::SslOpts::default()
                .with_root_certs(vec![f.join(format!("{ca}.crt")).into()])
                .with_disable_built_in_roots(true)
                .with_danger_tls_hostname_override(Some("orders-db.test")),
        )
    };

    let mut established = Conn::new(trusting("front1")).await.unwrap();
    assert!(!server_cipher(&mut established).await.is_empty());
    assert!(Conn::new(trusting("front2")).await.is_err());

    std::fs::write(
        cert.with_extension("next"),
        std::fs::read(f.join("new.crt")).unwrap(),
    )
    .unwrap();
    std::fs::rename(cert.with_extension("next"), &cert).unwrap();
    std::fs::write(
        key.with_extension("next"),
        std::fs::read(f.join("new.key")).unwrap(),
    )
    .unwrap();
    std::fs::rename(key.with_extension("next"), &key).unwrap();
    wait_metric(
        &sc,
        "custody_proxy_tls_reloads_total{material=\"databases[0].tls\",result=\"applied\"}",
        1.0,
    )
    .await;

    // New sessions are shown the new certificate.
    let mut fresh = Conn::new(trusting("front2")).await.unwrap();
    assert!(!server_cipher(&mut fresh).await.is_empty());
    fresh.disconnect().await.unwrap();
    assert!(Conn::new(trusting("front1")).await.is_err());
    // The session opened before goes on.
    assert!(!server_cipher(&mut established).await.is_empty());
    established.disconnect().await.unwrap();
}
