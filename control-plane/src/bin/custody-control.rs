//! `custody-control`: the control-plane server.

fn main() {}
