//! Decoding of PostgreSQL 15 sessions captured from real clients
//! (`testdata/pg_*.bin`, see `testdata/README.md`): whole, split at every byte
//! boundary and fed byte by byte, with the same result each time.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use custody_protocols::pg::{
    AuthMethod, BackendMessage, Connection, FrontendMessage, QueryEvent, QueryOutcome, QuerySource,
};

fn load(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/");
    let read = |suffix: &str| {
        std::fs::read(format!("{dir}pg_{name}.{suffix}.bin"))
            .unwrap_or_else(|e| panic!("pg_{name}.{suffix}.bin: {e}"))
    };
    (read("client"), read("server"))
}

/// Everything observable from one decoding run.
#[derive(Debug, PartialEq)]
struct Transcript {
    client: Vec<String>,
    server: Vec<String>,
    events: Vec<QueryEvent>,
    errors: Vec<String>,
}

/// Feeds the client stream in `client_chunks`, then the server stream in
/// `server_chunks`, through one connection.
fn run_split(client_chunks: &[&[u8]], server_chunks: &[&[u8]]) -> (Transcript, Connection) {
    let mut conn = Connection::default();
    let mut t = Transcript {
        client: Vec::new(),
        server: Vec::new(),
        events: Vec::new(),
        errors: Vec::new(),
    };
    for c in client_chunks {
        if let Err(e) = conn.client_data(c, |m| t.client.push(format!("{m:?}"))) {
            t.errors.push(e.to_string());
        }
    }
    for c in server_chunks {
        let (server, events) = (&mut t.server, &mut t.events);
        if let Err(e) = conn.server_data(c, |m, ev| {
            server.push(format!("{m:?}"));
            events.extend(ev);
        }) {
            t.errors.push(e.to_string());
        }
    }
    (t, conn)
}

/// Decodes a capture whole, then checks that every split of either stream,
/// and byte-by-byte feeding, gives the identical transcript.
fn decode(name: &str) -> (Transcript, Connection) {
    let (client, server) = load(name);
    let (whole, conn) = run_split(&[&client], &[&server]);
    assert!(whole.errors.is_empty(), "{name}: {:?}", whole.errors);
    for k in 0..=client.len() {
        let (a, b) = client.split_at(k);
        assert_eq!(
            run_split(&[a, b], &[&server]).0,
            whole,
            "{name}: client split at {k}"
        );
    }
    for k in 0..=server.len() {
        let (a, b) = server.split_at(k);
        assert_eq!(
            run_split(&[&client], &[a, b]).0,
            whole,
            "{name}: server split at {k}"
        );
    }
    let ones = |v: &[u8]| v.chunks(1).map(|c| c.to_vec()).collect::<Vec<_>>();
    let (c1, s1) = (ones(&client), ones(&server));
    let c1: Vec<&[u8]> = c1.iter().map(Vec::as_slice).collect();
    let s1: Vec<&[u8]> = s1.iter().map(Vec::as_slice).collect();
    assert_eq!(run_split(&c1, &s1).0, whole, "{name}: byte by byte");
    assert_eq!(
        interleaved(&client, &server),
        whole.events,
        "{name}: interleaved"
    );
    (whole, conn)
}

/// Message end offsets of a stream, found by feeding it byte by byte.
fn boundaries(conn: &mut Connection, data: &[u8], client: bool) -> Vec<(usize, u8, bool)> {
    let mut out = Vec::new();
    for (i, b) in data.iter().enumerate() {
        let mut ends = Vec::new();
        if client {
            conn.client_data(&[*b], |m| {
                let wait = matches!(
                    m,
                    FrontendMessage::Sync
                        | FrontendMessage::Query { .. }
                        | FrontendMessage::Startup(_)
                        | FrontendMessage::SslRequest
                        | FrontendMessage::AuthResponse(_)
                        | FrontendMessage::CopyDone
                );
                ends.push((i + 1, m.tag(), wait));
            })
            .unwrap();
        } else {
            conn.server_data(&[*b], |m, _| {
                let wait = match m {
                    BackendMessage::ReadyForQuery { .. }
                    | BackendMessage::EncryptionResponse { .. } => true,
                    BackendMessage::Authentication(a) => {
                        *a != custody_protocols::pg::Authentication::Ok
                            && !matches!(a, custody_protocols::pg::Authentication::SaslFinal)
                    }
                    BackendMessage::CopyInResponse(_) => true,
                    _ => false,
                };
                ends.push((i + 1, m.tag(), wait));
            })
            .unwrap();
        }
        out.extend(ends);
    }
    out
}

