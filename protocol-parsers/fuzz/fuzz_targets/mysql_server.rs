//! Server bytes (greeting, auth, responses, rows) in arbitrary pieces, with
//! canned client commands in between, drive a MySQL session.
#![no_main]

use custody_protocols::mysql::{Event, Session, capabilities as cap};
use libfuzzer_sys::fuzz_target;

/// A MariaDB 10.11 handshake response (from `testdata/mysql_cli.client.bin`).
const LOGIN: &[u8] = include_bytes!("../../testdata/mysql_cli.client.bin");

const COMMANDS: [&[u8]; 8] = [
    b"\x09\x00\x00\x00\x03SELECT 1",                               // COM_QUERY
    b"\x09\x00\x00\x00\x16SELECT ?",                               // COM_STMT_PREPARE
    &[10, 0, 0, 0, 0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0],               // COM_STMT_EXECUTE 1
    &[9, 0, 0, 0, 0x1c, 1, 0, 0, 0, 5, 0, 0, 0],                   // COM_STMT_FETCH 1
    b"\x03\x00\x00\x00\x04t\x00",                                  // COM_FIELD_LIST
    b"\x0a\x00\x00\x00\x11bob\x00\x00db\x00\x21\x00",              // COM_CHANGE_USER
    &[1, 0, 0, 0, 0x0e],                                           // COM_PING
    &[5, 0, 0, 0, 0x19, 1, 0, 0, 0],                               // COM_STMT_CLOSE 1
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut session = Session::default();
    let mut values = 0usize;
    let mut obs = |e: Event<'_>| {
        if let Event::Row(row) = e {
            values += row.values().count();
        }
    };
    if mode & 1 == 1 {
        // Start in the command phase: a greeting with DEPRECATE_EOF or not, the login, OK.
        let caps = cap::PROTOCOL_41
            | cap::SECURE_CONNECTION
            | cap::PLUGIN_AUTH
            | cap::CONNECT_ATTRS
            | cap::CONNECT_WITH_DB
            | cap::MULTI_RESULTS
            | cap::SESSION_TRACK
            | if mode & 2 == 2 { cap::DEPRECATE_EOF } else { 0 };
        let mut g = vec![10];
        g.extend_from_slice(b"8.0.36\0\x01\x00\x00\x00abcdefgh\0");
        g.extend_from_slice(&(caps as u16).to_le_bytes());
        g.extend_from_slice(&[45, 2, 0]);
        g.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        g.extend_from_slice(&[21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        g.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        let mut greeting = vec![g.len() as u8, 0, 0, 0];
        greeting.extend_from_slice(&g);
        let _ = session.feed_server(&greeting, &mut obs);
        let login_len = 4 + (usize::from(LOGIN[0]) | usize::from(LOGIN[1]) << 8);
        let mut login = LOGIN[..login_len.min(LOGIN.len())].to_vec();
        if let Some(c) = login.get_mut(4..8) {
            let client_caps = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) | (caps & cap::DEPRECATE_EOF);
            c.copy_from_slice(&client_caps.to_le_bytes());
        }
        let _ = session.feed_client(&login, &mut obs);
        let _ = session.feed_server(&[7, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0], &mut obs);
    }
    let mut rest = data;
    while let Some((&ctl, tail)) = rest.split_first() {
        if ctl & 0x80 != 0 {
            let _ = session.feed_client(COMMANDS[usize::from(ctl & 0x7)], &mut obs);
        }
        let n = usize::from(ctl & 0x78).min(tail.len()) + 1;
        let n = n.min(tail.len());
        let (piece, tail) = tail.split_at(n);
        let _ = session.feed_server(piece, &mut obs);
        rest = tail;
    }
});
