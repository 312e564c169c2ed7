use super::*;

fn summary() -> ChainSummary {
    let web = "spiffe://td/ns/shop/sa/web".to_owned();
    let orders = "spiffe://td/ns/shop/sa/orders".to_owned();
    ChainSummary {
        chain_id: "c9ed992411bbb6617d8836583a3122a7".into(),
        coverage: Coverage::Stitched,
        confidence: 0.9,
        initiator: Some(InitiatorView {
            subject: "alice@example.com".into(),
            kind: "human".into(),
            actors: vec!["agent://planner".into(), "agent://router".into()],
            scope: "orders.read".into(),
        }),
        services: vec![web.clone(), orders.clone()],
        tools: vec!["GET /web".into(), "tools/call lookup".into()],
        identities: vec![
            IdentityUse {
                kind: "database_user".into(),
                value: "postgresql/shop/app".into(),
            },
            IdentityUse {
                kind: "workload".into(),
                value: orders,
            },
            IdentityUse {
                kind: "workload".into(),
                value: web,
            },
        ],
        data_classes: vec![ClassCount {
            class: "pii.email".into(),
            count: 300,
        }],
        destinations: vec![DestinationView {
            host: "api.example.net".into(),
            ip: "10.0.0.7".into(),
            port: 443,
            verdict: "block".into(),
            policy: "no-exfil".into(),
            rule: "deny-pii".into(),
        }],
        joined_chains: vec!["33b2c40b7a7d5232863d6c7979a9a78c".into(), "ABC".into()],
        hop_count: 5,
        first_unix_nanos: 1_795_847_291_908_392_123,
        last_unix_nanos: u64::MAX,
    }
}

fn shape() -> Vec<NodeShape> {
    vec![
        (
            "e9fb109b840134ffecb34fbeea0aee04".into(),
            -1,
            0,
            Evidence::Root,
            1.0,
        ),
        ("986e6ecc".into(), 0, 1, Evidence::SpanParent, 1.0),
        ("not-hex-Event".into(), 1, 2, Evidence::TimeContainment, 0.9),
        (String::new(), 1, 2, Evidence::Gap, 0.3),
        ("0".into(), 0, 1, Evidence::FlowContainment, 0.85),
    ]
}

#[test]
fn summaries_and_shapes_come_back_as_they_were_stored() {
    let s = summary();
    assert_eq!(decode_summary(&encode_summary(&s)), Ok(s));
    let bare = ChainSummary {
        initiator: None,
        services: vec![],
        tools: vec![],
        identities: vec![],
        data_classes: vec![],
        destinations: vec![],
        joined_chains: vec![],
        chain_id: String::new(),
        ..summary()
    };
    assert_eq!(decode_summary(&encode_summary(&bare)), Ok(bare));
    let shape = shape();
    assert_eq!(decode_shape(&encode_shape(&shape)), Ok(shape));
    assert_eq!(decode_shape(&encode_shape(&[])), Ok(vec![]));
}

#[test]
fn records_are_far_smaller_than_json() {
    let s = summary();
    let compact = encode_summary(&s);
    let json = serde_json::to_vec(&s).unwrap();
    assert!(is_compact(&compact) && !is_compact(&json));
    // Ids packed to half, repeated workload URIs stored once, no field names.
    assert!(
        compact.len() * 2 < json.len(),
        "{} vs {}",
        compact.len(),
        json.len()
    );
    let shape = shape();
    assert!(encode_shape(&shape).len() * 2 < serde_json::to_vec(&shape).unwrap().len());
}

#[test]
fn every_cut_short_record_is_an_error() {
    for record in [encode_summary(&summary()), encode_shape(&shape())] {
        for end in 0..record.len() {
            let prefix = &record[..end];
            assert!(
                decode_summary(prefix).is_err(),
                "summary prefix of {end} bytes"
            );
            assert!(decode_shape(prefix).is_err(), "shape prefix of {end} bytes");
        }
    }
}

#[test]
fn any_changed_byte_decodes_or_is_refused_without_panicking() {
    let records = [encode_summary(&summary()), encode_shape(&shape())];
    for record in &records {
        for i in 0..record.len() {
            for value in [0x00, 0x01, 0x02, 0x03, 0x7f, 0x80, 0xfe, 0xff] {
                let mut changed = record.clone();
                changed[i] = value;
                let _ = decode_summary(&changed);
                let _ = decode_shape(&changed);
            }
        }
    }
    let mut longer = records[0].clone();
    longer.push(0);
    assert_eq!(
        decode_summary(&longer),
        Err(CompactError("bytes left after the record"))
    );
}

