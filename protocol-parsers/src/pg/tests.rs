//! Unit tests: message layouts, framing limits, session pairing.

use super::*;

/// A tagged message with its length field.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An untagged startup-phase packet.
fn packet(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32 + 4).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    packet(&body)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn be16(v: i16) -> [u8; 2] {
    v.to_be_bytes()
}

fn be32(v: i32) -> [u8; 4] {
    v.to_be_bytes()
}

/// Decodes a client stream fed whole and byte by byte; both must agree.
fn frontend(limits: Limits, typed: bool, input: &[u8]) -> (Vec<String>, Option<DecodeError>) {
    let run = |chunk: usize| {
        let mut d = FrontendDecoder::new(limits);
        if typed {
            d.feed(&startup(&[("user", "u")]), |_| {}).unwrap();
        }
        let mut out = Vec::new();
        let mut err = None;
        for c in input.chunks(chunk.max(1)) {
            if let Err(e) = d.feed(c, |f| out.push(format!("{:?}", FrontendMessage::parse(&f)))) {
                err.get_or_insert(e);
            }
        }
        (out, err)
    };
    let whole = run(input.len());
    assert_eq!(whole, run(1), "byte-by-byte decoding differs");
    whole
}

fn check_frontend(input: &[u8], expected: &[&str]) {
    let (got, err) = frontend(Limits::default(), true, input);
    assert_eq!(err, None);
    assert_eq!(got, expected);
}

fn check_startup(input: &[u8], expected: &[&str], error: Option<DecodeError>) {
    let (got, err) = frontend(Limits::default(), false, input);
    assert_eq!(got, expected);
    assert_eq!(err, error);
}

fn backend(limits: Limits, input: &[u8]) -> (Vec<String>, Option<DecodeError>) {
    let run = |chunk: usize| {
        let mut d = BackendDecoder::new(limits);
        let mut out = Vec::new();
        let mut err = None;
        for c in input.chunks(chunk.max(1)) {
            if let Err(e) = d.feed(c, |f| out.push(format!("{:?}", BackendMessage::parse(&f)))) {
                err.get_or_insert(e);
            }
        }
        (out, err)
    };
    let whole = run(input.len());
    assert_eq!(whole, run(1), "byte-by-byte decoding differs");
    whole
}

fn check_backend(input: &[u8], expected: &[&str]) {
    let (got, err) = backend(Limits::default(), input);
    assert_eq!(err, None);
    assert_eq!(got, expected);
}

#[test]
fn startup_packets() {
    check_startup(&packet(&be32(80_877_103)), &["SslRequest"], None);
    check_startup(&packet(&be32(80_877_104)), &["GssEncRequest"], None);
    check_startup(
        &packet(&cat(&[&be32(80_877_102), &be32(4242), &be32(7)])),
        &["CancelRequest { process_id: 4242 }"],
        None,
    );
    check_startup(
        &startup(&[
            ("user", "alice"),
            ("database", "shop"),
            ("application_name", "svc-a"),
        ]),
        &[
            r#"Startup(StartupMessage { major: 3, minor: 0, params: [("user", "alice"), ("database", "shop"), ("application_name", "svc-a")] })"#,
        ],
        None,
    );
    // SSLRequest refused, then the startup packet, then typed messages.
    check_startup(
        &cat(&[
            &packet(&be32(80_877_103)),
            &startup(&[("user", "bob")]),
            &msg(b'Q', b"SELECT 1\0"),
        ]),
        &[
            "SslRequest",
            r#"Startup(StartupMessage { major: 3, minor: 0, params: [("user", "bob")] })"#,
            r#"Query { sql: "SELECT 1" }"#,
        ],
        None,
    );
}

#[test]
fn startup_errors() {
    // Protocol 2.0 is not supported.
    check_startup(
        &packet(&cat(&[&be32(0x0002_0000), b"user\0x\0\0"])),
        &[],
        Some(DecodeError::UnsupportedRequest { code: 0x0002_0000 }),
    );
    check_startup(&be32(7), &[], Some(DecodeError::StartupLength { len: 7 }));
    check_startup(
        &be32(10_001),
        &[],
        Some(DecodeError::StartupLength { len: 10_001 }),
    );
    check_startup(&be32(-8), &[], Some(DecodeError::StartupLength { len: -8 }));
    // Parameters without the final terminator.
    let (got, err) = frontend(
        Limits::default(),
        false,
        &packet(&cat(&[&be32(196_608), b"user\0x\0"])),
    );
    assert_eq!(err, None);
    assert!(got[0].starts_with("Malformed { tag: 0"), "{got:?}");
    // An SSLRequest with extra bytes.
    let (got, _) = frontend(
        Limits::default(),
        false,
        &packet(&cat(&[&be32(80_877_103), b"x"])),
    );
    assert!(got[0].contains("TrailingBytes"), "{got:?}");
}

