//! Client-to-server stream: arbitrary bytes (optionally after a valid
//! startup packet), split at an arbitrary point; the session is driven too.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "pg_common.rs"]
mod pg_common;

fuzz_target!(|data: &[u8]| {
    let [flags, cut, rest @ ..] = data else {
        return;
    };
    let client = if flags & 1 == 1 {
        [pg_common::STARTUP, rest].concat()
    } else {
        rest.to_vec()
    };
    let cut = usize::from(*cut) * client.len() / 256;
    pg_common::check(&client, &[], cut, 0, flags & 2 == 2);
});
