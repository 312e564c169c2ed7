//! Client bytes (handshake response, commands) in arbitrary pieces, with
//! canned server answers in between, drive a MySQL session.
#![no_main]

use custody_protocols::mysql::{Event, Session};
use libfuzzer_sys::fuzz_target;

/// A MariaDB 10.11 greeting (from `testdata/mysql_cli.server.bin`).
const GREETING: &[u8] = include_bytes!("../../testdata/mysql_cli.server.bin");

const ANSWERS: [&[u8]; 6] = [
    &[7, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0],                       // OK
    &[2, 0, 0, 2, 0x01, 0x04],                                // AuthMoreData: full auth
    &[5, 0, 0, 1, 0xfe, 0, 0, 2, 0],                          // EOF
    &[12, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0],       // PREPARE_OK id 1, 1 column, 1 param
    &[11, 0, 0, 1, 0xfb, b'/', b't', b'm', b'p', b'/', b'x', b'.', b'c', b's', b'v'], // LOCAL INFILE
    &[1, 0, 0, 1, 1],                                         // column count 1
];

fuzz_target!(|data: &[u8]| {
    let mut session = Session::default();
    let mut events = 0usize;
    let mut obs = |e: Event<'_>| {
        if let Event::Row(row) = e {
            events += row.values().count();
        }
        events += 1;
    };
    // The greeting is the first packet of the capture.
    let greeting_len = 4 + (usize::from(GREETING[0]) | usize::from(GREETING[1]) << 8);
    let _ = session.feed_server(&GREETING[..greeting_len.min(GREETING.len())], &mut obs);
    let mut rest = data;
    while let Some((&ctl, tail)) = rest.split_first() {
        let n = usize::from(ctl & 0x3f).min(tail.len());
        let (piece, tail) = tail.split_at(n);
        let _ = session.feed_client(piece, &mut obs);
        if ctl & 0x80 != 0 {
            let answer = ANSWERS[usize::from(ctl >> 4 & 0x7) % ANSWERS.len()];
            let _ = session.feed_server(answer, &mut obs);
        }
        rest = tail;
    }
});
