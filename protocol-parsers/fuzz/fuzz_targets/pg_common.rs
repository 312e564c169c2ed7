//! Shared driver: feeds both directions through a `Connection`, whole and
//! split, and checks that both runs observe the same thing.

use custody_protocols::pg::{Connection, Limits, SessionLimits};

/// A valid `StartupMessage` so that fuzzed bytes reach the typed messages.
pub const STARTUP: &[u8] = b"\x00\x00\x00\x15\x00\x03\x00\x00user\0fuzz\0\0";

fn transcript(
    client: &[u8],
    server: &[u8],
    client_cut: usize,
    server_cut: usize,
    small: bool,
) -> Vec<String> {
    let limits = if small {
        Limits {
            max_message_len: 1 << 16,
            max_buffered_len: 16,
        }
    } else {
        Limits::default()
    };
    let session = SessionLimits {
        max_statements: 4,
        max_portals: 4,
        max_pending: 16,
        max_sql_bytes: 64,
        max_columns: 4,
        max_params: 4,
    };
    let mut conn = Connection::new(limits, session);
    let mut out = Vec::new();
    let (c1, c2) = client.split_at(client_cut.min(client.len()));
    let (s1, s2) = server.split_at(server_cut.min(server.len()));
    let mut failed = (false, false);
    for c in [c1, c2] {
        if let Err(e) = conn.client_data(c, |m| out.push(format!("c {m:?}"))) {
            if !std::mem::replace(&mut failed.0, true) {
                out.push(format!("c error {e}"));
            }
        }
    }
    for s in [s1, s2] {
        if let Err(e) = conn.server_data(s, |m, ev| out.push(format!("s {m:?} {ev:?}"))) {
            if !std::mem::replace(&mut failed.1, true) {
                out.push(format!("s error {e}"));
            }
        }
    }
    let s = conn.session();
    out.push(format!(
        "{:?} {:?} {} {} {} {:?}",
        s.user(),
        s.application_name(),
        s.statement_count(),
        s.portal_count(),
        s.pending_count(),
        s.stats()
    ));
    assert!(s.statement_count() <= 5 && s.portal_count() <= 5 && s.pending_count() <= 16);
    out
}

/// Decodes whole and split; panics if the two differ.
pub fn check(client: &[u8], server: &[u8], client_cut: usize, server_cut: usize, small: bool) {
    let whole = transcript(client, server, usize::MAX, usize::MAX, small);
    let split = transcript(client, server, client_cut, server_cut, small);
    assert_eq!(whole, split);
}
