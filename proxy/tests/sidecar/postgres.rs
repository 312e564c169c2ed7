//! PostgreSQL through the sidecar: a real PostgreSQL 15 server (started by
//! the test in a temporary directory), psql and tokio-postgres as clients.
//! What they see must not change; what the sidecar records must be right.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use custody_testkit::Postgres;
use custody_testkit::fixtures::{self, BIG_TABLE_ROWS, Shop};
use futures_util::SinkExt;
use hyper::Response;
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_stream::StreamExt;

use crate::support::*;

fn conninfo(pg: &Postgres, addr: SocketAddr) -> String {
    format!(
        "host={} port={} user={} password={} dbname={} sslmode=disable",
        addr.ip(),
        addr.port(),
        pg.user(),
        pg.password(),
        pg.database()
    )
}

async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

pub(crate) fn try_psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([conninfo, "-X", "-A", "-t", "-c", sql])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn psql(conninfo: &str, sql: &str) -> String {
    try_psql(conninfo, sql).unwrap_or_else(|e| panic!("psql failed: {e}"))
}

fn database_yaml(listen: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "databases:\n  - {{ protocol: postgres, listen: \"{listen}\", upstream: \"{upstream}\" }}\n"
    )
}

/// No value of the shop's sensitive columns appears in `text`.
fn assert_no_raw_values(shop: &Shop, text: &str) {
    for c in &shop.customers {
        for value in [&c.email, &c.ssn, &c.card_number, &c.phone] {
            assert!(!text.contains(value.as_str()), "raw value leaked: {value}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_forwarded_unchanged_and_recorded_classified() {
    let pg = Postgres::start().unwrap();
    let shop = fixtures::load_shop(&pg).unwrap();
    fixtures::create_big_table(&pg, "big").unwrap();
    let trust = Trust::new(&["orders"]);
    let listen = free_port();
    let extra = database_yaml(listen, pg.addr());
    let mut spec = Spec::new("orders", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;
    let direct = conninfo(&pg, pg.addr());
    let via = conninfo(&pg, listen);

    // psql (SCRAM-SHA-256 login, simple protocol): the same answer.
    let sql = "SELECT name, email, phone, ssn, card_number FROM customers ORDER BY id";
    assert_eq!(psql(&via, sql), psql(&direct, sql));
    let hop = sc
        .wait_hop(|h| db(h)["tables_read"] == serde_json::json!(["customers"]))
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_POSTGRES");
    assert_eq!(db(&hop)["system"], "postgresql");
    assert_eq!(db(&hop)["user"], pg.user());
    assert_eq!(db(&hop)["database"], pg.database());
    assert_eq!(db(&hop)["statement_kind"], "select");
    assert_eq!(db(&hop)["rows_returned"], shop.customers.len());
    assert_eq!(db(&hop)["parsed"], true);
    let found = classes(&hop);
    for class in ["pii.email", "pii.ssn", "financial.card", "pii.phone"] {
        assert!(found.iter().any(|c| c == class), "{class} not in {found:?}");
    }
    // Nothing in flight in this pod: attributed to the peer alone.
    assert_eq!(hop["attribution"]["method"], "ATTRIBUTION_METHOD_PEER_ONLY");
    assert_eq!(hop["context_outcome"], "CONTEXT_OUTCOME_MISSING");

    // tokio-postgres: one statement prepared once, executed 1,000 times;
    // every execution is a hop that still carries the statement's analysis.
    let client = connect(&via).await;
    let stmt = client
        .prepare("SELECT email FROM customers WHERE id = $1")
        .await
        .unwrap();
    for i in 0..1000 {
        let id = shop.customers[i % shop.customers.len()].id;
        let row = client.query_one(&stmt, &[&id]).await.unwrap();
        let email: String = row.get(0);
        assert_eq!(email, shop.customers[i % shop.customers.len()].email);
    }
    let is_execution = |h: &Value| {
        db(h)["columns"] == serde_json::json!(["customers.email", "customers.id"])
            && db(h)["statement_kind"] == "select"
    };
    let hops = sc.hops_where(1000, is_execution).await;
    let executions: Vec<&Value> = hops.iter().filter(|h| is_execution(h)).collect();
    assert!(executions.len() >= 1000, "{} executions", executions.len());
    assert!(
        executions
            .iter()
            .all(|h| classes(h) == vec!["pii.email".to_owned()]),
        "each execution classified from its values and column"
    );
    let fingerprints: std::collections::BTreeSet<&str> = executions
        .iter()
        .map(|h| db(h)["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(fingerprints.len(), 1);

    // A result of 100,000 rows arrives whole.
    let rows = client.simple_query("SELECT * FROM big").await.unwrap();
    let data_rows = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(data_rows, BIG_TABLE_ROWS);
    let big = sc
        .wait_hop(|h| db(h)["tables_read"] == serde_json::json!(["big"]))
        .await;
    assert_eq!(db(&big)["rows_returned"], BIG_TABLE_ROWS);

    // COPY out and in.
    let out = client
        .copy_out("COPY customers (name, email) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<_> = out.collect().await;
    let copied: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap()).collect();
    assert_eq!(
        copied.iter().filter(|b| **b == b'\n').count(),
        shop.customers.len()
    );
    let copy_out = sc
        .wait_hop(|h| db(h)["statement_kind"] == "copy" && db(h)["rows_returned"] != 0)
        .await;
    assert_eq!(db(&copy_out)["rows_returned"], shop.customers.len());
    assert!(classes(&copy_out).iter().any(|c| c == "pii.email"));
    client
        .batch_execute("CREATE TABLE notes (body TEXT)")
        .await
        .unwrap();
    let sink = client
        .copy_in("COPY notes (body) FROM STDIN")
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"one\ntwo\nthree\n"))
        .await
        .unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 3);
    let copy_in = sc
        .wait_hop(|h| {
            db(h)["tables_written"] == serde_json::json!(["notes"])
                && db(h)["statement_kind"] == "copy"
        })
        .await;
    assert_eq!(db(&copy_in)["rows_affected"], 3);

    // A query cancelled mid-flight: the CancelRequest reaches the server
    // through the sidecar, the error reaches the client, the hop records it.
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn({
        let via = via.clone();
        async move {
            let client = connect(&via).await;
            let cancel = client.cancel_token();
            let task =
                tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
            tokio::time::sleep(Duration::from_millis(500)).await;
            cancel.cancel_query(NoTls).await.unwrap();
            task.await.unwrap()
        }
    });
    let err = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the cancel reached the server")
        .unwrap()
        .expect_err("the query was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    drop(cancel);
    let cancelled = sc.wait_hop(|h| db(h)["error_code"] == "57014").await;
    assert_eq!(db(&cancelled)["statement_kind"], "select");

    // Errors pass through as the server sent them.
    let err = client
        .simple_query("SELECT nope FROM nowhere")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    sc.wait_hop(|h| db(h)["error_code"] == "42P01").await;

    assert!(
        sc.metric(
            "custody_proxy_db_queries_total{system=\"postgresql\",kind=\"select\",outcome=\"ok\"}"
        )
        .await
            >= 1001.0
    );
    assert!(
        sc.metric("custody_proxy_data_classes_total{class=\"pii.ssn\"}")
            .await
            >= 1.0
    );
    let text = std::fs::read_to_string(&sc.hops_file).unwrap();
    assert_no_raw_values(&shop, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_decoder_cannot_follow_still_reaches_the_server() {
    let pg = Postgres::start().unwrap();
    let trust = Trust::new(&["orders"]);
    let listen = free_port();
    let extra = database_yaml(listen, pg.addr());
    let mut spec = Spec::new("orders", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    // A startup packet with an impossible length: the decoder gives up, the
    // bytes still go through and the server's own answer comes back.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(listen).await.unwrap();
    raw.write_all(&[0, 0, 0, 2, 0, 3, 0, 0]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let mut direct = tokio::net::TcpStream::connect(pg.addr()).await.unwrap();
    direct.write_all(&[0, 0, 0, 2, 0, 3, 0, 0]).await.unwrap();
    let mut expected = Vec::new();
    direct.read_to_end(&mut expected).await.unwrap();
    assert_eq!(answer, expected);
    drop(raw);
    let hop = sc.wait_hop(|h| h["bytes_in"] == 8).await;
    assert_eq!(hop["operation"], "unparsed");
    assert_eq!(hop["bytes_out"], expected.len());
    assert_eq!(hop["protocol"], "PROTOCOL_POSTGRES");
    assert_eq!(
        sc.metric(
            "custody_proxy_db_connections_total{system=\"postgresql\",inspection=\"unparsed\"}"
        )
        .await,
        1.0
    );

    // A healthy session on the same listener is unaffected.
    let client = connect(&conninfo(&pg, listen)).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// The pod's app: answers `/ssn` or `/email` by reading that column for a
/// customer and then calling the partner; `/comment` reads with a
/// sqlcommenter `traceparent` naming the request's own span.
async fn orders_app(db: String, outbound: SocketAddr) -> App {
    App::start(Arc::new(move |req| {
        let db = db.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let traceparent = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let client = connect(&db).await;
            let sql = match path.as_str() {
                "/ssn" => "SELECT ssn FROM customers ORDER BY id LIMIT 5".to_owned(),
                "/comment" => format!(
                    "SELECT email FROM customers ORDER BY id LIMIT 5 /*traceparent='{traceparent}'*/"
                ),
                _ => "SELECT email FROM customers ORDER BY id LIMIT 5".to_owned(),
            };
            client.simple_query(&sql).await.unwrap();
            let resp = call_out(outbound, "api.partner.example", None).await;
            Response::builder()
                .status(resp.status())
                .body(full(""))
                .unwrap()
        })
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_read_ssns_is_blocked_from_the_partner_and_others_are_not() {
    let pg = Postgres::start().unwrap();
    let shop = fixtures::load_shop(&pg).unwrap();
    let partner = App::ok().await;
    let trust = Trust::new(&["orders"]);
    let policy_dir = tempfile::tempdir().unwrap();
    let policy_file = policy_dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        r#"
version: 1
defaultVerdict: allow
policies:
  - apiVersion: custody.dev/v1
    kind: EgressPolicy
    metadata: { name: no-ssn-to-partners }
    spec:
      rules:
        - name: partner-ssn
          destination: { hosts: ["*.partner.example"] }
          chain: { taintAny: [pii.ssn] }
          verdict: block
"#,
    )
    .unwrap();
    let listen = free_port();
    let extra = format!(
        "{}policy: {{ file: \"{}\", poll_interval_ms: 50 }}\n",
        database_yaml(listen, pg.addr()),
        policy_file.display()
    );
    let ports = [free_port(), free_port(), free_port()];
    let app = orders_app(conninfo(&pg, listen), ports[1]).await;
    let mut spec = Spec::new("orders", app.addr);
    spec.upstreams = vec![("api.partner.example".into(), partner.addr)];
    spec.extra = &extra;
    let sc = start_on(spec, &trust, ports).await;
    wait_listening(listen).await;
    // The probe's session ends before any request is in flight, so it is
    // stitched to none of them.
    sc.wait_hop(|h| h["protocol"] == "PROTOCOL_POSTGRES" && h["operation"] == "connection")
        .await;

    let ask = |path: &'static str, user: &'static str| {
        let inbound = sc.inbound;
        async move {
            let resp = client()
                .request(
                    hyper::Request::get(format!("http://{inbound}{path}"))
                        .header("x-custody-user", user)
                        .body(full(""))
                        .unwrap(),
                )
                .await
                .unwrap();
            resp.status().as_u16()
        }
    };
    // Same service, same destination: the chain that read SSNs is refused.
    assert_eq!(ask("/ssn", "alice@example.com").await, 403);
    assert_eq!(ask("/email", "bob@example.com").await, 200);
    assert_eq!(partner.seen().len(), 1);

    let inbound_of = |user: &'static str| {
        move |h: &Value| h["direction"] == "DIRECTION_INBOUND" && h["initiator"]["subject"] == user
    };
    let alice = sc.wait_hop(inbound_of("alice@example.com")).await;
    let query = sc
        .wait_hop(|h| h["protocol"] == "PROTOCOL_POSTGRES" && h["chain_id"] == alice["chain_id"])
        .await;
    // The query was tied to alice's request by local stitching, alone in flight.
    assert_eq!(
        query["attribution"]["method"],
        "ATTRIBUTION_METHOD_STITCHED"
    );
    assert_eq!(query["attribution"]["confidence"], 1.0);
    assert_eq!(query["initiator"]["subject"], "alice@example.com");
    assert_eq!(query["parent_span_id"], alice["span_id"]);
    assert!(classes(&query).iter().any(|c| c == "pii.ssn"), "{query}");
    assert_eq!(query["taint"], serde_json::json!(["pii.ssn"]));
    let blocked = sc
        .wait_hop(|h| {
            h["chain_id"] == alice["chain_id"]
                && h["direction"] == "DIRECTION_OUTBOUND"
                && h["protocol"] != "PROTOCOL_POSTGRES"
        })
        .await;
    assert_eq!(blocked["egress"]["verdict"], "VERDICT_BLOCK");
    assert_eq!(blocked["egress"]["policy"], "no-ssn-to-partners");
    assert_eq!(blocked["taint"], serde_json::json!(["pii.ssn"]));
    let bob = sc.wait_hop(inbound_of("bob@example.com")).await;
    let allowed = sc
        .wait_hop(|h| {
            h["chain_id"] == bob["chain_id"]
                && h["direction"] == "DIRECTION_OUTBOUND"
                && h["protocol"] != "PROTOCOL_POSTGRES"
        })
        .await;
    assert_eq!(allowed["egress"]["verdict"], "VERDICT_ALLOW");
    // The partner saw bob's chain with its (harmless) taint, and nothing of alice.
    let token = partner.seen()[0].token().unwrap();
    assert_eq!(token["sub"], "bob@example.com");
    assert_eq!(token["custody"]["taint"], serde_json::json!(["pii.email"]));

    // A sqlcommenter traceparent names the chain ahead of stitching.
    assert_eq!(ask("/comment", "carol@example.com").await, 200);
    let carol = sc.wait_hop(inbound_of("carol@example.com")).await;
    let commented = sc
        .wait_hop(|h| h["protocol"] == "PROTOCOL_POSTGRES" && h["chain_id"] == carol["chain_id"])
        .await;
    assert_eq!(
        commented["attribution"]["method"],
        "ATTRIBUTION_METHOD_SQL_COMMENT"
    );
    assert_eq!(commented["context_outcome"], "CONTEXT_OUTCOME_PROPAGATED");
    assert_eq!(commented["parent_span_id"], carol["span_id"]);

    let text = std::fs::read_to_string(&sc.hops_file).unwrap();
    assert_no_raw_values(&shop, &text);
}

/// Turns TLS on in a running server: it presents a certificate for
/// `db.test` signed by the CA in `certs` (see [`tls_certificates`]).
pub(crate) fn enable_tls(pg: &Postgres, certs: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    tls_certificates(certs, "db.test");
    let data = pg.data_dir();
    let owner = std::fs::metadata(&data).unwrap();
    for (from, to) in [("tls.crt", "server.crt"), ("tls.key", "server.key")] {
        std::fs::copy(certs.join(from), data.join(to)).unwrap();
        std::os::unix::fs::chown(data.join(to), Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    std::fs::set_permissions(
        data.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    pg.superuser_sql("ALTER SYSTEM SET ssl = on").unwrap();
    pg.superuser_sql("SELECT pg_reload_conf()").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_session_passes_through_and_says_it_was_not_inspected() {
    let pg = Postgres::start().unwrap();
    let certs = tempfile::tempdir().unwrap();
    enable_tls(&pg, certs.path());
    let trust = Trust::new(&["orders"]);
    let listen = free_port();
    let extra = database_yaml(listen, pg.addr());
    let mut spec = Spec::new("orders", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    let via = conninfo(&pg, listen).replace("sslmode=disable", "sslmode=require");
    let mut answer = String::new();
    for _ in 0..50 {
        // The reload that enables TLS takes effect asynchronously.
        answer = psql(
            &via,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        if answer.trim() == "t" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer.trim(), "t", "the session is encrypted end to end");
    let hop = sc
        .wait_hop(|h| h["operation"] == "encrypted, not inspected")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_POSTGRES");
    assert_eq!(db(&hop)["parsed"], false);
    assert!(hop["bytes_out"].as_u64().unwrap() > 0);
    assert!(
        sc.metric(
            "custody_proxy_db_connections_total{system=\"postgresql\",inspection=\"encrypted\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_tls_session_is_decoded_between_the_two_tls_ends() {
    let pg = Postgres::start().unwrap();
    let shop = fixtures::load_shop(&pg).unwrap();
    let certs = tempfile::tempdir().unwrap();
    enable_tls(&pg, certs.path());

    let trust = Trust::new(&["orders"]);
    let listen = free_port();
    let c = certs.path();
    let extra = format!(
        "databases:\n  - protocol: postgres\n    listen: \"{listen}\"\n    upstream: \"{}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", upstream_server_name: db.test }}\n",
        pg.addr(),
        c.join("tls.crt").display(),
        c.join("tls.key").display(),
        c.join("ca.crt").display(),
    );
    let mut spec = Spec::new("orders", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    let via = conninfo(&pg, listen).replace("sslmode=disable", "sslmode=require");
    let mut answer = String::new();
    for _ in 0..50 {
        // The server sees TLS (from the sidecar); the client got TLS (from the sidecar).
        answer = try_psql(
            &via,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .unwrap_or_default();
        if answer.trim() == "t" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer.trim(), "t");
    let sql = "SELECT email, ssn FROM customers ORDER BY id";
    assert_eq!(psql(&via, sql), psql(&conninfo(&pg, pg.addr()), sql));
    let hop = sc
        .wait_hop(|h| db(h)["tables_read"] == serde_json::json!(["customers"]))
        .await;
    assert_eq!(db(&hop)["transport"], "tls_terminated");
    assert_eq!(db(&hop)["user"], pg.user());
    let found = classes(&hop);
    assert!(found.iter().any(|c| c == "pii.ssn"), "{found:?}");
    let text = std::fs::read_to_string(&sc.hops_file).unwrap();
    assert_no_raw_values(&shop, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_ssl_request_costs_the_client_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = tempfile::tempdir().unwrap();
    tls_certificates(certs.path(), "db.test");
    // A fault-injecting "server": accepts, reads the SSLRequest, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = silent.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if stream.read_exact(&mut request).await.is_err() {
                    return; // a probe that sent nothing
                }
                // Waits until the sidecar gives up and closes its side.
                let mut rest = Vec::new();
                let closed = stream.read_to_end(&mut rest).await.is_ok();
                let _ = seen_tx.send((request, closed, rest.len()));
            });
        }
    });

    let trust = Trust::new(&["orders"]);
    let listen = free_port();
    let c = certs.path();
    let extra = format!(
        "databases:\n  - protocol: postgres\n    listen: \"{listen}\"\n    upstream: \"{silent_addr}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", \
         upstream_server_name: db.test, handshake_timeout_ms: 300 }}\n",
        c.join("tls.crt").display(),
        c.join("tls.key").display(),
        c.join("ca.crt").display(),
    );
    let mut spec = Spec::new("orders", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;

    let mut client = tokio::net::TcpStream::connect(listen).await.unwrap();
    client
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    // The bound here only keeps a broken sidecar from hanging the test.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut answer))
        .await
        .expect("the sidecar closed the client's connection");
    assert!(
        read.is_err() || answer.is_empty(),
        "no answer byte reaches the client: {answer:?}"
    );
    let (request, closed, extra_bytes) =
        tokio::time::timeout(Duration::from_secs(60), seen_rx.recv())
            .await
            .expect("the sidecar closed the server's connection")
            .unwrap();
    assert_eq!(request, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    assert!(closed);
    assert_eq!(extra_bytes, 0);

    let hop = sc
        .wait_hop(|h| h["protocol"] == "PROTOCOL_POSTGRES" && h["bytes_in"] == 8)
        .await;
    assert_eq!(hop["operation"], "tls termination failed: server_timeout");
    assert_eq!(db(&hop)["parsed"], false);
    assert_eq!(
        sc.metric(
            "custody_proxy_db_tls_failures_total{system=\"postgresql\",reason=\"server_timeout\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        sc.metric(
            "custody_proxy_db_connections_total{system=\"postgresql\",inspection=\"tls_failed\"}"
        )
        .await,
        1.0
    );
}

/// What a statement reading its own text from `pg_stat_activity` sees.
const OWN_TEXT: &str = "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// The texts the server saw for a simple-protocol query, the same query
/// commented by the app, and an extended-protocol one; then a result set.
async fn own_texts(conninfo: &str) -> serde_json::Value {
    let client = connect(conninfo).await;
    let simple = |sql: String| {
        let client = &client;
        async move {
            let messages = client.simple_query(&sql).await.unwrap();
            messages
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).unwrap_or(""))
                            .collect::<Vec<_>>()
                            .join("|"),
                    ),
                    _ => None,
                })
                .collect::<Vec<_>>()
        }
    };
    let plain = simple(OWN_TEXT.to_owned()).await;
    let commented = simple(format!("{OWN_TEXT} /* mine */")).await;
    let extended: String = client.query_one(OWN_TEXT, &[]).await.unwrap().get(0);
    let rows = simple("SELECT name, email FROM customers ORDER BY id;".to_owned()).await;
    serde_json::json!({
        "simple": plain[0], "commented": commented[0], "extended": extended, "rows": rows,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_names_the_chain_in_pg_stat_activity_and_changes_nothing_else() {
    let pg = Postgres::start().unwrap();
    fixtures::load_shop(&pg).unwrap();
    let trust = Trust::new(&["orders"]);
    let annotating = free_port();
    let plain = free_port();
    let extra = format!(
        "databases:\n  - {{ protocol: postgres, listen: \"{annotating}\", upstream: \"{db}\", annotate: true }}\n  \
         - {{ protocol: postgres, listen: \"{plain}\", upstream: \"{db}\" }}\n",
        db = pg.addr()
    );
    let (via_annotating, via_plain) = (conninfo(&pg, annotating), conninfo(&pg, plain));
    let app = App::start(Arc::new(move |req| {
        let db = if req.uri().path() == "/annotated" {
            via_annotating.clone()
        } else {
            via_plain.clone()
        };
        Box::pin(async move {
            let body = own_texts(&db).await;
            Response::new(full(body.to_string()))
        })
    }))
    .await;
    let spec = Spec {
        extra: &extra,
        ..Spec::new("orders", app.addr)
    };
    let sc = start(spec, &trust).await;
    wait_listening(annotating).await;
    wait_listening(plain).await;
    // The probes' sessions end before any request is in flight.
    sc.hops_where(2, |h| {
        h["protocol"] == "PROTOCOL_POSTGRES" && h["operation"] == "connection"
    })
    .await;
    let ask = |path: &'static str| {
        let inbound = sc.inbound;
        async move {
            let resp = client()
                .request(
                    hyper::Request::get(format!("http://{inbound}{path}"))
                        .header("x-custody-user", "alice@example.com")
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

    // Annotated: the server saw the chain id in the simple-protocol query.
    let seen = ask("/annotated").await;
    let inbound = sc
        .wait_hop(|h| h["direction"] == "DIRECTION_INBOUND" && h["operation"] == "GET /annotated")
        .await;
    let chain = inbound["chain_id"].as_str().unwrap();
    let span = inbound["span_id"].as_str().unwrap();
    assert_eq!(chain.len(), 32);
    assert_eq!(
        seen["simple"],
        format!("{OWN_TEXT} /*custody_chain='{chain}',traceparent='00-{chain}-{span}-01'*/")
    );
    // A statement with a comment of its own, and an extended-protocol one,
    // are left as the app sent them.
    assert_eq!(seen["commented"], format!("{OWN_TEXT} /* mine */"));
    assert_eq!(seen["extended"], OWN_TEXT);

    // Without annotation the server sees exactly what the app sent; the
    // results are the same either way.
    let unchanged = ask("/plain").await;
    assert_eq!(unchanged["simple"], OWN_TEXT);
    assert_eq!(unchanged["rows"], seen["rows"]);
    let direct = own_texts(&conninfo(&pg, pg.addr())).await;
    assert_eq!(direct["rows"], seen["rows"]);
    assert_eq!(seen["rows"].as_array().unwrap().len(), 50);

    // The hop is attributed from what the app sent (stitching), not from
    // the comment the sidecar added.
    let hop = sc
        .wait_hop(|h| {
            h["chain_id"] == chain && db(h)["tables_read"] == serde_json::json!(["customers"])
        })
        .await;
    assert_eq!(hop["attribution"]["method"], "ATTRIBUTION_METHOD_STITCHED");
    assert_eq!(hop["parent_span_id"], span);

    // No chain in flight: nothing to annotate.
    let alone = connect(&conninfo(&pg, annotating)).await;
    let text = alone.simple_query(OWN_TEXT).await.unwrap();
    let tokio_postgres::SimpleQueryMessage::Row(row) = &text[1] else {
        panic!("{text:?}");
    };
    assert_eq!(row.get(0), Some(OWN_TEXT));
    // The self-read and the result set of /annotated, nothing else.
    assert_eq!(
        sc.metric("custody_proxy_db_annotated_total{system=\"postgresql\"}")
            .await,
        2.0
    );
}
