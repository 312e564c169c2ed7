//! Sessions built from the documented packet formats: what a MariaDB 10.11
//! capture cannot show (MySQL 8 `caching_sha2_password`, `CLIENT_DEPRECATE_EOF`,
//! multi-packet payloads, query attributes, TLS, hostile input).

use proptest::prelude::*;

use super::support::*;
use crate::mysql::capabilities as cap;
use crate::mysql::commands as com;
use crate::mysql::{
    CommandKind, Config, Direction, Event, MAX_PAYLOAD, MysqlError, Phase, Session, Value, status,
};

/// Capabilities of a MySQL 8 client and server.
const MYSQL8: u32 = cap::LONG_PASSWORD
    | cap::CONNECT_WITH_DB
    | cap::PROTOCOL_41
    | 1 << 13
    | cap::SECURE_CONNECTION
    | cap::MULTI_STATEMENTS
    | cap::MULTI_RESULTS
    | cap::PS_MULTI_RESULTS
    | cap::PLUGIN_AUTH
    | cap::CONNECT_ATTRS
    | cap::PLUGIN_AUTH_LENENC_CLIENT_DATA
    | cap::SESSION_TRACK
    | cap::DEPRECATE_EOF;

/// Same without `CLIENT_DEPRECATE_EOF`.
const CLASSIC: u32 = MYSQL8 & !cap::DEPRECATE_EOF;

type Steps = Vec<(Direction, Vec<u8>)>;

fn c(bytes: Vec<u8>) -> (Direction, Vec<u8>) {
    (Direction::Client, bytes)
}

