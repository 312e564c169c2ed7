//! Helpers: an observer that writes events down, a replay schedule for
//! captured streams, and packet builders for synthetic sessions.

use std::ops::Range;

use crate::mysql::{Direction, Event, MysqlError, QueryRecord, Session, Value};

/// Writes every event down as a line of text, and keeps query records.
#[derive(Debug, Default)]
pub(super) struct Log {
    pub(super) lines: Vec<String>,
    pub(super) queries: Vec<QueryRecord>,
}

pub(super) fn value_text(v: Value<'_>) -> String {
    match v {
        Value::Null => "NULL".to_owned(),
        Value::Bytes(b) => format!("{:?}", String::from_utf8_lossy(b)),
        Value::Int(i) => format!("i{i}"),
        Value::UInt(u) => format!("u{u}"),
        Value::Float(f) => format!("f{f}"),
        Value::Temporal(t) => format!("t{t:?}"),
    }
}

impl crate::mysql::Observer for Log {
    fn event(&mut self, event: Event<'_>) {
        let line = match event {
            Event::Row(row) => {
                let values: Vec<String> = row.values().map(value_text).collect();
                format!(
                    "row len={} trunc={} [{}]",
                    row.len(),
                    row.is_truncated(),
                    values.join(", ")
                )
            }
            Event::Columns { columns, .. } => {
                let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                format!("columns {names:?}")
            }
            Event::Query(record) => {
                self.queries.push(record.clone());
                format!("query {record:?}")
            }
            other => format!("{other:?}"),
        };
        self.lines.push(line);
    }
}

/// Physical packets of a well-formed stream, as byte ranges, with their sequence ids.
fn packets(stream: &[u8]) -> Vec<(Range<usize>, u8)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= stream.len() {
        let len = usize::from(stream[at])
            | usize::from(stream[at + 1]) << 8
            | usize::from(stream[at + 2]) << 16;
        let end = (at + 4 + len).min(stream.len());
        out.push((at..end, stream[at + 3]));
        at = end;
    }
    if at < stream.len() {
        out.push((at..stream.len(), 0));
    }
    out
}

/// The order in which the two captured streams reached the sidecar,
/// reconstructed packet by packet: the server speaks while a command waits
/// for its answer or when its packet continues the exchange's sequence ids.
pub(super) fn schedule(client: &[u8], server: &[u8]) -> Vec<(Direction, Range<usize>)> {
    let cp = packets(client);
    let sp = packets(server);
    let (mut ci, mut si) = (0, 0);
    let mut out = Vec::new();
    let mut session = Session::default();
    let mut next_seq = 0u8;
    while ci < cp.len() || si < sp.len() {
        let phase = session.phase();
        let take_server = if si >= sp.len() {
            false
        } else if ci >= cp.len() || session.greeting().is_none() {
            true
        } else if phase == crate::mysql::Phase::Command {
            session.in_flight() > 0 && !(cp[ci].1 == next_seq && sp[si].1 != next_seq)
        } else {
            sp[si].1 == next_seq && cp[ci].1 != next_seq
        };
        let (dir, range, seq) = if take_server {
            si += 1;
            (Direction::Server, sp[si - 1].0.clone(), sp[si - 1].1)
        } else {
            ci += 1;
            (Direction::Client, cp[ci - 1].0.clone(), cp[ci - 1].1)
        };
        next_seq = seq.wrapping_add(1);
        let _ = match dir {
            Direction::Client => session.feed_client(&client[range.clone()], &mut ()),
            Direction::Server => session.feed_server(&server[range.clone()], &mut ()),
        };
        out.push((dir, range));
    }
    out
}

/// Feeds a schedule, cutting every chunk with `cut` (a list of chunk lengths
/// for a chunk of the given length), and returns the log and the session.
pub(super) fn replay_with(
    client: &[u8],
    server: &[u8],
    schedule: &[(Direction, Range<usize>)],
    mut cut: impl FnMut(usize, usize) -> Vec<usize>,
) -> (Log, Session, Option<MysqlError>) {
    let mut session = Session::default();
    let mut log = Log::default();
    let mut error = None;
    for (i, (dir, range)) in schedule.iter().enumerate() {
        let stream = match dir {
            Direction::Client => client,
            Direction::Server => server,
        };
        let chunk = &stream[range.clone()];
        let mut at = 0;
        for n in cut(i, chunk.len()) {
            let piece = &chunk[at..at + n];
            at += n;
            let r = match dir {
                Direction::Client => session.feed_client(piece, &mut log),
                Direction::Server => session.feed_server(piece, &mut log),
            };
            if let Err(e) = r {
                error.get_or_insert(e);
            }
        }
        assert_eq!(at, chunk.len(), "cut must cover the chunk");
    }
    (log, session, error)
}

