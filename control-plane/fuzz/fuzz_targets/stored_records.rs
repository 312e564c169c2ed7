//! Arbitrary bytes as a stored chain summary and tree shape: decoding never
//! panics, and what decodes round-trips through its encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| custody_control::store::fuzzing::stored_records(data));