fn s(bytes: Vec<u8>) -> (Direction, Vec<u8>) {
    (Direction::Server, bytes)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Handshake with the given capabilities, fast auth, OK.
fn connect(caps: u32) -> Steps {
    vec![
        s(greeting(caps, "caching_sha2_password")),
        c(login(
            caps,
            "alice",
            Some("shop"),
            &[("_client_name", "libmysql"), ("app", "orders")],
        )),
        s(pkt(2, &[0x01, 0x03])),
        s(ok(3, 0, 0, 0, status::AUTOCOMMIT)),
    ]
}

fn run_with(config: Config, steps: &Steps, split: usize) -> (Log, Session, Option<MysqlError>) {
    let mut session = Session::new(config);
    let mut log = Log::default();
    let mut error = None;
    for (dir, bytes) in steps {
        for piece in bytes.chunks(split.max(1)) {
            let r = match dir {
                Direction::Client => session.feed_client(piece, &mut log),
                Direction::Server => session.feed_server(piece, &mut log),
            };
            if let Err(e) = r {
                error.get_or_insert(e);
            }
        }
    }
    (log, session, error)
}

/// Runs the steps whole, then in pieces of 1, 2, 3, 7 and 64 bytes: the
/// log must be the same. Then checks that each expected line is in the log,
/// in order.
fn check(steps: &Steps, expected: &[&str]) -> (Log, Session) {
    check_with(Config::default(), steps, expected)
}

fn check_with(config: Config, steps: &Steps, expected: &[&str]) -> (Log, Session) {
    let (whole, session, _) = run_with(config.clone(), steps, usize::MAX);
    for split in [1, 2, 3, 7, 64] {
        let (log, _, _) = run_with(config.clone(), steps, split);
        assert_eq!(log.lines, whole.lines, "split into {split}-byte pieces");
    }
    let mut at = 0;
    for want in expected {
        match whole.lines[at..].iter().position(|l| l.contains(want)) {
            Some(i) => at += i + 1,
            None => panic!(
                "{want:?} not found in order in:\n{}",
                whole.lines.join("\n")
            ),
        }
    }
    (whole, session)
}

fn query(sql: &str) -> Vec<u8> {
    command(com::QUERY, sql.as_bytes())
}

#[test]
fn caching_sha2_fast_auth_and_deprecate_eof_result() {
    let mut steps = connect(MYSQL8);
    steps.push(c(query("SELECT name, email FROM customers")));
    steps.push(s(cat(&[
        pkt(1, &[2]),
        column(2, "customers", "name", 253),
        column(3, "customers", "email", 253),
        text_row(4, &[Some("Alice"), Some("alice@example.com")]),
        text_row(5, &[Some("Bob"), None]),
        ok(6, 0xfe, 0, 0, status::AUTOCOMMIT),
    ])));
    let (log, session) = check(
        &steps,
        &[
            "ServerGreeting",
            r#"user: "alice", auth_response_len: 20, database: Some("shop"), auth_plugin: Some("caching_sha2_password"), attributes: [("_client_name", "libmysql"), ("app", "orders")]"#,
            "AuthMoreData(FastAuthSuccess)",
            "AuthOk",
            "SELECT name, email FROM customers",
            r#"columns ["name", "email"]"#,
            r#"["Alice", "alice@example.com"]"#,
            r#"["Bob", NULL]"#,
            "query",
        ],
    );
    assert_eq!(session.phase(), Phase::Command);
    assert_eq!(
        session.capabilities() & cap::DEPRECATE_EOF,
        cap::DEPRECATE_EOF
    );
    assert_eq!(log.queries.len(), 1);
    assert_eq!(log.queries[0].rows, 2);
    assert_eq!(log.queries[0].database.as_deref(), Some("shop"));
    assert_eq!(session.login().map(|l| l.auth_response_len), Some(20));
}

#[test]
fn caching_sha2_full_auth_exchange() {
    let steps = vec![
        s(greeting(MYSQL8, "caching_sha2_password")),
        c(login(MYSQL8, "bob", None, &[])),
        s(pkt(2, &[0x01, 0x04])),
        c(pkt(3, &[0x02])),
        s(pkt(
            4,
            &[
                &[0x01][..],
                b"-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n",
            ]
            .concat(),
        )),
        c(pkt(5, &[0x77; 256])),
        s(ok(6, 0, 0, 0, 0)),
        c(command(com::PING, b"")),
        s(ok(1, 0, 0, 0, 0)),
    ];
    let (log, session) = check(
        &steps,
        &[
            "AuthMoreData(FullAuthRequired)",
            "AuthData { len: 1 }",
            "AuthMoreData(Other { len: 56 })",
            "AuthData { len: 256 }",
            "AuthOk",
            "kind: Ping",
        ],
    );
    assert_eq!(session.user(), Some("bob"));
    assert_eq!(session.database(), None);
    assert_eq!(log.queries[0].command, CommandKind::Ping);
    // The password bytes are nowhere in the log.
    assert!(log.lines.iter().all(|l| !l.contains("119, 119")));
}

#[test]
fn auth_switch_then_failure_closes() {
    let steps = vec![
        s(greeting(CLASSIC, "caching_sha2_password")),
        c(login(CLASSIC, "mallory", None, &[])),
        s(pkt(
            2,
            &[&[0xfe][..], b"mysql_native_password\0", &[0x11; 20], &[0]].concat(),
        )),
        c(pkt(3, &[0x22; 20])),
        s(err(4, 1045, "28000", "Access denied for user 'mallory'")),
        c(query("SELECT 1")),
    ];
    let (log, session) = check(
        &steps,
        &[
            r#"AuthSwitch { plugin: "mysql_native_password", data_len: 21 }"#,
            "AuthData { len: 20 }",
            "AuthFailed(ServerError { code: 1045",
        ],
    );
    assert_eq!(session.phase(), Phase::Closed);
    assert!(log.queries.is_empty());
}

#[test]
fn ssl_request_stops_decoding() {
    let mut ssl = Vec::new();
    ssl.extend_from_slice(&(MYSQL8 | cap::SSL).to_le_bytes());
    ssl.extend_from_slice(&(1u32 << 24).to_le_bytes());
    ssl.push(45);
    ssl.extend_from_slice(&[0; 23]);
    let steps = vec![
        s(greeting(MYSQL8 | cap::SSL, "caching_sha2_password")),
        c([pkt(1, &ssl), vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01]].concat()),
        s(vec![0x16, 0x03, 0x03, 0x00, 0x7a, 0x02]),
        c(vec![0xff; 100]),
    ];
    let (log, session) = check(&steps, &["TlsRequested"]);
    assert_eq!(session.phase(), Phase::Tls);
    assert_eq!(log.lines.len(), 2, "{:?}", log.lines);
    assert_eq!(session.user(), None);
}

#[test]
fn compression_stops_decoding_after_auth() {
    let caps = CLASSIC | cap::COMPRESS;
    let mut steps = connect(caps);
    steps.push(c(vec![0x10, 0, 0, 0, 0, 0, 0, 0x78, 0x9c]));
    let (_, session) = check(&steps, &["AuthOk", "CompressionStarted"]);
    assert_eq!(session.phase(), Phase::Compressed);
}