/// Feeds each scheduled chunk whole.
pub(super) fn replay(
    client: &[u8],
    server: &[u8],
    schedule: &[(Direction, Range<usize>)],
) -> (Log, Session, Option<MysqlError>) {
    replay_with(client, server, schedule, |_, n| vec![n])
}

// ---- packet builders ----

/// A packet with its header.
pub(super) fn pkt(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 0xFF_FFFF);
    let mut out = vec![len as u8, (len >> 8) as u8, (len >> 16) as u8, seq];
    out.extend_from_slice(payload);
    out
}

pub(super) fn lenenc(n: u64, out: &mut Vec<u8>) {
    match n {
        0..=250 => out.push(n as u8),
        251..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

pub(super) fn lenenc_str(s: &[u8], out: &mut Vec<u8>) {
    lenenc(s.len() as u64, out);
    out.extend_from_slice(s);
}

/// Initial handshake v10 with the given capabilities and plugin.
pub(super) fn greeting(caps: u32, plugin: &str) -> Vec<u8> {
    let mut p = vec![10];
    p.extend_from_slice(b"8.0.36\0");
    p.extend_from_slice(&42u32.to_le_bytes());
    p.extend_from_slice(b"abcdefgh\0");
    p.extend_from_slice(&(caps as u16).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(b"ijklmnopqrst\0");
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    pkt(0, &p)
}

/// `HandshakeResponse41`.
pub(super) fn login(caps: u32, user: &str, db: Option<&str>, attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&caps.to_le_bytes());
    p.extend_from_slice(&(16u32 << 20).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(user.as_bytes());
    p.push(0);
    let auth = [0x5au8; 20];
    if caps & crate::mysql::capabilities::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        lenenc_str(&auth, &mut p);
    } else {
        p.push(20);
        p.extend_from_slice(&auth);
    }
    if caps & crate::mysql::capabilities::CONNECT_WITH_DB != 0 {
        p.extend_from_slice(db.unwrap_or_default().as_bytes());
        p.push(0);
    }
    p.extend_from_slice(b"caching_sha2_password\0");
    if !attrs.is_empty() {
        let mut block = Vec::new();
        for (k, v) in attrs {
            lenenc_str(k.as_bytes(), &mut block);
            lenenc_str(v.as_bytes(), &mut block);
        }
        lenenc_str(&block, &mut p);
    }
    pkt(1, &p)
}

/// OK packet with header `header` (0x00, or 0xFE as an EOF replacement).
pub(super) fn ok(seq: u8, header: u8, affected: u64, insert_id: u64, status: u16) -> Vec<u8> {
    let mut p = vec![header];
    lenenc(affected, &mut p);
    lenenc(insert_id, &mut p);
    p.extend_from_slice(&status.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    pkt(seq, &p)
}

pub(super) fn err(seq: u8, code: u16, state: &str, msg: &str) -> Vec<u8> {
    let mut p = vec![0xff];
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    p.extend_from_slice(state.as_bytes());
    p.extend_from_slice(msg.as_bytes());
    pkt(seq, &p)
}

pub(super) fn eof(seq: u8, status: u16) -> Vec<u8> {
    let mut p = vec![0xfe, 0, 0];
    p.extend_from_slice(&status.to_le_bytes());
    pkt(seq, &p)
}

pub(super) fn column(seq: u8, table: &str, name: &str, ty: u8) -> Vec<u8> {
    let mut p = Vec::new();
    for s in ["def", "shop", table, table, name, name] {
        lenenc_str(s.as_bytes(), &mut p);
    }
    p.push(0x0c);
    p.extend_from_slice(&33u16.to_le_bytes());
    p.extend_from_slice(&255u32.to_le_bytes());
    p.push(ty);
    p.extend_from_slice(&0u16.to_le_bytes());
    p.push(0);
    p.extend_from_slice(&[0, 0]);
    pkt(seq, &p)
}

pub(super) fn text_row(seq: u8, values: &[Option<&str>]) -> Vec<u8> {
    let mut p = Vec::new();
    for v in values {
        match v {
            Some(s) => lenenc_str(s.as_bytes(), &mut p),
            None => p.push(0xfb),
        }
    }
    pkt(seq, &p)
}

pub(super) fn command(code: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![code];
    p.extend_from_slice(body);
    pkt(0, &p)
}