/// Replays the capture in a live order: the client sends until it has to wait
/// (after Sync, Query, a startup packet, an authentication response, the end
/// of COPY data), then the server answers until it has to wait (after
/// ReadyForQuery, an authentication request, CopyInResponse).
fn interleaved(client: &[u8], server: &[u8]) -> Vec<QueryEvent> {
    let mut scratch = Connection::default();
    let cb = boundaries(&mut scratch, client, true);
    let sb = boundaries(&mut scratch, server, false);
    let cut = |b: &[(usize, u8, bool)]| {
        let mut cuts: Vec<usize> = b.iter().filter(|x| x.2).map(|x| x.0).collect();
        cuts.push(b.last().map_or(0, |x| x.0));
        cuts
    };
    let (cc, sc) = (cut(&cb), cut(&sb));
    let mut conn = Connection::default();
    let mut events = Vec::new();
    let (mut ci, mut si, mut cpos, mut spos) = (0, 0, 0, 0);
    while ci < cc.len() || si < sc.len() {
        if let Some(&end) = cc.get(ci) {
            conn.client_data(&client[cpos..end.max(cpos)], |_| {})
                .unwrap();
            cpos = end.max(cpos);
            ci += 1;
        }
        if let Some(&end) = sc.get(si) {
            conn.server_data(&server[spos..end.max(spos)], |_, e| events.extend(e))
                .unwrap();
            spos = end.max(spos);
            si += 1;
        }
    }
    events
}

fn summary(events: &[QueryEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let source = match &e.source {
                QuerySource::Simple { index } => format!("simple#{index}"),
                QuerySource::Extended { statement, portal } => {
                    format!("ext({},{portal:?})", statement.as_deref().unwrap_or("?"))
                }
                QuerySource::FunctionCall => "fn".into(),
                QuerySource::Connection => "conn".into(),
            };
            format!(
                "{source} {:?} {} rows={} err={} sql={:?} cols={:?}",
                e.outcome,
                e.command
                    .as_deref()
                    .map_or("-".into(), |c| format!("{c}/{:?}", e.tag_rows)),
                e.rows_returned,
                e.error.as_ref().map_or("-", |x| &*x.sqlstate),
                e.sql.as_deref(),
                e.columns.as_deref().unwrap_or_default(),
            )
        })
        .collect()
}

fn sqls(events: &[QueryEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.sql.as_deref().unwrap_or("?"))
        .collect()
}

