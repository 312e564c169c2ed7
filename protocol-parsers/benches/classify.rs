//! Classification throughput.
fn main() {}
