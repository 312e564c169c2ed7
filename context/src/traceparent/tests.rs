use super::*;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn check(input: &str, expected: Result<&str, TraceParentError>) {
    let got = TraceParent::parse(input).map(|tp| tp.to_string());
    assert_eq!(got, expected.map(str::to_owned), "input {input:?}");
}

#[test]
fn parses_and_formats_the_spec_example() {
    let tp = TraceParent::parse(VALID).unwrap();
    assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
    assert!(tp.sampled());
    check(VALID, Ok(VALID));
    check(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        Ok("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
    );
}

#[test]
fn refuses_invalid_headers() {
    use TraceParentError::*;
    check(
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        Err(ZeroTraceId),
    );
    check(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        Err(ZeroSpanId),
    );
    check(
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Err(BadVersion),
    );
    check(
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        Err(NotHex),
    );
    check(
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Err(NotHex),
    );
    check(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        Err(Length),
    );
    check(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        Err(Length),
    );
    check(
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Err(Separator),
    );
    check("", Err(Length));
}

#[test]
fn future_versions_keep_the_known_fields() {
    check(
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        Ok(VALID),
    );
    check(
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        Err(TraceParentError::Length),
    );
}

#[test]
fn every_prefix_of_a_valid_header_is_refused_not_panicking() {
    for end in 0..VALID.len() {
        assert!(TraceParent::parse(&VALID[..end]).is_err(), "prefix {end}");
    }
}

#[test]
fn new_span_keeps_the_trace_and_changes_the_span() {
    let root = TraceParent::new_root();
    let child = root.new_span();
    assert_eq!(child.trace_id, root.trace_id);
    assert_ne!(child.parent_id, root.parent_id);
    assert_eq!(child.flags, root.flags);
    assert_eq!(TraceParent::parse(&child.to_string()).unwrap(), child);
}

#[test]
fn ids_parse_alone_and_serialize_as_hex() {
    let id: TraceId = "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap();
    assert_eq!(
        serde_json::to_string(&id).unwrap(),
        "\"4bf92f3577b34da6a3ce929d0e0e4736\""
    );
    assert_eq!(
        "00000000000000000000000000000000".parse::<TraceId>(),
        Err(TraceParentError::ZeroTraceId)
    );
    assert!(serde_json::from_str::<TraceId>("\"abc\"").is_err());
}
