//! Server-to-client stream after a valid startup and some fuzzed client
//! requests (so responses are paired with requests), split at arbitrary points.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "pg_common.rs"]
mod pg_common;

fuzz_target!(|data: &[u8]| {
    let [flags, client_len, cut, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*client_len).min(rest.len());
    let (requests, server) = rest.split_at(n);
    let client = [pg_common::STARTUP, requests].concat();
    let cut = usize::from(*cut) * server.len() / 256;
    pg_common::check(&client, server, client.len() / 2, cut, flags & 1 == 1);
});