#[test]
fn frontend_messages() {
    check_frontend(&msg(b'Q', b"SELECT 1\0"), &[r#"Query { sql: "SELECT 1" }"#]);
    check_frontend(
        &msg(b'P', &cat(&[b"s1\0SELECT $1\0", &be16(1), &be32(23)])),
        &[r#"Parse { statement: "s1", sql: "SELECT $1", param_types: Oids([0, 0, 0, 23]) }"#],
    );
    check_frontend(
        &msg(
            b'B',
            &cat(&[
                b"p\0s1\0",
                &be16(1),
                &be16(0),
                &be16(2),
                &be32(3),
                b"abc",
                &be32(-1),
                &be16(1),
                &be16(1),
            ]),
        ),
        &[
            r#"Bind(Bind { portal: "p", statement: "s1", param_formats: FormatCodes([0, 0]), params: [Some(3), None], result_formats: FormatCodes([0, 1]) })"#,
        ],
    );
    check_frontend(
        &msg(b'D', b"Sst\0"),
        &[r#"Describe { target: Statement, name: "st" }"#],
    );
    check_frontend(
        &msg(b'D', b"P\0"),
        &[r#"Describe { target: Portal, name: "" }"#],
    );
    check_frontend(
        &msg(b'E', &cat(&[b"\0", &be32(100)])),
        &[r#"Execute { portal: "", max_rows: 100 }"#],
    );
    check_frontend(&msg(b'S', b""), &["Sync"]);
    check_frontend(&msg(b'H', b""), &["Flush"]);
    check_frontend(&msg(b'X', b""), &["Terminate"]);
    check_frontend(
        &msg(b'C', b"Sst\0"),
        &[r#"Close { target: Statement, name: "st" }"#],
    );
    check_frontend(
        &msg(b'd', b"1\tx\n"),
        &["CopyData { data: [49, 9, 120, 10] }"],
    );
    check_frontend(&msg(b'c', b""), &["CopyDone"]);
    check_frontend(&msg(b'f', b"nope\0"), &[r#"CopyFail { message: "nope" }"#]);
    check_frontend(
        &msg(b'F', &cat(&[&be32(1598), &be16(0)])),
        &["FunctionCall { function_oid: 1598 }"],
    );
    check_frontend(&msg(b'z', b"abc"), &["Unknown { tag: 122, len: 3 }"]);
}

#[test]
fn passwords_are_never_printed() {
    let (got, _) = frontend(Limits::default(), true, &msg(b'p', b"hunter2\0"));
    assert_eq!(got, ["AuthResponse(AuthResponse { len: 8, .. })"]);
    let sasl = cat(&[b"SCRAM-SHA-256\0", &be32(5), b"n,,n="]);
    let mut d = FrontendDecoder::default();
    d.feed(&startup(&[("user", "u")]), |_| {}).unwrap();
    let mut mech = None;
    d.feed(&msg(b'p', &sasl), |f| {
        if let FrontendMessage::AuthResponse(a) = FrontendMessage::parse(&f) {
            mech = a.sasl_mechanism().ok().map(|m| m.to_string());
        }
    })
    .unwrap();
    assert_eq!(mech.as_deref(), Some("SCRAM-SHA-256"));
}

#[test]
fn malformed_bodies_do_not_stop_decoding() {
    let input = cat(&[
        &msg(b'Q', b"SELECT 1"),                       // no NUL
        &msg(b'D', b"Xname\0"),                        // bad target
        &msg(b'P', &cat(&[b"\0SELECT\0", &be16(-1)])), // negative count
        &msg(b'S', b"x"),                              // trailing byte
        &msg(b'E', b"\0"),                             // no max rows
        &msg(b'Q', b"SELECT 2\0"),
    ]);
    let (got, err) = frontend(Limits::default(), true, &input);
    assert_eq!(err, None);
    assert_eq!(got.len(), 6);
    assert!(
        got[0].contains(r#"Unterminated { tag: 'Q', field: "query" }"#),
        "{}",
        got[0]
    );
    assert!(
        got[1].contains(r#"InvalidValue { tag: 'D', field: "target", value: 88 }"#),
        "{}",
        got[1]
    );
    assert!(got[2].contains("InvalidValue"), "{}", got[2]);
    assert!(
        got[3].contains("TrailingBytes { tag: 'S', count: 1 }"),
        "{}",
        got[3]
    );
    assert!(got[4].contains("Truncated"), "{}", got[4]);
    assert_eq!(got[5], r#"Query { sql: "SELECT 2" }"#);
}

#[test]
fn framing_limits() {
    let limits = Limits {
        max_message_len: 1000,
        max_buffered_len: 16,
    };
    // Length below 4, and negative.
    let (got, err) = backend(limits, &cat(&[b"Z", &be32(3), b"I"]));
    assert_eq!(
        (got.len(), err),
        (0, Some(DecodeError::LengthTooShort { tag: 'Z', len: 3 }))
    );
    let (_, err) = backend(limits, &cat(&[b"D", &be32(-1)]));
    assert_eq!(err, Some(DecodeError::LengthTooShort { tag: 'D', len: -1 }));
    // Above the maximum.
    let (_, err) = backend(limits, &cat(&[b"D", &be32(1001)]));
    assert_eq!(
        err,
        Some(DecodeError::LengthTooLong {
            tag: 'D',
            len: 1001,
            max: 1000
        })
    );
    let (_, err) = backend(Limits::default(), &cat(&[b"d", &be32(i32::MAX)]));
    assert!(matches!(err, Some(DecodeError::LengthTooLong { .. })));
    // Oversized (above max_buffered_len) messages are skipped, then decoding goes on.
    let big = msg(b'D', &cat(&[&be16(1), &be32(30), &[b'x'; 30]]));
    let (got, err) = backend(limits, &cat(&[&big, &msg(b'I', b"")]));
    assert_eq!(err, None);
    assert_eq!(
        got,
        ["Oversized { tag: 68, len: 36 }", "EmptyQueryResponse"]
    );
    // A truncated stream emits nothing for the partial message.
    let (got, err) = backend(limits, &big[..20]);
    assert_eq!(
        (got, err),
        (vec!["Oversized { tag: 68, len: 36 }".to_string()], None)
    );
    let (got, err) = backend(limits, &msg(b'C', b"SELECT 1\0")[..8]);
    assert_eq!((got.len(), err), (0, None));
}

#[test]
fn failed_decoder_stays_failed() {
    let mut d = BackendDecoder::default();
    let mut n = 0;
    assert!(
        d.feed(&cat(&[&msg(b'I', b""), b"Z", &be32(0)]), |_| n += 1)
            .is_err()
    );
    assert_eq!(n, 1);
    assert!(d.is_failed());
    assert_eq!(
        d.feed(&msg(b'I', b""), |_| n += 1),
        Err(DecodeError::Failed)
    );
    assert_eq!(n, 1);
}

#[test]
fn backend_messages() {
    check_backend(&msg(b'R', &be32(0)), &["Authentication(Ok)"]);
    check_backend(&msg(b'R', &be32(3)), &["Authentication(CleartextPassword)"]);
    check_backend(
        &msg(b'R', &cat(&[&be32(5), b"salt"])),
        &["Authentication(Md5Password)"],
    );
    check_backend(
        &msg(
            b'R',
            &cat(&[&be32(10), b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"]),
        ),
        &[r#"Authentication(Sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))"#],
    );
    check_backend(
        &msg(b'R', &cat(&[&be32(11), b"r=abc"])),
        &["Authentication(SaslContinue)"],
    );
    check_backend(
        &msg(b'R', &cat(&[&be32(12), b"v=xyz"])),
        &["Authentication(SaslFinal)"],
    );
    check_backend(&msg(b'R', &be32(99)), &["Authentication(Other(99))"]);
    check_backend(
        &msg(b'K', &cat(&[&be32(77), &be32(12345)])),
        &["BackendKeyData { process_id: 77 }"],
    );
    check_backend(
        &msg(b'S', b"application_name\0app\0"),
        &[r#"ParameterStatus { name: "application_name", value: "app" }"#],
    );
    check_backend(
        &msg(b'Z', b"T"),
        &["ReadyForQuery { status: InTransaction }"],
    );
    check_backend(&msg(b'Z', b"E"), &["ReadyForQuery { status: Failed }"]);
    check_backend(
        &msg(
            b'T',
            &cat(&[
                &be16(1),
                b"email\0",
                &be32(16384),
                &be16(2),
                &be32(25),
                &be16(-1),
                &be32(-1),
                &be16(0),
            ]),
        ),
        &[
            r#"RowDescription([FieldDescription { name: "email", table_oid: 16384, column_attr: 2, type_oid: 25, type_size: -1, type_modifier: -1, format: 0 }])"#,
        ],
    );
    check_backend(
        &msg(b'D', &cat(&[&be16(3), &be32(1), b"7", &be32(-1), &be32(0)])),
        &["DataRow([Ok(Some(1)), Ok(None), Ok(Some(0))])"],
    );
    check_backend(
        &msg(b'D', &cat(&[&be16(2), &be32(1), b"7", &be32(9)])),
        &[r#"DataRow([Ok(Some(1)), Err(Truncated { tag: 'D', field: "column value" })])"#],
    );
    check_backend(&msg(b'I', b""), &["EmptyQueryResponse"]);
    check_backend(
        &msg(
            b'E',
            b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0",
        ),
        &[
            r#"ErrorResponse(ErrorFields { severity: Some("ERROR"), code: Some("42P01"), message: Some("relation \"x\" does not exist") })"#,
        ],
    );
    check_backend(
        &msg(b'N', b"SNOTICE\0C00000\0Mhi\0\0"),
        &[
            r#"NoticeResponse(ErrorFields { severity: Some("NOTICE"), code: Some("00000"), message: Some("hi") })"#,
        ],
    );
    check_backend(
        &cat(&[
            &msg(b'1', b""),
            &msg(b'2', b""),
            &msg(b'3', b""),
            &msg(b'n', b""),
            &msg(b's', b""),
        ]),
        &[
            "ParseComplete",
            "BindComplete",
            "CloseComplete",
            "NoData",
            "PortalSuspended",
        ],
    );
    check_backend(
        &msg(b't', &cat(&[&be16(1), &be32(23)])),
        &["ParameterDescription(Oids([0, 0, 0, 23]))"],
    );
    check_backend(
        &msg(b'G', &cat(&[&[0], &be16(2), &be16(0), &be16(0)])),
        &["CopyInResponse(CopyResponse { format: 0, columns: 2, formats: [0, 0, 0, 0] })"],
    );
    check_backend(
        &msg(b'H', &cat(&[&[1], &be16(0)])),
        &["CopyOutResponse(CopyResponse { format: 1, columns: 0, formats: [] })"],
    );
    check_backend(
        &msg(b'A', &cat(&[&be32(5), b"chan\0hello\0"])),
        &[r#"NotificationResponse { process_id: 5, channel: "chan", payload: "hello" }"#],
    );
    check_backend(
        &msg(b'v', &cat(&[&be32(0), &be32(1), b"_pq_.x\0"])),
        &["NegotiateProtocolVersion { newest_minor: 0, unrecognized: 1 }"],
    );
    check_backend(
        &msg(b'V', &be32(-1)),
        &["FunctionCallResponse { value: None }"],
    );
    check_backend(&msg(b'y', b""), &["Unknown { tag: 121, len: 0 }"]);
    check_backend(
        &msg(b'D', b"\0"),
        &[r#"Malformed { tag: 68, len: 1, error: Truncated { tag: 'D', field: "column count" } }"#],
    );
    check_backend(
        &msg(b'E', b"SERROR\0"),
        &[r#"Malformed { tag: 69, len: 7, error: Truncated { tag: 'E', field: "field code" } }"#],
    );
}

fn check_tag(tag: &str, command: &str, rows: Option<u64>, oid: Option<u32>) {
    assert_eq!(
        CommandTag::parse(tag),
        CommandTag { command, rows, oid },
        "{tag}"
    );
}

#[test]
fn command_tags() {
    check_tag("SELECT 5", "SELECT", Some(5), None);
    check_tag("INSERT 0 2", "INSERT", Some(2), Some(0));
    check_tag("UPDATE 1", "UPDATE", Some(1), None);
    check_tag("DELETE 0", "DELETE", Some(0), None);
    check_tag("MERGE 3", "MERGE", Some(3), None);
    check_tag("COPY 2", "COPY", Some(2), None);
    check_tag("FETCH 10", "FETCH", Some(10), None);
    check_tag("MOVE 4", "MOVE", Some(4), None);
    check_tag(
        "SELECT 18446744073709551615",
        "SELECT",
        Some(u64::MAX),
        None,
    );
    check_tag("CREATE TABLE", "CREATE TABLE", None, None);
    check_tag("DEALLOCATE ALL", "DEALLOCATE ALL", None, None);
    check_tag("BEGIN", "BEGIN", None, None);
    check_tag("SELECT", "SELECT", None, None);
    check_tag("SELECT x", "SELECT x", None, None);
    check_tag("SELECT -1", "SELECT -1", None, None);
    check_tag("SELECT 1 2", "SELECT 1 2", None, None);
    check_tag(
        "SELECT 99999999999999999999",
        "SELECT 99999999999999999999",
        None,
        None,
    );
    check_tag("", "", None, None);
}

#[test]
fn encryption_answers() {
    let run = |kind, input: &[u8]| {
        let mut d = BackendDecoder::default();
        assert!(d.expect_encryption_response(kind));
        let mut out = Vec::new();
        d.feed(input, |f| {
            out.push(format!("{:?}", BackendMessage::parse(&f)))
        })
        .unwrap();
        (out, d.is_passthrough())
    };
    let (got, pass) = run(EncryptionKind::Ssl, &cat(&[b"N", &msg(b'R', &be32(0))]));
    assert_eq!(
        got,
        [
            "EncryptionResponse { accepted: false }",
            "Authentication(Ok)"
        ]
    );
    assert!(!pass);
    let (got, pass) = run(EncryptionKind::Ssl, b"S\x16\x03\x01\x02\x00garbage");
    assert_eq!(got, ["EncryptionResponse { accepted: true }"]);
    assert!(pass);
    let (got, pass) = run(EncryptionKind::Gss, b"G\x00\x00");
    assert_eq!((got.len(), pass), (1, true));
    // 'S' is no answer to GSSENCRequest: read as a regular message.
    let (got, _) = run(EncryptionKind::Gss, &msg(b'S', b"a\0b\0"));
    assert_eq!(got, [r#"ParameterStatus { name: "a", value: "b" }"#]);
    // An old server answering with an error.
    let (got, _) = run(EncryptionKind::Ssl, &msg(b'E', b"SFATAL\0C08P01\0Mno\0\0"));
    assert!(got[0].starts_with("ErrorResponse"));
}

#[test]
fn connection_follows_tls_acceptance() {
    let mut c = Connection::default();
    c.client_data(&packet(&be32(80_877_103)), |_| {}).unwrap();
    let mut msgs = Vec::new();
    c.server_data(b"S", |m, _| msgs.push(format!("{m:?}")))
        .unwrap();
    assert_eq!(msgs, ["EncryptionResponse { accepted: true }"]);
    assert!(c.is_opaque());
    // TLS records are ignored, not errors.
    c.client_data(b"\x16\x03\x01\x02\x00\x01\x00", |_| panic!("no message"))
        .unwrap();
    c.server_data(b"\x16\x03\x03\x00\x7a", |_, _| panic!("no message"))
        .unwrap();
    assert_eq!(c.session().encryption(), (true, Some(true)));
}

// ---- session ----

struct Harness {
    conn: Connection,
    events: Vec<QueryEvent>,
}

impl Harness {
    fn new(limits: SessionLimits) -> Self {
        let mut conn = Connection::new(Limits::default(), limits);
        conn.client_data(
            &startup(&[
                ("user", "app"),
                ("database", "db"),
                ("application_name", "svc"),
            ]),
            |_| {},
        )
        .unwrap();
        conn.server_data(
            &cat(&[
                &msg(b'R', &be32(0)),
                &msg(b'K', &cat(&[&be32(9), &be32(1)])),
                &msg(b'Z', b"I"),
            ]),
            |_, _| {},
        )
        .unwrap();
        Self {
            conn,
            events: Vec::new(),
        }
    }

    fn client(&mut self, parts: &[Vec<u8>]) {
        self.conn.client_data(&parts.concat(), |_| {}).unwrap();
    }

    fn server(&mut self, parts: &[Vec<u8>]) {
        let events = &mut self.events;
        self.conn
            .server_data(&parts.concat(), |_, e| events.extend(e))
            .unwrap();
    }

    fn summary(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| {
                format!(
                    "{:?} {} {:?} {} {} {}",
                    e.sql.as_deref(),
                    match &e.source {
                        QuerySource::Simple { index } => format!("simple#{index}"),
                        QuerySource::Extended { statement, portal } =>
                            format!("ext({statement:?},{portal:?})"),
                        QuerySource::FunctionCall => "fn".into(),
                        QuerySource::Connection => "conn".into(),
                    },
                    e.outcome,
                    e.command
                        .as_deref()
                        .map_or("-".into(), |c| format!("{c}/{:?}", e.tag_rows)),
                    e.rows_returned,
                    e.error.as_ref().map_or("-", |x| &*x.sqlstate),
                )
            })
            .collect()
    }
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(
        b'P',
        &cat(&[name.as_bytes(), b"\0", sql.as_bytes(), b"\0", &be16(0)]),
    )
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    msg(
        b'B',
        &cat(&[
            portal.as_bytes(),
            b"\0",
            stmt.as_bytes(),
            b"\0",
            &be16(0),
            &be16(0),
            &be16(0),
        ]),
    )
}

fn execute(portal: &str) -> Vec<u8> {
    msg(b'E', &cat(&[portal.as_bytes(), b"\0", &be32(0)]))
}

fn describe(target: u8, name: &str) -> Vec<u8> {
    msg(b'D', &cat(&[&[target], name.as_bytes(), b"\0"]))
}

fn close(target: u8, name: &str) -> Vec<u8> {
    msg(b'C', &cat(&[&[target], name.as_bytes(), b"\0"]))
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cat(&[sql.as_bytes(), b"\0"]))
}

fn row_desc(names: &[&str]) -> Vec<u8> {
    let mut body = be16(names.len() as i16).to_vec();
    for n in names {
        body.extend_from_slice(n.as_bytes());
        body.push(0);
        body.extend_from_slice(&cat(&[
            &be32(0),
            &be16(0),
            &be32(25),
            &be16(-1),
            &be32(-1),
            &be16(0),
        ]));
    }
    msg(b'T', &body)
}

fn data_row(n: usize) -> Vec<u8> {
    let mut body = be16(n as i16).to_vec();
    for _ in 0..n {
        body.extend_from_slice(&cat(&[&be32(1), b"v"]));
    }
    msg(b'D', &body)
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cat(&[tag.as_bytes(), b"\0"]))
}

fn error(code: &str) -> Vec<u8> {
    msg(
        b'E',
        &cat(&[b"SERROR\0VERROR\0C", code.as_bytes(), b"\0Mboom\0\0"]),
    )
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

#[test]
fn session_startup_facts() {
    let mut h = Harness::new(SessionLimits::default());
    let s = h.conn.session();
    assert_eq!(
        (s.user(), s.database(), s.application_name()),
        (Some("app"), Some("db"), Some("svc"))
    );
    assert_eq!(
        (s.auth_method(), s.authenticated(), s.backend_pid()),
        (Some(AuthMethod::Trust), true, Some(9))
    );
    h.server(&[
        msg(b'S', b"application_name\0renamed\0"),
        msg(b'S', b"server_version\x0015.18\0"),
    ]);
    let s = h.conn.session();
    assert_eq!(s.application_name(), Some("renamed"));
    assert_eq!(s.startup_param("application_name"), Some("svc"));
    assert_eq!(s.server_param("server_version"), Some("15.18"));
}

#[test]
fn session_simple_multi_statement() {
    let mut h = Harness::new(SessionLimits::default());
    h.client(&[query("SELECT a FROM t; UPDATE t SET a = 1; SELECT nope")]);
    h.server(&[
        row_desc(&["a"]),
        data_row(1),
        data_row(1),
        complete("SELECT 2"),
        complete("UPDATE 7"),
        error("42703"),
        ready(b'I'),
    ]);
    let q = "Some(\"SELECT a FROM t; UPDATE t SET a = 1; SELECT nope\")";
    assert_eq!(
        h.summary(),
        [
            format!("{q} simple#0 Complete SELECT/Some(2) 2 -"),
            format!("{q} simple#1 Complete UPDATE/Some(7) 0 -"),
            format!("{q} simple#2 Failed - 0 42703"),
        ]
    );
    assert_eq!(h.events[0].columns.as_deref(), Some(&["a".into()][..]));
    assert_eq!(h.events[1].rows_affected(), Some(7));
    assert_eq!(h.events[0].rows_affected(), None);
    assert_eq!(h.conn.session().pending_count(), 0);
}

#[test]
fn session_extended_pipelined_unnamed() {
    let mut h = Harness::new(SessionLimits::default());
    // Two unnamed statements pipelined before any answer.
    h.client(&[
        parse("", "SELECT 1"),
        bind("", ""),
        describe(b'P', ""),
        execute(""),
        sync(),
        parse("", "DELETE FROM t"),
        bind("", ""),
        describe(b'P', ""),
        execute(""),
        sync(),
    ]);
    h.server(&[
        msg(b'1', b""),
        msg(b'2', b""),
        row_desc(&["?column?"]),
        data_row(1),
        complete("SELECT 1"),
        ready(b'I'),
        msg(b'1', b""),
        msg(b'2', b""),
        msg(b'n', b""),
        complete("DELETE 3"),
        ready(b'I'),
    ]);
    assert_eq!(
        h.summary(),
        [
            r#"Some("SELECT 1") ext(Some(""),"") Complete SELECT/Some(1) 1 -"#,
            r#"Some("DELETE FROM t") ext(Some(""),"") Complete DELETE/Some(3) 0 -"#,
        ]
    );
    assert_eq!(
        h.events[0].columns.as_deref(),
        Some(&["?column?".into()][..])
    );
    assert_eq!(h.events[1].columns, None);
    assert_eq!(h.conn.session().pending_count(), 0);
    assert_eq!(h.conn.session().portal_count(), 0);
    assert_eq!(h.conn.session().stats(), SessionStats::default());
}

#[test]
fn session_named_statements_and_errors() {
    let mut h = Harness::new(SessionLimits::default());
    h.client(&[
        parse("s1", "SELECT * FROM users WHERE id = $1"),
        describe(b'S', "s1"),
        sync(),
    ]);
    h.server(&[
        msg(b'1', b""),
        msg(b't', &cat(&[&be16(1), &be32(23)])),
        row_desc(&["id", "email"]),
        ready(b'I'),
    ]);
    assert_eq!(
        h.conn.session().statement_sql("s1"),
        Some("SELECT * FROM users WHERE id = $1")
    );
    // Execute twice through named portals, no portal Describe: columns come from the statement.
    h.client(&[
        bind("p1", "s1"),
        execute("p1"),
        bind("", "s1"),
        execute(""),
        sync(),
    ]);
    h.server(&[
        msg(b'2', b""),
        data_row(2),
        complete("SELECT 1"),
        msg(b'2', b""),
        complete("SELECT 0"),
        ready(b'I'),
    ]);
    // A redefinition of s1 fails and must not replace it; the pipeline is
    // skipped up to Sync, so the Execute after it yields no event.
    h.client(&[parse("s1", "SELECT 2"), bind("", "s1"), execute(""), sync()]);
    h.server(&[error("42P05"), ready(b'I')]);
    // A bad statement: its name is not kept.
    h.client(&[parse("bad", "SELEC 1"), sync()]);
    h.server(&[error("42601"), ready(b'I')]);
    assert_eq!(
        h.summary(),
        [
            r#"Some("SELECT * FROM users WHERE id = $1") ext(Some("s1"),"p1") Complete SELECT/Some(1) 1 -"#,
            r#"Some("SELECT * FROM users WHERE id = $1") ext(Some("s1"),"") Complete SELECT/Some(0) 0 -"#,
            r#"Some("SELECT 2") ext(Some("s1"),"") Failed - 0 42P05"#,
            r#"Some("SELEC 1") ext(Some("bad"),"") Failed - 0 42601"#,
        ]
    );
    assert_eq!(
        h.events[0].columns.as_deref(),
        Some(&["id".into(), "email".into()][..])
    );
    let s = h.conn.session();
    assert_eq!(
        s.statement_sql("s1"),
        Some("SELECT * FROM users WHERE id = $1")
    );
    assert_eq!(s.statement_sql("bad"), None);
    assert_eq!(s.pending_count(), 0);
    // Close removes it.
    h.client(&[close(b'S', "s1"), sync()]);
    h.server(&[msg(b'3', b""), ready(b'I')]);
    assert_eq!(h.conn.session().statement_sql("s1"), None);
    assert_eq!(h.conn.session().stats().unmatched_responses, 0);
}

#[test]
fn session_portal_suspended_and_transaction_portals() {
    let mut h = Harness::new(SessionLimits::default());
    h.client(&[query("BEGIN")]);
    h.server(&[complete("BEGIN"), ready(b'T')]);
    h.client(&[
        parse("", "SELECT g FROM big"),
        bind("cur", ""),
        execute("cur"),
        sync(),
    ]);
    h.server(&[
        msg(b'1', b""),
        msg(b'2', b""),
        data_row(1),
        data_row(1),
        msg(b's', b""),
        ready(b'T'),
    ]);
    // The named portal lives on inside the transaction.
    assert_eq!(h.conn.session().portal_count(), 1);
    h.client(&[execute("cur"), sync(), query("COMMIT")]);
    h.server(&[
        data_row(1),
        complete("SELECT 1"),
        ready(b'T'),
        complete("COMMIT"),
        ready(b'I'),
    ]);
    assert_eq!(
        h.summary()[1..],
        [
            r#"Some("SELECT g FROM big") ext(Some(""),"cur") Suspended - 2 -"#,
            r#"Some("SELECT g FROM big") ext(Some(""),"cur") Complete SELECT/Some(1) 1 -"#,
            r#"Some("COMMIT") simple#0 Complete COMMIT/None 0 -"#,
        ]
    );
    assert_eq!(h.conn.session().portal_count(), 0);
}

#[test]
fn session_deallocate() {
    let mut h = Harness::new(SessionLimits::default());
    h.client(&[
        parse("a", "SELECT 1"),
        parse("B", "SELECT 2"),
        parse("c", "SELECT 3"),
        sync(),
    ]);
    h.server(&[msg(b'1', b""), msg(b'1', b""), msg(b'1', b""), ready(b'I')]);
    h.client(&[query("deallocate prepare \"B\";")]);
    h.server(&[complete("DEALLOCATE"), ready(b'I')]);
    assert_eq!(h.conn.session().statement_sql("B"), None);
    assert_eq!(h.conn.session().statement_sql("a"), Some("SELECT 1"));
    h.client(&[query("DEALLOCATE ALL")]);
    h.server(&[complete("DEALLOCATE ALL"), ready(b'I')]);
    assert_eq!(h.conn.session().statement_count(), 0);
}

#[test]
fn deallocate_targets() {
    use super::session::deallocate_target;
    assert_eq!(deallocate_target("DEALLOCATE foo").as_deref(), Some("foo"));
    assert_eq!(
        deallocate_target("deallocate Prepare FOO ;").as_deref(),
        Some("foo")
    );
    assert_eq!(
        deallocate_target("DEALLOCATE \"Mixed\"").as_deref(),
        Some("Mixed")
    );
    assert_eq!(deallocate_target("DEALLOCATE ALL").as_deref(), Some("all"));
    assert_eq!(deallocate_target("DEALLOCATE a; DEALLOCATE b"), None);
    assert_eq!(deallocate_target("SELECT 1"), None);
    assert_eq!(deallocate_target("DEALLOCATE"), None);
}

#[test]
fn session_limits_hold() {
    let limits = SessionLimits {
        max_statements: 2,
        max_portals: 1,
        max_pending: 8,
        max_sql_bytes: 20,
        ..SessionLimits::default()
    };
    let mut h = Harness::new(limits);
    h.client(&[
        parse("a", "SELECT 1"),
        parse("b", "SELECT 2"),
        parse("c", "SELECT 3"),
        sync(),
    ]);
    h.server(&[msg(b'1', b""), msg(b'1', b""), msg(b'1', b""), ready(b'I')]);
    let s = h.conn.session();
    assert_eq!(
        (s.statement_count(), s.stats().untracked_statements),
        (2, 1)
    );
    // The SQL byte budget (20) is spent: a new statement is not tracked.
    h.client(&[
        close(b'S', "b"),
        parse("d", "SELECT 'a long statement'"),
        sync(),
    ]);
    h.server(&[msg(b'3', b""), msg(b'1', b""), ready(b'I')]);
    assert_eq!(h.conn.session().statement_sql("d"), None);
    assert_eq!(h.conn.session().stats().untracked_statements, 2);
    // Execute of an untracked statement: SQL unknown, still paired.
    h.client(&[bind("", "d"), execute(""), sync()]);
    h.server(&[msg(b'2', b""), complete("SELECT 0"), ready(b'I')]);
    assert_eq!(
        h.summary().last().unwrap(),
        r#"None ext(Some("d"),"") Complete SELECT/Some(0) 0 -"#
    );
    // Overflow of the pending queue: pairing stops, then resumes once every
    // Sync has been answered.
    let mut flood = Vec::new();
    for _ in 0..5 {
        flood.extend([bind("", "a"), execute(""), sync()]);
    }
    h.client(&flood);
    assert_eq!(h.conn.session().stats().queue_overflows, 1);
    let before = h.events.len();
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.extend([msg(b'2', b""), complete("SELECT 1"), ready(b'I')]);
    }
    h.server(&answers);
    assert_eq!(h.events.len(), before, "no events while out of step");
    h.client(&[query("SELECT 1")]);
    h.server(&[complete("SELECT 1"), ready(b'I')]);
    assert_eq!(
        h.summary().last().unwrap(),
        r#"Some("SELECT 1") simple#0 Complete SELECT/Some(1) 0 -"#
    );
    assert!(h.conn.session().pending_count() <= 8);
}

#[test]
fn session_copy() {
    let mut h = Harness::new(SessionLimits::default());
    h.client(&[query("COPY t TO STDOUT")]);
    h.server(&[
        msg(b'H', &cat(&[&[0], &be16(1), &be16(0)])),
        msg(b'd', b"1\n"),
        msg(b'd', b"2\n"),
        msg(b'c', b""),
        complete("COPY 2"),
        ready(b'I'),
    ]);
    h.client(&[
        query("COPY t FROM STDIN"),
        msg(b'd', b"3\n"),
        msg(b'c', b""),
    ]);
    h.server(&[
        msg(b'G', &cat(&[&[0], &be16(1), &be16(0)])),
        complete("COPY 1"),
        ready(b'I'),
    ]);
    assert_eq!(h.events[0].rows_returned, 2);
    assert_eq!(h.events[0].rows_affected(), None);
    assert_eq!(h.events[1].rows_affected(), Some(1));
}

#[test]
fn session_auth_failure_and_mechanism() {
    let mut conn = Connection::default();
    conn.client_data(&startup(&[("user", "mallory")]), |_| {})
        .unwrap();
    let mut events = Vec::new();
    conn.server_data(
        &msg(b'R', &cat(&[&be32(10), b"SCRAM-SHA-256\0\0"])),
        |_, e| events.extend(e),
    )
    .unwrap();
    conn.client_data(
        &msg(b'p', &cat(&[b"SCRAM-SHA-256\0", &be32(3), b"n,,"])),
        |_| {},
    )
    .unwrap();
    conn.server_data(
        &msg(
            b'E',
            b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0",
        ),
        |_, e| events.extend(e),
    )
    .unwrap();
    let s = conn.session();
    assert_eq!(
        (s.auth_method(), s.sasl_mechanism(), s.authenticated()),
        (Some(AuthMethod::Sasl), Some("SCRAM-SHA-256"), false)
    );
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].source, QuerySource::Connection);
    assert_eq!(&*events[0].error.as_ref().unwrap().sqlstate, "28P01");
    assert_eq!(&*events[0].error.as_ref().unwrap().severity, "FATAL");
}

#[test]
fn oversized_query_keeps_pairing() {
    let limits = Limits {
        max_message_len: 1 << 20,
        max_buffered_len: 32,
    };
    let mut conn = Connection::new(limits, SessionLimits::default());
    conn.client_data(&startup(&[("user", "u")]), |_| {})
        .unwrap();
    let long = format!("SELECT '{}'", "x".repeat(100));
    conn.client_data(&query(&long), |_| {}).unwrap();
    conn.client_data(&query("SELECT 2"), |_| {}).unwrap();
    let mut events = Vec::new();
    let server = cat(&[
        &msg(b'R', &be32(0)),
        &ready(b'I'),
        &msg(b'D', &cat(&[&be16(1), &be32(100), &[b'x'; 100]])),
        &complete("SELECT 1"),
        &ready(b'I'),
        &complete("SELECT 1"),
        &ready(b'I'),
    ]);
    conn.server_data(&server, |_, e| events.extend(e)).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0].sql.as_deref(), events[0].rows_returned),
        (None, 1)
    );
    assert_eq!(events[1].sql.as_deref(), Some("SELECT 2"));
    assert_eq!(conn.session().stats().opaque_messages, 2);
}
