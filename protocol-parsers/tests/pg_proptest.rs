//! Property tests: arbitrary bytes never panic the PostgreSQL decoders or the
//! session, and any split of the input gives the same result as the whole.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use custody_protocols::pg::{Connection, Limits, SessionLimits};
use proptest::prelude::*;

/// Feeds `client` then `server`, each cut at the given points; returns a
/// transcript of everything observable.
fn run(client: &[u8], server: &[u8], cuts: &[usize], limits: Limits) -> Vec<String> {
    let mut conn = Connection::new(limits, SessionLimits::default());
    let mut out = Vec::new();
    let pieces = |data: &[u8]| {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        points
            .windows(2)
            .map(|w| data[w[0]..w[1]].to_vec())
            .collect::<Vec<_>>()
    };
    for p in pieces(client) {
        if let Err(e) = conn.client_data(&p, |m| out.push(format!("c {m:?}"))) {
            out.push(format!("c error {e}"));
        }
    }
    for p in pieces(server) {
        if let Err(e) = conn.server_data(&p, |m, ev| out.push(format!("s {m:?} {ev:?}"))) {
            out.push(format!("s error {e}"));
        }
    }
    // Errors after the first are all "decoder failed earlier": keep the first.
    let mut seen = (false, false);
    out.retain(|l| {
        let flag = if l.starts_with("c error") {
            &mut seen.0
        } else if l.starts_with("s error") {
            &mut seen.1
        } else {
            return true;
        };
        !std::mem::replace(flag, true)
    });
    out
}

/// A tagged message with a correct length.
fn message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(b"QPBDESHCdcfpFXRKZTDICEN123ntsGHWAvVz".to_vec()),
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(tag, body)| {
            let mut v = vec![tag];
            v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            v.extend_from_slice(&body);
            v
        })
}

fn startup() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\0u\0\0";
    let mut v = (body.len() as u32 + 4).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(
        client in prop::collection::vec(any::<u8>(), 0..256),
        server in prop::collection::vec(any::<u8>(), 0..256),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let whole = run(&client, &server, &[], Limits::default());
        prop_assert_eq!(run(&client, &server, &cuts, Limits::default()), whole);
    }

    #[test]
    fn framed_garbage_splits_agree(
        client in prop::collection::vec(message(), 0..16),
        server in prop::collection::vec(message(), 0..16),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        small in any::<bool>(),
    ) {
        let client = [startup(), client.concat()].concat();
        let server = server.concat();
        let limits = if small {
            Limits { max_message_len: 1 << 20, max_buffered_len: 8 }
        } else {
            Limits::default()
        };
        let whole = run(&client, &server, &[], limits);
        // Valid framing never fails.
        prop_assert!(whole.iter().all(|l| !l.contains(" error ")), "{:?}", whole);
        prop_assert_eq!(run(&client, &server, &cuts, limits), whole);
    }
}