#[test]
fn classic_eof_results_and_multi_results() {
    let mut steps = connect(CLASSIC);
    steps.push(c(query("CALL p()")));
    steps.push(s(cat(&[
        pkt(1, &[1]),
        column(2, "t", "a", 3),
        eof(3, status::MORE_RESULTS_EXISTS),
        text_row(4, &[Some("1")]),
        text_row(5, &[Some("2")]),
        eof(6, status::MORE_RESULTS_EXISTS),
        pkt(7, &[1]),
        column(8, "u", "b", 3),
        eof(9, status::MORE_RESULTS_EXISTS),
        text_row(10, &[Some("3")]),
        eof(11, status::MORE_RESULTS_EXISTS),
        ok(12, 0, 0, 0, 0),
    ])));
    steps.push(c(query("INSERT INTO t VALUES (1),(2)")));
    steps.push(s(ok(1, 0, 2, 17, 0)));
    let (log, _) = check(
        &steps,
        &[r#"["1"]"#, r#"["2"]"#, r#"["3"]"#, "CALL p()", "INSERT"],
    );
    let call = &log.queries[0];
    assert_eq!((call.rows, call.result_sets), (3, 3));
    assert_eq!(
        call.results.iter().map(|r| r.rows).collect::<Vec<_>>(),
        vec![2, 1, 0]
    );
    let insert = &log.queries[1];
    assert_eq!((insert.affected_rows, insert.last_insert_id), (2, 17));
}

#[test]
fn error_in_the_middle_of_rows() {
    let mut steps = connect(MYSQL8);
    steps.push(c(query("SELECT slow()")));
    steps.push(s(cat(&[
        pkt(1, &[1]),
        column(2, "", "slow()", 3),
        text_row(3, &[Some("1")]),
        err(4, 1317, "70100", "Query execution was interrupted"),
    ])));
    steps.push(c(command(com::PING, b"")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    let (log, _) = check(
        &steps,
        &["SELECT slow()", r#"["1"]"#, "code: 1317", "kind: Ping"],
    );
    assert_eq!(log.queries[0].rows, 1);
    assert_eq!(log.queries[0].error.as_ref().map(|e| e.code), Some(1317));
    assert_eq!(log.queries[1].command, CommandKind::Ping);
}

/// A prepared statement with `CLIENT_DEPRECATE_EOF`: binary rows, typed values.
#[test]
fn prepare_execute_binary_rows() {
    let mut steps = connect(MYSQL8);
    let sql = "SELECT id, tiny, name, price, born FROM people WHERE id > ?";
    steps.push(c(command(com::STMT_PREPARE, sql.as_bytes())));
    let mut prep = vec![0x00];
    prep.extend_from_slice(&7u32.to_le_bytes());
    prep.extend_from_slice(&5u16.to_le_bytes());
    prep.extend_from_slice(&1u16.to_le_bytes());
    prep.extend_from_slice(&[0, 0, 0]);
    let cols = |seq: u8| {
        cat(&[
            column(seq, "people", "id", 8),
            column(seq + 1, "people", "tiny", 1),
            column(seq + 2, "people", "name", 253),
            column(seq + 3, "people", "price", 5),
            column(seq + 4, "people", "born", 10),
        ])
    };
    steps.push(s(cat(&[pkt(1, &prep), column(2, "", "?", 8), cols(3)])));
    let mut exec = 7u32.to_le_bytes().to_vec();
    exec.extend_from_slice(&[0, 1, 0, 0, 0, 0, 1, 8, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
    steps.push(c(command(com::STMT_EXECUTE, &exec)));
    let mut row = vec![0x00, 0b0000_0000]; // header, null bitmap (5 columns + 2 bits)
    row.extend_from_slice(&(-5i64).to_le_bytes());
    row.push(0xff); // tiny -1
    lenenc_str(b"Carol", &mut row);
    row.extend_from_slice(&2.5f64.to_le_bytes());
    row.extend_from_slice(&[4, 0xd0, 0x07, 2, 29]);
    let mut null_row = vec![0x00, 0b0001_0000];
    null_row.extend_from_slice(&9i64.to_le_bytes());
    null_row.push(3);
    null_row.extend_from_slice(&0.5f64.to_le_bytes());
    null_row.extend_from_slice(&[0]);
    steps.push(s(cat(&[
        pkt(1, &[5]),
        cols(2),
        pkt(7, &row),
        pkt(8, &null_row),
        ok(9, 0xfe, 0, 0, 0),
    ])));
    let mut close = 7u32.to_le_bytes().to_vec();
    steps.push(c(command(com::STMT_CLOSE, &close)));
    close.clear();
    let (log, session) = check(
        &steps,
        &[
            "kind: StmtPrepare",
            "statement_id: Some(7)",
            "kind: StmtExecute, sql: Some(\"SELECT id, tiny",
            r#"[i-5, i-1, "Carol", f2.5, t[208, 7, 2, 29]]"#,
            r#"[i9, i3, NULL, f0.5, t[]]"#,
            "kind: StmtClose",
        ],
    );
    let exec = log
        .queries
        .iter()
        .find(|q| q.command == CommandKind::StmtExecute)
        .expect("execute");
    assert_eq!(
        (exec.statement_id, exec.rows, exec.sql.as_deref()),
        (Some(7), 2, Some(sql))
    );
    assert_eq!(session.statement_count(), 0);
}

/// MariaDB sends no metadata for an execute when the client caches it
/// (`MARIADB_CLIENT_CACHE_METADATA`): the prepared statement's columns apply.
#[test]
fn execute_with_cached_metadata_uses_statement_columns() {
    let mut steps = connect(CLASSIC);
    steps.push(c(command(com::STMT_PREPARE, b"SELECT name FROM t")));
    let mut prep = vec![0x00];
    prep.extend_from_slice(&3u32.to_le_bytes());
    prep.extend_from_slice(&1u16.to_le_bytes());
    prep.extend_from_slice(&0u16.to_le_bytes());
    prep.extend_from_slice(&[0, 0, 0]);
    steps.push(s(cat(&[
        pkt(1, &prep),
        column(2, "t", "name", 253),
        eof(3, 0),
    ])));
    steps.push(c(command(com::STMT_EXECUTE, &[3, 0, 0, 0, 0, 1, 0, 0, 0])));
    let mut row = vec![0x00, 0];
    lenenc_str(b"dave@example.com", &mut row);
    steps.push(s(cat(&[pkt(1, &[1, 0]), pkt(2, &row), eof(3, 0)])));
    let (log, _) = check(&steps, &[r#"["dave@example.com"]"#]);
    assert_eq!(log.queries[1].rows, 1);
}

#[test]
fn cursor_and_fetch() {
    let mut steps = connect(CLASSIC);
    steps.push(c(command(com::STMT_PREPARE, b"SELECT n FROM big")));
    let mut prep = vec![0x00];
    prep.extend_from_slice(&1u32.to_le_bytes());
    prep.extend_from_slice(&1u16.to_le_bytes());
    prep.extend_from_slice(&0u16.to_le_bytes());
    prep.extend_from_slice(&[0, 0, 0]);
    steps.push(s(cat(&[
        pkt(1, &prep),
        column(2, "big", "n", 3),
        eof(3, 0),
    ])));
    steps.push(c(command(com::STMT_EXECUTE, &[1, 0, 0, 0, 1, 1, 0, 0, 0])));
    steps.push(s(cat(&[
        pkt(1, &[1]),
        column(2, "big", "n", 3),
        eof(3, status::CURSOR_EXISTS),
    ])));
    steps.push(c(command(com::STMT_FETCH, &[1, 0, 0, 0, 2, 0, 0, 0])));
    let row = |n: u32| {
        let mut r = vec![0x00, 0];
        r.extend_from_slice(&n.to_le_bytes());
        r
    };
    steps.push(s(cat(&[
        pkt(1, &row(10)),
        pkt(2, &row(11)),
        eof(3, status::CURSOR_EXISTS),
    ])));
    steps.push(c(command(com::STMT_FETCH, &[1, 0, 0, 0, 2, 0, 0, 0])));
    steps.push(s(eof(1, status::LAST_ROW_SENT)));
    let (log, _) = check(&steps, &["[i10]", "[i11]"]);
    let kinds: Vec<_> = log
        .queries
        .iter()
        .map(|q| (q.command, q.rows, q.sql.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (CommandKind::StmtPrepare, 0, Some("SELECT n FROM big")),
            (CommandKind::StmtExecute, 0, Some("SELECT n FROM big")),
            (CommandKind::StmtFetch, 2, Some("SELECT n FROM big")),
            (CommandKind::StmtFetch, 0, Some("SELECT n FROM big")),
        ]
    );
}

#[test]
fn multi_packet_query_is_capped_and_counted() {
    let config = Config {
        max_query_bytes: 1 << 20,
        ..Config::default()
    };
    let total = MAX_PAYLOAD + 1000;
    let mut sql = b"SELECT '".to_vec();
    sql.resize(total - 2, b'a');
    sql.extend_from_slice(b"'");
    let mut payload = vec![com::QUERY];
    payload.extend_from_slice(&sql);
    assert_eq!(payload.len(), total);
    let mut wire = vec![0xff, 0xff, 0xff, 0];
    wire.extend_from_slice(&payload[..MAX_PAYLOAD]);
    let rest = &payload[MAX_PAYLOAD..];
    wire.extend_from_slice(&[rest.len() as u8, (rest.len() >> 8) as u8, 0, 1]);
    wire.extend_from_slice(rest);
    let mut steps = connect(MYSQL8);
    steps.push(c(wire.clone()));
    steps.push(s(ok(2, 0, 0, 0, 0)));
    for split in [usize::MAX, 65536, 4093] {
        let (log, _, error) = run_with(config.clone(), &steps, split);
        assert_eq!(error, None);
        let q = &log.queries[0];
        let kept = q.sql.as_deref().map_or(0, str::len);
        assert_eq!(
            (kept, q.sql_len, q.sql_truncated),
            (1 << 20, total as u64 - 1, true),
            "split {split}"
        );
        assert!(
            q.sql
                .as_deref()
                .is_some_and(|s| s.starts_with("SELECT 'aaa"))
        );
    }
    // A payload of exactly 0xFFFFFF bytes is followed by an empty packet.
    let mut exact = vec![0xff, 0xff, 0xff, 0, com::QUERY];
    exact.resize(4 + MAX_PAYLOAD, b' ');
    exact.extend_from_slice(&[0, 0, 0, 1]);
    let mut steps = connect(MYSQL8);
    steps.push(c(exact));
    steps.push(s(ok(2, 0, 0, 0, 0)));
    let (log, _, _) = run_with(config, &steps, 1 << 16);
    assert_eq!(log.queries[0].sql_len, MAX_PAYLOAD as u64 - 1);
}

#[test]
fn multi_packet_row_is_counted_not_kept() {
    let config = Config {
        max_server_packet_bytes: 4096,
        ..Config::default()
    };
    let mut steps = connect(MYSQL8);
    steps.push(c(query("SELECT big FROM blobs")));
    // One value of 20 MiB: its length is an 8-byte lenenc (first byte 0xFE).
    let value_len = 20usize << 20;
    let mut row = Vec::new();
    lenenc(value_len as u64, &mut row);
    row.resize(row.len() + value_len, b'x');
    let mut wire = Vec::new();
    let mut seq = 3u8;
    for chunk in row.chunks(MAX_PAYLOAD) {
        wire.extend_from_slice(&[
            chunk.len() as u8,
            (chunk.len() >> 8) as u8,
            (chunk.len() >> 16) as u8,
            seq,
        ]);
        wire.extend_from_slice(chunk);
        seq += 1;
    }
    if row.len() % MAX_PAYLOAD == 0 {
        wire.extend_from_slice(&[0, 0, 0, seq]);
        seq += 1;
    }
    steps.push(s(cat(&[
        pkt(1, &[1]),
        column(2, "blobs", "big", 251),
        wire,
        text_row(seq, &[Some("small")]),
        ok(seq + 1, 0xfe, 0, 0, 0),
    ])));
    for split in [usize::MAX, 1 << 20, 65521] {
        let (log, session, error) = run_with(config.clone(), &steps, split);
        assert_eq!(error, None);
        assert_eq!(log.queries[0].rows, 2, "split {split}");
        assert!(
            log.lines
                .iter()
                .any(|l| l.starts_with(&format!("row len={} trunc=true []", row.len())))
        );
        assert!(log.lines.iter().any(|l| l.contains(r#"["small"]"#)));
        assert_eq!(session.in_flight(), 0);
    }
}

#[test]
fn query_attributes_are_skipped() {
    let caps = MYSQL8 | cap::QUERY_ATTRIBUTES;
    let mut steps = connect(caps);
    let mut body = Vec::new();
    lenenc(2, &mut body); // parameter count
    lenenc(1, &mut body); // parameter set count
    body.push(0b10); // second attribute is NULL
    body.push(1); // types follow
    body.extend_from_slice(&[253, 0]);
    lenenc_str(b"traceparent", &mut body);
    body.extend_from_slice(&[8, 0]);
    lenenc_str(b"n", &mut body);
    lenenc_str(
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        &mut body,
    );
    body.extend_from_slice(b"SELECT 1");
    steps.push(c(command(com::QUERY, &body)));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    // Without attributes: the count is zero.
    steps.push(c(command(com::QUERY, b"\x00\x01SELECT 2")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    let (log, _) = check(
        &steps,
        &[r#"sql: Some("SELECT 1")"#, r#"sql: Some("SELECT 2")"#],
    );
    assert_eq!(log.queries[0].sql_len, 8);
}

#[test]
fn local_infile_upload() {
    let mut steps = connect(MYSQL8 | cap::LOCAL_FILES);
    steps.push(c(query("LOAD DATA LOCAL INFILE '/tmp/x.csv' INTO TABLE t")));
    steps.push(s(pkt(1, b"\xfb/tmp/x.csv")));
    steps.push(c(cat(&[
        pkt(2, b"1,a\n2,b\n"),
        pkt(3, b"3,c\n"),
        pkt(4, b""),
    ])));
    steps.push(s(ok(5, 0, 3, 0, 0)));
    steps.push(c(command(com::PING, b"")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    let (log, _) = check(&steps, &["LocalInfile", "LOAD DATA", "kind: Ping"]);
    assert_eq!(log.queries[0].local_infile_bytes, Some(12));
    assert_eq!(log.queries[0].affected_rows, 3);
    assert_eq!(log.queries[1].command, CommandKind::Ping);
}

#[test]
fn field_list_legacy() {
    let mut steps = connect(CLASSIC);
    steps.push(c(command(com::FIELD_LIST, b"customers\0")));
    steps.push(s(cat(&[
        column(1, "customers", "id", 3),
        column(2, "customers", "email", 253),
        eof(3, 0),
    ])));
    let (log, _) = check(&steps, &["kind: FieldList"]);
    assert_eq!(
        log.queries[0].column_names().collect::<Vec<_>>(),
        vec!["id", "email"]
    );
}

#[test]
fn init_db_use_and_session_tracking_move_the_database() {
    let mut steps = connect(MYSQL8);
    steps.push(c(command(com::INIT_DB, b"sales")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    steps.push(c(query("use `hr`")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    steps.push(c(command(com::INIT_DB, b"nope")));
    steps.push(s(err(1, 1049, "42000", "Unknown database 'nope'")));
    steps.push(c(query("CALL switch_db()")));
    // OK with session state: SESSION_TRACK_SCHEMA = "finance".
    let mut p = vec![0, 0, 0];
    p.extend_from_slice(&(status::SESSION_STATE_CHANGED).to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    lenenc_str(b"", &mut p);
    let mut entry = Vec::new();
    lenenc_str(b"finance", &mut entry);
    let mut changes = vec![1];
    lenenc_str(&entry, &mut changes);
    lenenc_str(&changes, &mut p);
    steps.push(s(pkt(1, &p)));
    steps.push(c(query("SELECT 1")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    let (log, session) = check(&steps, &[]);
    let dbs: Vec<_> = log.queries.iter().map(|q| q.database.as_deref()).collect();
    assert_eq!(
        dbs,
        vec![
            Some("shop"),
            Some("sales"),
            Some("hr"),
            Some("hr"),
            Some("finance")
        ]
    );
    assert_eq!(session.database(), Some("finance"));
}

#[test]
fn change_user_and_reset_connection_forget_statements() {
    let mut steps = connect(CLASSIC);
    steps.push(c(command(com::STMT_PREPARE, b"SELECT 1")));
    let mut prep = vec![0x00];
    prep.extend_from_slice(&1u32.to_le_bytes());
    prep.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    steps.push(s(pkt(1, &prep)));
    let mut body = b"carol\0".to_vec();
    body.push(20);
    body.extend_from_slice(&[0x33; 20]);
    body.extend_from_slice(b"hr\0");
    body.extend_from_slice(&[45, 0]);
    body.extend_from_slice(b"mysql_native_password\0");
    steps.push(c(command(com::CHANGE_USER, &body)));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    steps.push(c(query("SELECT 2")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    let (log, session) = check(&steps, &["kind: ChangeUser", "AuthOk", "SELECT 2"]);
    assert_eq!(session.user(), Some("carol"));
    assert_eq!(session.database(), Some("hr"));
    assert_eq!(session.statement_count(), 0);
    let last = log.queries.last().expect("query");
    assert_eq!(
        (last.user.as_deref(), last.database.as_deref()),
        (Some("carol"), Some("hr"))
    );
}

#[test]
fn statements_are_bounded() {
    let config = Config {
        max_statements: 3,
        ..Config::default()
    };
    let mut steps = connect(MYSQL8);
    for id in 1..=5u32 {
        steps.push(c(command(
            com::STMT_PREPARE,
            format!("SELECT {id}").as_bytes(),
        )));
        let mut prep = vec![0x00];
        prep.extend_from_slice(&id.to_le_bytes());
        prep.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        steps.push(s(pkt(1, &prep)));
    }
    let (_, session) = check_with(config, &steps, &[]);
    assert_eq!(session.statement_count(), 3);
    assert_eq!(session.statement_sql(1), None);
    assert_eq!(session.statement_sql(2), None);
    assert_eq!(session.statement_sql(5), Some("SELECT 5"));
    assert_eq!(session.statement_sql(3), Some("SELECT 3"));
    // The byte budget: each statement weighs 64 + 8 bytes of SQL here.
    let config = Config {
        max_statement_bytes: 2 * 72 + 10,
        ..Config::default()
    };
    let (_, session) = check_with(config, &steps, &[]);
    assert_eq!(session.statement_count(), 2);
    assert_eq!(session.statement_sql(3), None);
    assert_eq!(session.statement_sql(4), Some("SELECT 4"));
}

#[test]
fn pipelined_commands_and_their_limit() {
    let mut steps = connect(MYSQL8);
    steps.push(c(cat(&[query("SELECT 'a'"), query("DELETE FROM t")])));
    steps.push(s(cat(&[
        pkt(1, &[1]),
        column(2, "", "a", 253),
        text_row(3, &[Some("a")]),
        ok(4, 0xfe, 0, 0, 0),
        ok(1, 0, 4, 0, 0),
    ])));
    let (log, _) = check(&steps, &[]);
    let got: Vec<_> = log
        .queries
        .iter()
        .map(|q| (q.sql.as_deref(), q.rows, q.affected_rows))
        .collect();
    assert_eq!(
        got,
        vec![(Some("SELECT 'a'"), 1, 0), (Some("DELETE FROM t"), 0, 4)]
    );

    let config = Config {
        max_in_flight: 2,
        ..Config::default()
    };
    let mut steps = connect(MYSQL8);
    steps.push(c(cat(&[
        query("SELECT 1"),
        query("SELECT 2"),
        query("SELECT 3"),
    ])));
    let (log, session, error) = run_with(config, &steps, usize::MAX);
    assert_eq!(error, Some(MysqlError::TooManyInFlight(2)));
    assert_eq!(session.phase(), Phase::Failed);
    assert!(log.lines.last().is_some_and(|l| l.starts_with("Failed")));
    let mut session = session;
    assert_eq!(
        session.feed_server(&ok(1, 0, 0, 0, 0), &mut ()),
        Err(MysqlError::Failed)
    );
}

#[test]
fn unknown_packets_are_surfaced_not_failures() {
    let mut steps = connect(MYSQL8);
    steps.push(c(command(0x99, b"whatever")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    steps.push(s(pkt(1, b"\x42unsolicited")));
    steps.push(c(pkt(0, b"")));
    steps.push(c(query("SELECT 1")));
    steps.push(s(ok(1, 0, 0, 0, 0)));
    let (log, session) = check(
        &steps,
        &[
            "Unknown { direction: Client, first_byte: Some(153), len: 9 }",
            "Unknown(153)",
            "Unknown { direction: Server, first_byte: Some(66), len: 12 }",
            "Unknown { direction: Client, first_byte: None, len: 0 }",
            "SELECT 1",
        ],
    );
    assert_eq!(session.phase(), Phase::Command);
    assert_eq!(log.queries.len(), 2);
}

#[test]
fn connection_phase_failures() {
    let cases: Vec<(Vec<u8>, Phase, Option<MysqlError>)> = vec![
        // Protocol version 9.
        (
            pkt(0, b"\x09old\0"),
            Phase::Failed,
            Some(MysqlError::UnsupportedProtocolVersion(9)),
        ),
        // An ERR instead of a greeting (host blocked): closed, not failed.
        (
            err(0, 1129, "HY000", "Host is blocked"),
            Phase::Closed,
            None,
        ),
        // A greeting cut short.
        (
            pkt(0, b"\x0a8.0\0\x01\x02"),
            Phase::Failed,
            Some(MysqlError::Truncated {
                packet: "initial handshake",
            }),
        ),
        // Pre-4.1 greeting without the second part is accepted.
        (
            pkt(0, b"\x0a4.0\0\x01\x00\x00\x00abcdefgh\0\x00\x02"),
            Phase::Handshake,
            None,
        ),
    ];
    for (bytes, phase, error) in cases {
        let mut session = Session::default();
        let got = session.feed_server(&bytes, &mut ()).err();
        assert_eq!((session.phase(), got), (phase, error), "{bytes:?}");
    }
    // A handshake response that is not 4.1.
    let mut session = Session::default();
    session
        .feed_server(&greeting(MYSQL8, "x"), &mut ())
        .expect("greeting");
    let r = session.feed_client(&pkt(1, &[0, 0, 0, 0, 0, 0, 0, 0, 0]), &mut ());
    assert!(matches!(r, Err(MysqlError::Malformed { .. })));
}

#[test]
fn hostile_lengths_do_not_allocate() {
    let config = Config::default();
    let mut steps = connect(MYSQL8);
    steps.push(c(query("SELECT *")));
    // A column count of 2^64-1, then columns with huge names.
    // (An 8-byte count would start with 0xFE: an EOF, which ends the command.)
    let count = vec![0xfd, 0xff, 0xff, 0xff];
    let mut big_name = Vec::new();
    for s in [&b"def"[..], b"s", b"t", b"t"] {
        lenenc_str(s, &mut big_name);
    }
    lenenc_str(&vec![b'n'; 100_000], &mut big_name);
    lenenc_str(b"n", &mut big_name);
    big_name.extend_from_slice(&[0x0c, 33, 0, 0, 0, 0, 0, 253, 0, 0, 0, 0, 0]);
    let mut server = pkt(1, &count);
    for i in 0..10u8 {
        server.extend_from_slice(&pkt(2 + i, &big_name));
    }
    server.extend_from_slice(&pkt(12, &[0xfc, 0xff]));
    steps.push(s(server));
    let (log, session) = check_with(config.clone(), &steps, &[]);
    assert_eq!(session.in_flight(), 1);
    assert!(
        log.lines
            .iter()
            .any(|l| l.contains("Truncated { packet: \"column definition\" }"))
    );

    // Attributes: a block longer than the packet, thousands of pairs.
    let mut many = Vec::new();
    for i in 0..5000 {
        many.push((format!("k{i}"), "v".to_owned()));
    }
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let steps = vec![s(greeting(MYSQL8, "x")), c(login(MYSQL8, "u", None, &refs))];
    let (_, session) = check_with(config.clone(), &steps, &[]);
    let login = session.login().expect("login");
    assert_eq!(login.attributes.len(), config.max_attributes);
    assert!(login.attributes_truncated);
}

#[test]
fn row_values_on_cut_rows_stop_early() {
    let config = Config {
        max_server_packet_bytes: 300,
        ..Config::default()
    };
    let mut steps = connect(MYSQL8);
    steps.push(c(query("SELECT a, b")));
    steps.push(s(cat(&[
        pkt(1, &[2]),
        column(2, "", "a", 253),
        column(3, "", "b", 253),
        text_row(4, &[Some("abc"), Some(&"d".repeat(400))]),
        ok(5, 0xfe, 0, 0, 0),
    ])));
    let (log, _) = check_with(config, &steps, &[r#"row len=407 trunc=true ["abc"]"#]);
    assert_eq!(log.queries[0].rows, 1);
}

#[test]
fn observer_can_sample_borrowed_values() {
    let mut steps = connect(MYSQL8);
    steps.push(c(query("SELECT email FROM customers")));
    let mut rows = vec![pkt(1, &[1]), column(2, "customers", "email", 253)];
    for i in 0..50u8 {
        rows.push(text_row(3 + i, &[Some(&format!("user{i}@example.com"))]));
    }
    rows.push(ok(53, 0xfe, 0, 0, 0));
    steps.push(s(cat(&rows)));
    let mut session = Session::default();
    let mut sampled = Vec::new();
    let mut rows_seen = 0;
    let mut sampler = |event: Event<'_>| {
        if let Event::Row(row) = event {
            rows_seen += 1;
            if sampled.len() < 3 {
                for v in row.values() {
                    if let Value::Bytes(b) = v {
                        sampled.push((
                            row.columns[0].name.clone(),
                            String::from_utf8_lossy(b).into_owned(),
                        ));
                    }
                }
            }
        }
    };
    for (dir, bytes) in &steps {
        let r = match dir {
            Direction::Client => session.feed_client(bytes, &mut sampler),
            Direction::Server => session.feed_server(bytes, &mut sampler),
        };
        r.expect("decodes");
    }
    assert_eq!(rows_seen, 50);
    assert_eq!(
        sampled[2],
        ("email".to_owned(), "user2@example.com".to_owned())
    );
}

#[test]
fn framer_keeps_sequence_and_caps() {
    use crate::mysql::Framer;
    let mut framer = Framer::new(3);
    let stream = cat(&[pkt(7, b"abcdef"), pkt(8, b"")]);
    for split in [1, 2, 5, stream.len()] {
        let mut got = Vec::new();
        for piece in stream.chunks(split) {
            let mut input = piece;
            while let Some(p) = framer.next(&mut input) {
                got.push((p.seq, p.payload.to_vec(), p.len, p.is_truncated()));
            }
        }
        assert_eq!(
            got,
            vec![(7, b"abc".to_vec(), 6, true), (8, vec![], 0, false)],
            "split {split}"
        );
        assert!(framer.is_idle());
    }
}

fn arb_steps() -> impl Strategy<Value = Vec<(bool, Vec<u8>)>> {
    prop::collection::vec(
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..64)),
        0..24,
    )
}

proptest! {
    /// Random bytes in both directions, after a real handshake or not, never panic.
    #[test]
    fn random_bytes_never_panic(steps in arb_steps(), handshake in any::<bool>(), caps in any::<u32>()) {
        let mut session = Session::default();
        let mut log = Log::default();
        if handshake {
            for (dir, bytes) in connect(caps | cap::PROTOCOL_41) {
                let _ = match dir {
                    Direction::Client => session.feed_client(&bytes, &mut log),
                    Direction::Server => session.feed_server(&bytes, &mut log),
                };
            }
        }
        for (client, bytes) in steps {
            let _ = if client {
                session.feed_client(&bytes, &mut log)
            } else {
                session.feed_server(&bytes, &mut log)
            };
        }
    }

    /// Random packets (valid framing, random payloads) decode the same whole and byte by byte.
    #[test]
    fn random_packets_split_invariant(packets in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)), 0..20)) {
        let mut steps = connect(MYSQL8);
        for (client, payload) in packets {
            let p = pkt(if client { 0 } else { 1 }, &payload);
            steps.push(if client { c(p) } else { s(p) });
        }
        let (whole, _, _) = run_with(Config::default(), &steps, usize::MAX);
        let (bytes, _, _) = run_with(Config::default(), &steps, 1);
        prop_assert_eq!(whole.lines, bytes.lines);
    }
}