#[test]
fn psql_simple_protocol_with_scram() {
    let (t, conn) = decode("psql");
    let s = conn.session();
    assert_eq!(s.user(), Some("capture_scram"));
    assert_eq!(s.database(), Some("capture"));
    assert_eq!(s.startup_param("application_name"), Some("custody-capture"));
    // `SET application_name` reported by ParameterStatus.
    assert_eq!(s.application_name(), Some("custody-renamed"));
    assert_eq!(s.auth_method(), Some(AuthMethod::Sasl));
    assert_eq!(s.sasl_mechanism(), Some("SCRAM-SHA-256"));
    assert!(s.authenticated());
    assert_eq!(s.encryption(), (true, Some(false)));
    assert_eq!(
        s.server_param("server_version").map(|v| &v[..3]),
        Some("15.")
    );
    assert_eq!(s.protocol_version(), Some((3, 0)));
    assert!(s.backend_pid().is_some());
    assert_eq!(s.pending_count(), 0);
    assert_eq!(t.client[0], "SslRequest");
    assert_eq!(t.server[0], "EncryptionResponse { accepted: false }");
    assert_eq!(t.client.last().map(String::as_str), Some("Terminate"));
    // The SCRAM exchange is observed but never printed.
    assert!(t.client.iter().all(|m| !m.contains("r=")), "{:?}", t.client);
    assert!(t.server.iter().all(|m| !m.contains("r=")), "{:?}", t.server);
    let multi =
        "SELECT count(*) FROM people; DELETE FROM people WHERE id > 2; SELECT 'done' AS status;";
    assert_eq!(
        summary(&t.events),
        [
            r#"simple#0 Complete SELECT/Some(1) rows=1 err=- sql=Some("SELECT 1 AS one, 'two' AS two;") cols=["one", "two"]"#.to_string(),
            r#"simple#0 Complete CREATE TABLE/None rows=0 err=- sql=Some("CREATE TABLE people (id int PRIMARY KEY, email text, note text);") cols=[]"#.into(),
            r#"simple#0 Complete INSERT/Some(2) rows=0 err=- sql=Some("INSERT INTO people VALUES (1, 'ada@example.com', NULL), (2, 'bob@example.com', 'x');") cols=[]"#.into(),
            r#"simple#0 Complete UPDATE/Some(1) rows=0 err=- sql=Some("UPDATE people SET note = 'y' WHERE id = 2;") cols=[]"#.into(),
            r#"simple#0 Complete SELECT/Some(2) rows=2 err=- sql=Some("SELECT id, email, note FROM people ORDER BY id;") cols=["id", "email", "note"]"#.into(),
            r#"simple#0 Failed - rows=0 err=42P01 sql=Some("SELECT * FROM no_such_table;") cols=[]"#.into(),
            r#"simple#0 Complete COPY/Some(2) rows=2 err=- sql=Some("COPY people TO STDOUT;") cols=[]"#.into(),
            r#"simple#0 Complete COPY/Some(2) rows=0 err=- sql=Some("COPY people FROM STDIN;") cols=[]"#.into(),
            format!(r#"simple#0 Complete SELECT/Some(1) rows=1 err=- sql=Some({multi:?}) cols=["count"]"#),
            format!(r#"simple#1 Complete DELETE/Some(2) rows=0 err=- sql=Some({multi:?}) cols=[]"#),
            format!(r#"simple#2 Complete SELECT/Some(1) rows=1 err=- sql=Some({multi:?}) cols=["status"]"#),
            r#"simple#0 Empty - rows=0 err=- sql=Some(";") cols=[]"#.into(),
            r#"simple#0 Complete SET/None rows=0 err=- sql=Some("SET application_name = 'custody-renamed';") cols=[]"#.into(),
            r#"simple#0 Complete DELETE/Some(2) rows=0 err=- sql=Some("DELETE FROM people;") cols=[]"#.into(),
        ]
    );
    assert_eq!(t.events[2].rows_affected(), Some(2));
    assert_eq!(t.events[6].rows_affected(), None, "COPY TO returns rows");
    assert_eq!(
        t.events[7].rows_affected(),
        Some(2),
        "COPY FROM writes rows"
    );
    let err = t.events[5].error.as_ref().unwrap();
    assert_eq!((&*err.severity, &*err.sqlstate), ("ERROR", "42P01"));
    // Row values are borrowed from the stream: the two people rows.
    let (client, server) = load("psql");
    let mut emails = Vec::new();
    let mut conn = Connection::default();
    conn.client_data(&client, |_| {}).unwrap();
    conn.server_data(&server, |m, _| {
        if let BackendMessage::DataRow(row) = m
            && row.len() == 3
        {
            let v: Vec<_> = row.values().collect::<Result<_, _>>().unwrap();
            emails.push(String::from_utf8(v[1].unwrap().to_vec()).unwrap());
            assert_eq!(
                v[2].is_none(),
                emails.len() == 1,
                "note is NULL for the first person"
            );
        }
    })
    .unwrap();
    assert_eq!(emails, ["ada@example.com", "bob@example.com"]);
}

const TPCB: [&str; 7] = [
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
    "END;",
];

fn check_tpcb(events: &[QueryEvent], transactions: usize, named: bool) {
    assert_eq!(events.len(), 7 * transactions);
    let expected: Vec<&str> = TPCB
        .iter()
        .copied()
        .cycle()
        .take(7 * transactions)
        .collect();
    assert_eq!(sqls(events), expected);
    let commands: Vec<_> = events
        .iter()
        .map(|e| (e.command.as_deref().unwrap(), e.tag_rows))
        .collect();
    for tx in commands.chunks(7) {
        assert_eq!(
            tx,
            [
                ("BEGIN", None),
                ("UPDATE", Some(1)),
                ("SELECT", Some(1)),
                ("UPDATE", Some(1)),
                ("UPDATE", Some(1)),
                ("INSERT", Some(1)),
                ("COMMIT", None)
            ]
        );
    }
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.outcome, QueryOutcome::Complete);
        let want = if named {
            format!("P_{}", i % 7)
        } else {
            String::new()
        };
        assert_eq!(
            e.source,
            QuerySource::Extended {
                statement: Some(want.into()),
                portal: "".into()
            }
        );
        let cols = e.columns.as_deref().unwrap_or_default();
        if i % 7 == 2 {
            assert_eq!((e.rows_returned, cols), (1, &["abalance".into()][..]));
        } else {
            assert_eq!((e.rows_returned, cols.len()), (0, 0));
        }
    }
}

#[test]
fn pgbench_extended() {
    let (t, conn) = decode("pgbench_extended");
    check_tpcb(&t.events, 2, false);
    let s = conn.session();
    assert_eq!(
        (s.user(), s.application_name()),
        (Some("capture_scram"), Some("bench-ext"))
    );
    assert_eq!(s.encryption(), (false, None));
    assert_eq!(s.stats(), Default::default());
    // Unnamed statements only; portals end with their transaction.
    assert_eq!(
        (s.statement_count(), s.portal_count(), s.pending_count()),
        (1, 0, 0)
    );
    assert!(
        t.client
            .iter()
            .any(|m| m.starts_with("Bind(Bind { portal: \"\", statement: \"\""))
    );
}

#[test]
fn pgbench_prepared_named_statements() {
    let (t, conn) = decode("pgbench_prepared");
    check_tpcb(&t.events, 3, true);
    let s = conn.session();
    assert_eq!(s.application_name(), Some("bench-prep"));
    assert_eq!(s.statement_count(), 7);
    for (i, sql) in TPCB.iter().enumerate() {
        assert_eq!(s.statement_sql(&format!("P_{i}")), Some(*sql));
    }
    // Each statement is parsed once, executed three times.
    assert_eq!(
        t.client.iter().filter(|m| m.starts_with("Parse")).count(),
        7
    );
    assert_eq!(
        t.client.iter().filter(|m| m.starts_with("Execute")).count(),
        21
    );
    assert_eq!(s.stats(), Default::default());
}

#[test]
fn pgbench_setup_connections() {
    for name in ["pgbench_extended_setup", "pgbench_prepared_setup"] {
        let (t, _) = decode(name);
        assert_eq!(t.events.len(), 2, "{name}");
        assert_eq!(
            t.events[0].sql.as_deref(),
            Some("select count(*) from pgbench_branches")
        );
        assert_eq!(t.events[0].columns.as_deref(), Some(&["count".into()][..]));
        assert_eq!(
            (t.events[0].rows_returned, t.events[0].tag_rows),
            (1, Some(1))
        );
    }
}

#[test]
fn psycopg_prepared_statements() {
    let (t, conn) = decode("psycopg_prepared");
    let select = "SELECT aid, abalance FROM pgbench_accounts WHERE aid <= $1 ORDER BY aid";
    assert_eq!(
        sqls(&t.events),
        [
            "BEGIN",
            select,
            select,
            select,
            "UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = $1",
            "SELECT 1/$1::int",
            "ROLLBACK",
            "DEALLOCATE ALL"
        ]
    );
    let rows: Vec<_> = t.events.iter().map(|e| e.rows_returned).collect();
    assert_eq!(rows, [0, 2, 3, 4, 0, 0, 0, 0]);
    assert_eq!(t.events[4].rows_affected(), Some(1));
    for e in &t.events[1..4] {
        assert_eq!(
            e.columns.as_deref(),
            Some(&["aid".into(), "abalance".into()][..])
        );
        assert_eq!(
            e.source,
            QuerySource::Extended {
                statement: Some("_pg3_0".into()),
                portal: "".into()
            }
        );
    }
    assert_eq!(t.events[5].outcome, QueryOutcome::Failed);
    assert_eq!(
        t.events[5].error.as_ref().map(|e| &*e.sqlstate),
        Some("22012")
    );
    // DEALLOCATE ALL dropped the named statements.
    let s = conn.session();
    assert_eq!(s.statement_sql("_pg3_0"), None);
    assert_eq!(s.statement_count(), 0);
    assert_eq!(s.application_name(), Some("psycopg-prep"));
}

#[test]
fn md5_and_cleartext_passwords() {
    for (name, method, user) in [
        ("md5", AuthMethod::Md5, "capture_md5"),
        ("cleartext", AuthMethod::Cleartext, "capture_clear"),
    ] {
        let (t, conn) = decode(name);
        let s = conn.session();
        assert_eq!(
            (s.auth_method(), s.user(), s.authenticated()),
            (Some(method), Some(user), true)
        );
        assert_eq!(s.sasl_mechanism(), None);
        assert_eq!(sqls(&t.events), ["SELECT current_user"]);
        assert_eq!(t.events[0].rows_returned, 1);
        // The password message is seen, its content is not.
        assert!(
            t.client
                .iter()
                .any(|m| m.starts_with("AuthResponse(AuthResponse { len:"))
        );
        assert!(
            t.client.iter().all(|m| !m.contains("secret")),
            "{:?}",
            t.client
        );
    }
}

#[test]
fn truncated_captures_do_not_fail() {
    // Cutting a capture anywhere loses only the last partial message.
    let (client, server) = load("pgbench_prepared");
    for cut in [1, 7, 100, server.len() / 2, server.len() - 1] {
        let (t, _) = run_split(&[&client], &[&server[..cut]]);
        assert!(t.errors.is_empty());
    }
    let (t, _) = run_split(&[&client[..client.len() / 2]], &[&server]);
    assert!(t.errors.is_empty());
    assert!(t.events.len() < 21);
}
