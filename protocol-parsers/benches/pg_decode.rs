//! PostgreSQL decode throughput (placeholder until the real bench lands).

fn main() {}