#[test]
fn hostile_headers_are_refused_before_allocating() {
    // A count of 2^62 strings, a string of 2^61 bytes, an 11-byte varint,
    // a back-reference to nothing, and JSON in place of a record.
    let huge_count = [FORMAT, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
    assert_eq!(
        decode_shape(&huge_count),
        Err(CompactError("count larger than the record"))
    );
    let huge_string = [FORMAT, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
    assert_eq!(
        decode_summary(&huge_string),
        Err(CompactError("record cut short"))
    );
    // The same length as packed hex (found by `cargo fuzz`: the string
    // was allocated before its length was checked).
    let huge_hex = [FORMAT, 0x8a, 0xb2, 0x8a, 0xd3, 0x8a, 0xd3, 0x5b];
    assert_eq!(
        decode_summary(&huge_hex),
        Err(CompactError("record cut short"))
    );
    let long_varint = [
        FORMAT, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
    ];
    assert!(decode_shape(&long_varint).is_err());
    assert_eq!(
        decode_summary(&[FORMAT, 0x05]),
        Err(CompactError("back-reference to no earlier string"))
    );
    assert_eq!(
        decode_summary(b"{\"chain_id\":\"x\"}"),
        Err(CompactError("unknown record format"))
    );
    assert_eq!(decode_shape(&[]), Err(CompactError("empty record")));
}

/// A small deterministic generator: the same records every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Strings that exercise every form: empty, packable hex of several
    /// lengths, odd-length and uppercase hex (raw), multi-byte UTF-8, and
    /// repeats of earlier ones (back-references).
    fn string(&mut self, pool: &mut Vec<String>) -> String {
        let s = match self.below(8) {
            0 => String::new(),
            1 | 2 => {
                let n = 2 * (1 + self.below(20));
                (0..n)
                    .map(|_| char::from(b"0123456789abcdef"[self.below(16)]))
                    .collect()
            }
            3 => format!("{:X}", self.next()),
            4 => format!("{:x}", self.next() >> 4),
            5 => [
                "spiffe://td/ns/shop/sa/web",
                "Grüße ✓",
                "pii.email",
                "GET /a",
            ][self.below(4)]
            .to_owned(),
            _ if !pool.is_empty() => pool[self.below(pool.len())].clone(),
            _ => "x".repeat(self.below(300)),
        };
        pool.push(s.clone());
        s
    }

    fn strings(&mut self, pool: &mut Vec<String>) -> Vec<String> {
        (0..self.below(5)).map(|_| self.string(pool)).collect()
    }
}

#[test]
fn generated_records_come_back_as_they_were_stored() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3_000 {
        let mut pool = Vec::new();
        let p = &mut pool;
        let summary = ChainSummary {
            chain_id: rng.string(p),
            coverage: Coverage::ALL[rng.below(4)],
            confidence: rng.below(1_001) as f32 / 1_000.0,
            initiator: (rng.below(3) > 0).then(|| InitiatorView {
                subject: rng.string(p),
                kind: rng.string(p),
                actors: rng.strings(p),
                scope: rng.string(p),
            }),
            services: rng.strings(p),
            tools: rng.strings(p),
            identities: (0..rng.below(4))
                .map(|_| IdentityUse {
                    kind: rng.string(p),
                    value: rng.string(p),
                })
                .collect(),
            data_classes: (0..rng.below(3))
                .map(|_| ClassCount {
                    class: rng.string(p),
                    count: rng.next() >> rng.below(64),
                })
                .collect(),
            destinations: (0..rng.below(3))
                .map(|_| DestinationView {
                    host: rng.string(p),
                    ip: rng.string(p),
                    port: rng.next() as u32,
                    verdict: rng.string(p),
                    policy: rng.string(p),
                    rule: rng.string(p),
                })
                .collect(),
            joined_chains: rng.strings(p),
            hop_count: rng.below(1 << 20),
            first_unix_nanos: rng.next(),
            last_unix_nanos: rng.next(),
        };
        assert_eq!(decode_summary(&encode_summary(&summary)).unwrap(), summary);

        let shape: Vec<NodeShape> = (0..rng.below(12))
            .map(|i| {
                (
                    rng.string(p),
                    i as i64 - 1,
                    rng.next() as u32,
                    EVIDENCE[rng.below(EVIDENCE.len())],
                    rng.below(101) as f32 / 100.0,
                )
            })
            .collect();
        assert_eq!(decode_shape(&encode_shape(&shape)).unwrap(), shape);
    }
}

#[test]
fn long_records_refer_back_past_the_first_strings() {
    // Thousands of ids, each used twice, and a few strings repeated from
    // the start: back-references found by hash once past the scan limit.
    let ids: Vec<String> = (0..5_000).map(|i| format!("{:032x}", i * 7_919)).collect();
    let shape: Vec<NodeShape> = ids
        .iter()
        .chain(&ids)
        .enumerate()
        .map(|(i, id)| (id.clone(), i as i64 - 1, 3, Evidence::SpanParent, 1.0))
        .collect();
    let record = encode_shape(&shape);
    assert_eq!(decode_shape(&record).unwrap(), shape);
    // The repeats cost a back-reference of a few bytes, not 17 bytes of id.
    assert!(
        record.len() < 5_000 * (17 + 8) + 5_000 * (3 + 8),
        "{}",
        record.len()
    );
    let mut s = summary();
    s.tools = (0..100).map(|i| format!("GET /r{}", i % 40)).collect();
    s.joined_chains = ids[..50].to_vec();
    s.joined_chains.push(s.chain_id.clone());
    assert_eq!(decode_summary(&encode_summary(&s)).unwrap(), s);
}

#[test]
fn a_small_record_cannot_decode_to_more_than_16_mib() {
    // 20,000 back-references to one 1,000-byte string: about 20 KB of
    // record standing for 20 MB of strings.
    let long = "a".repeat(1_000);
    let mut s = summary();
    s.services = vec![long.clone(); 20_000];
    let record = encode_summary(&s);
    assert!(record.len() < 64 << 10, "{}", record.len());
    assert_eq!(
        decode_summary(&record),
        Err(CompactError("record expands past 16 MiB"))
    );
    // Within the bound, the same form decodes.
    s.services = vec![long; 10_000];
    assert_eq!(decode_summary(&encode_summary(&s)).unwrap(), s);
}
