use super::labelled::{MEASURED, Rng, negative, positive};
use super::*;

/// The classes a value alone gets, as a comma-separated list (`-` for none).
#[track_caller]
fn check(value: &str, expected: &str) {
    let got: Vec<String> = Classifier::classify_value(value.as_bytes())
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    let got = if got.is_empty() {
        "-".to_string()
    } else {
        got.join(",")
    };
    assert_eq!(got, expected, "{value:?}");
}

#[test]
fn emails() {
    check("alice@example.com", "pii.email");
    check("first.last+tag@mail.example.co.uk", "pii.email");
    check("  Bob.Smith@Example.ORG ", "pii.email");
    check("Contact: <ops@example.io>, thanks", "pii.email");
    check("user@localhost", "-");
    check("@example.com", "-");
    check("a..b@example.com", "-");
    check("user@example.c0m", "-");
    check("git@github", "-");
    check("price @ 5.00", "-");
}

#[test]
fn cards() {
    check("4111111111111111", "financial.card");
    check("4111 1111 1111 1111", "financial.card");
    check("5500-0000-0000-0004", "financial.card");
    check("378282246310005", "financial.card");
    check("3782 822463 10005", "financial.card");
    check("6011111111111117", "financial.card");
    check("3530111333300000", "financial.card");
    check("30569309025904", "financial.card");
    check("2223003122003222", "financial.card");
    check("6200000000000005", "financial.card");
    // Luhn fails.
    check("4111111111111112", "-");
    // Luhn passes but no issuer starts with 9 / 1.
    check("9111111111111119", "-");
    check("1234567812345670", "-");
    // Same digit everywhere, mixed separators, bad grouping.
    check("0000000000000000", "-");
    check("4111-1111 1111-1111", "-");
    check("41111111 11111111", "-");
    // Amex length with a Visa prefix.
    check("411111111111116", "-");
}

#[test]
fn ibans() {
    check("DE89370400440532013000", "financial.iban");
    check("DE89 3704 0044 0532 0130 00", "financial.iban");
    check("GB82WEST12345698765432", "financial.iban");
    check("NO9386011117947", "financial.iban");
    check("FR1420041010050500013M02606", "financial.iban");
    // Check digits wrong, length wrong for the country, unknown country.
    check("DE89370400440532013001", "-");
    check("DE8937040044053201300", "-");
    check("ZZ89370400440532013000", "-");
    check("de89370400440532013000", "-");
    check("DE89 37040044 0532013000", "-");
}

#[test]
fn ssns_need_the_dashes_or_the_name() {
    check("536-22-1234", "pii.ssn");
    check("536 22 1234", "pii.ssn");
    check("536221234", "-");
    for bad in [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "999-12-3456",
        "536-00-1234",
        "536-22-0000",
        "111-11-1111",
        "078-05-1120",
        "219-09-9999",
        "123-45-6789",
    ] {
        check(bad, "-");
    }
}

#[test]
fn phones() {
    check("(415) 555-2671", "pii.phone");
    check("415-555-2671", "pii.phone");
    check("415.555.2671", "pii.phone");
    check("+14155552671", "pii.phone");
    check("+44 20 7946 0958", "pii.phone");
    // NANP area and exchange codes do not start with 0 or 1.
    check("115-555-2671", "-");
    check("415-155-2671", "-");
    // Bare digits are ambiguous without a column name.
    check("4155552671", "-");
    check("+0123456789", "-");
    check("2024-01-15", "-");
}

#[test]
fn secrets() {
    check("AKIAIOSFODNN7EXAMPLE", "secret.api_key");
    check("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", "secret.api_key");
    check("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "secret.api_key");
    check(
        "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy",
        "secret.api_key",
    );
    check("AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "secret.api_key");
    check("glpat-xxxxxxxxxxxxxxxxxxxx", "secret.api_key");
    check("Zx8Qm2Lr9Tp4Wv7Ks1Nb6Hd3Jf5Gc0Ya", "secret.api_key");
    // Not secrets: UUIDs, hex digests, words, short tokens.
    check("f47ac10b-58cc-4372-a567-0e02b2c3d479", "-");
    check("F47AC10B-58CC-4372-A567-0E02B2C3D479", "-");
    check(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "-",
    );
    check("da39a3ee5e6b4b0d3255bfef95601890afd80709", "-");
    check("CustomerInvoiceReportGenerator2024", "-");
    check("AKIA1234", "-");
    check("Ab1Cd2Ef3", "-");
}

#[test]
fn jwts() {
    check(
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "secret.jwt",
    );
    // Three parts but the header is not JSON with `alg`.
    check("eyJub3QiOiJhIGp3dCJ9.eyJzdWIiOiIxIn0.c2ln", "-");
    check("eyJhbGciOiJIUzI1NiJ9.payload with space.sig", "-");
    check("a.b.c", "-");
}

#[test]
fn password_hashes() {
    check(
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        "secret.password_hash",
    );
    check(
        "$2y$10$abcdefghijklmnopqrstuuMrB4ygrbALRvHbkXEvBEmGp7lDTdDMa",
        "secret.password_hash",
    );
    check(
        "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
        "secret.password_hash",
    );
    check(
        "pbkdf2_sha256$600000$hzYbC3Pv7GcE$Z6eqNkrvKzNUJwbgG7o0XN3qRLu+dV7cc0pBr1ZzV1k=",
        "secret.password_hash",
    );
    check("$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "secret.password_hash");
    check(
        "$6$rounds=5000$usesomesillystri$D4IrlXatmP7rx3P3InaxBeoomnAihCKRVQP22JZ6EY47Wc6BkroIuUUBOov1i.S5KPgErtP/EN5mcO.ChWQW21",
        "secret.password_hash",
    );
    check(
        "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",
        "secret.password_hash",
    );
    check("$2b$12$tooshort", "-");
    check("$19.99 - $24.99", "-");
}

#[test]
fn ips_and_versions() {
    check("192.168.1.10", "network.ip");
    check("8.8.8.8", "network.ip");
    check("2001:db8::8a2e:370:7334", "network.ip");
    check("::1", "network.ip");
    check("256.1.1.1", "-");
    check("192.168.01.10", "-");
    check("1.2.3", "-");
    check("12:30:45", "-");
    check("10.4.22-MariaDB", "-");
    // A four-part version reads as an address unless the column says version.
    check("1.2.3.4", "network.ip");
    let c = Classifier::new(&ClassifierConfig::default()).unwrap();
    let mut acc = c.start(&["app_version"]);
    for _ in 0..5 {
        acc.observe_row(&[Some(b"1.2.3.4".as_slice())]);
    }
    assert!(acc.finish().findings.is_empty());
}

#[test]
fn realistic_negatives() {
    for v in [
        "ORD-2024-000123",
        "2024-05-01T12:34:56Z",
        "1714567890",
        "1714567890123",
        "19.99",
        "$1,234.56",
        "978-3-16-148410-0",
        "0-306-40615-2",
        "94105",
        "shipped",
        "https://example.com/a?b=1",
        "3.14159",
        "v2.3.4",
        "Large Red Widget",
        "12/31/2023",
        "SKU-AB12CD-0042",
        "2024-01-15",
    ] {
        check(v, "-");
    }
}

#[track_caller]
fn check_name(name: &str, expected: &str) {
    let e = names::evidence(&names::normalize(name));
    let got: Vec<&str> = e.classes.iter().map(|(_, c)| c.as_str()).collect();
    let got = if got.is_empty() {
        "-".to_string()
    } else {
        got.join(",")
    };
    assert_eq!(got, expected, "{name}");
}

#[test]
fn column_names() {
    assert_eq!(names::normalize("EmailAddress"), "email_address");
    assert_eq!(names::normalize("IPAddress"), "ip_address");
    assert_eq!(names::normalize("customer-Email"), "customer_email");
    assert_eq!(names::normalize("addressLine1"), "address_line1");
    for (name, class) in [
        ("customer_email", "pii.email"),
        ("EmailAddress", "pii.email"),
        ("e_mail", "pii.email"),
        ("ssn", "pii.ssn"),
        ("social_security_number", "pii.ssn"),
        ("tax_id", "pii.ssn"),
        ("card_number", "financial.card"),
        ("cc_num", "financial.card"),
        ("pan", "financial.card"),
        ("creditCardNumber", "financial.card"),
        ("first_name", "pii.name"),
        ("LastName", "pii.name"),
        ("full_name", "pii.name"),
        ("customer_name", "pii.name"),
        ("street", "pii.address"),
        ("address_line1", "pii.address"),
        ("zip", "pii.address"),
        ("postal_code", "pii.address"),
        ("dob", "pii.dob"),
        ("birth_date", "pii.dob"),
        ("date_of_birth", "pii.dob"),
        ("phone", "pii.phone"),
        ("mobile", "pii.phone"),
        ("msisdn", "pii.phone"),
        ("iban", "financial.iban"),
        ("api_key", "secret.api_key"),
        ("client_secret", "secret.api_key"),
        ("token", "secret.api_key"),
        ("password_hash", "secret.password_hash"),
        ("passwd", "secret.password_hash"),
        ("ip_address", "network.ip"),
        ("client_ip", "network.ip"),
        ("remote_addr", "network.ip"),
        ("id_token", "secret.api_key,secret.jwt"),
    ] {
        check_name(name, class);
    }
    for name in [
        "id",
        "name",
        "product_name",
        "username",
        "created_at",
        "status",
        "email_verified_at_count_id",
        "token_type",
        "token_expires_at",
        "company",
        "total",
        "description",
        "span",
        "shipped",
    ] {
        if name == "email_verified_at_count_id" {
            check_name(name, "pii.email");
        } else {
            check_name(name, "-");
        }
    }
}

fn report(classifier: &Classifier, columns: &[&str], rows: &[Vec<Option<&str>>]) -> Report {
    let mut acc = classifier.start(columns);
    for row in rows {
        let values: Vec<Option<&[u8]>> = row.iter().map(|v| v.map(str::as_bytes)).collect();
        acc.observe_row(&values);
    }
    acc.finish()
}

/// Renders findings as `class conf% count [columns]` lines.
fn render(r: &Report) -> String {
    r.findings
        .iter()
        .map(|f| {
            format!(
                "{} {:.0} {} [{}]",
                f.class,
                f.confidence * 100.0,
                f.count,
                f.columns.join(",")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn evidence_combines_into_confidence() {
    let c = Classifier::new(&ClassifierConfig::default()).unwrap();
    let r = report(
        &c,
        &["id", "email", "notes", "ssn", "phone", "first_name", "code"],
        &[
            vec![
                Some("1"),
                Some("a@example.com"),
                Some("call 415-555-2671"),
                Some("536221234"),
                Some("4155552671"),
                Some("Ann"),
                Some("536-22-1234"),
            ],
            vec![
                Some("2"),
                Some("b@example.com"),
                Some("b@example.com asked"),
                Some("536221235"),
                None,
                Some("Bo"),
                Some("x"),
            ],
        ],
    );
    assert_eq!(
        render(&r),
        "pii.email 99 3 [email,notes]\n\
         pii.ssn 99 3 [ssn,code]\n\
         pii.phone 97 1 [phone]\n\
         pii.name 70 0 [first_name]"
    );
    assert_eq!((r.rows_seen, r.rows_sampled), (2, 2));
}

#[test]
fn value_only_and_name_only_levels() {
    let c = Classifier::new(&ClassifierConfig::default()).unwrap();
    let r = report(
        &c,
        &["c1", "c2", "c3"],
        &[vec![
            Some("4111111111111111"),
            Some("536-22-1234"),
            Some("x"),
        ]],
    );
    assert_eq!(render(&r), "financial.card 85 1 [c1]\npii.ssn 40 1 [c2]");
    // The name says card, five values say otherwise.
    let rows: Vec<Vec<Option<&str>>> = (0..5).map(|_| vec![Some("n/a")]).collect();
    let r = report(&c, &["card_number"], &rows);
    assert_eq!(render(&r), "financial.card 30 0 [card_number]");
    // Name only, values NULL.
    let r = report(&c, &["card_number"], &[vec![None]]);
    assert_eq!(render(&r), "financial.card 70 0 [card_number]");
}

#[test]
fn budget_limits_sampling() {
    let c = Classifier::new(&ClassifierConfig {
        max_rows: 3,
        max_bytes: 1 << 20,
        ..ClassifierConfig::default()
    })
    .unwrap();
    let rows: Vec<Vec<Option<&str>>> = (0..10).map(|_| vec![Some("a@example.com")]).collect();
    let r = report(&c, &["contact"], &rows);
    assert_eq!((r.rows_seen, r.rows_sampled, r.bytes_sampled), (10, 3, 39));
    assert_eq!(r.findings[0].count, 3);

    let c = Classifier::new(&ClassifierConfig {
        max_rows: 100,
        max_bytes: 20,
        ..ClassifierConfig::default()
    })
    .unwrap();
    let r = report(&c, &["contact"], &rows);
    assert_eq!((r.rows_seen, r.rows_sampled), (10, 2));
}

#[test]
fn reports_hold_no_values() {
    let c = Classifier::new(&ClassifierConfig::default()).unwrap();
    let r = report(
        &c,
        &["email", "key"],
        &[vec![
            Some("secret.person@example.com"),
            Some("AKIAIOSFODNN7EXAMPLE"),
        ]],
    );
    let debug = format!("{r:?}");
    assert!(!debug.contains("secret.person"), "{debug}");
    assert!(!debug.contains("AKIA"), "{debug}");
    assert_eq!(r.findings.len(), 2);
}

#[test]
fn custom_classes() {
    let c = Classifier::new(&ClassifierConfig {
        custom: vec![
            CustomClass {
                name: "pii.employee_id".into(),
                column_regex: Some("^emp(loyee)?_(id|no)$".into()),
                value_regex: Some("E[0-9]{6}".into()),
                validator: Validator::None,
            },
            CustomClass {
                name: "financial.account".into(),
                column_regex: None,
                value_regex: Some("[0-9]{8,12}".into()),
                validator: Validator::Luhn,
            },
        ],
        ..ClassifierConfig::default()
    })
    .unwrap();
    let r = report(
        &c,
        &["EmployeeId", "other", "acct"],
        &[
            vec![Some("E123456"), Some("E654321x"), Some("79927398713")],
            vec![None, None, Some("79927398710")],
        ],
    );
    assert_eq!(
        render(&r),
        "pii.employee_id 95 1 [EmployeeId]\nfinancial.account 80 1 [acct]"
    );
}

#[test]
fn config_errors_name_the_field() {
    let bad = |f: &dyn Fn(&mut ClassifierConfig)| {
        let mut cfg = ClassifierConfig::default();
        f(&mut cfg);
        Classifier::new(&cfg).unwrap_err().to_string()
    };
    assert_eq!(
        bad(&|c| c.max_rows = 0),
        "max_rows: must be between 1 and 1000000"
    );
    assert!(bad(&|c| c.max_bytes = 0).starts_with("max_bytes:"));
    assert!(bad(&|c| c.min_confidence = 1.5).starts_with("min_confidence:"));
    let custom = |name: &str, col: Option<&str>, val: Option<&str>| CustomClass {
        name: name.into(),
        column_regex: col.map(Into::into),
        value_regex: val.map(Into::into),
        validator: Validator::None,
    };
    assert!(
        bad(&|c| c.custom = vec![custom("Bad Name", Some("x"), None)])
            .starts_with("custom[0].name:")
    );
    assert_eq!(
        bad(&|c| c.custom = vec![custom("pii.email", Some("x"), None)]),
        "custom[0].name: duplicate class name"
    );
    assert_eq!(
        bad(&|c| c.custom = vec![custom("a", Some("x"), None), custom("b", None, None)]),
        "custom[1]: needs column_regex or value_regex"
    );
    assert!(
        bad(&|c| c.custom = vec![custom("a", Some("("), None)])
            .starts_with("custom[0].column_regex:")
    );
    assert!(
        bad(&|c| c.custom = vec![custom("a", None, Some("[z-a]"))])
            .starts_with("custom[0].value_regex:")
    );
    assert_eq!(Validator::parse("mod97"), Some(Validator::Mod97));
    assert_eq!(Validator::parse("md5"), None);
}

#[test]
fn salted_hashes() {
    let a = salted_hash(b"salt", b"alice@example.com");
    assert_eq!(a, salted_hash(b"salt", b"alice@example.com"));
    assert_ne!(a, salted_hash(b"pepper", b"alice@example.com"));
    assert_ne!(salted_hash(b"ab", b"c"), salted_hash(b"a", b"bc"));
}

#[test]
fn class_names_round_trip() {
    for c in BUILTIN.iter() {
        assert_eq!(DataClass::builtin(c.as_str()).as_ref(), Some(c));
    }
    assert_eq!(DataClass::builtin("pii.other"), None);
}

/// Precision and recall of the value validators on a generated labelled set
/// (10,000 values per class, 50,000 negatives, fixed seed), values alone.
#[test]
fn labelled_set_precision_and_recall() {
    let mut rng = Rng::new(0x5EED_C0DE);
    let mut labelled: Vec<(Option<DataClass>, String)> = Vec::new();
    for class in MEASURED.iter() {
        for _ in 0..10_000 {
            labelled.push((Some(class.clone()), positive(class, &mut rng)));
        }
    }
    for _ in 0..50_000 {
        labelled.push((None, negative(&mut rng)));
    }
    let mut table =
        String::from("| class | precision | recall | TP | FP | FN |\n|---|---|---|---|---|---|\n");
    for class in MEASURED.iter() {
        let (mut tp, mut fp, mut fn_) = (0u32, 0u32, 0u32);
        let mut examples = Vec::new();
        for (label, value) in &labelled {
            let found = Classifier::classify_value(value.as_bytes()).contains(class);
            let is = label.as_ref() == Some(class);
            match (is, found) {
                (true, true) => tp += 1,
                (false, true) => {
                    fp += 1;
                    if examples.len() < 3 || std::env::var("SHOW_FP").is_ok() {
                        println!("FP {class} {label:?} {value}");
                        examples.push(value.clone());
                    }
                }
                (true, false) => {
                    fn_ += 1;
                    if examples.len() < 3 || std::env::var("SHOW_FP").is_ok() {
                        println!("FN {class} {value}");
                        examples.push(format!("missed {value}"));
                    }
                }
                _ => {}
            }
        }
        let precision = f64::from(tp) / f64::from((tp + fp).max(1));
        let recall = f64::from(tp) / f64::from((tp + fn_).max(1));
        table.push_str(&format!(
            "| {class} | {precision:.4} | {recall:.4} | {tp} | {fp} | {fn_} |\n"
        ));
        let floor = match class {
            DataClass::Phone | DataClass::Ssn => 0.90,
            _ => 0.95,
        };
        assert!(
            precision >= floor,
            "{class}: precision {precision} {examples:?}"
        );
        assert!(recall >= 0.95, "{class}: recall {recall} {examples:?}");
    }
    println!("{table}");
}

#[test]
fn prepared_columns_classify_like_names_read_each_time() {
    let classifier = Classifier::new(&ClassifierConfig::default()).unwrap();
    let names = ["customer_email", "ssn", "notes"];
    let rows: [[Option<&[u8]>; 3]; 2] = [
        [
            Some(b"ann@example.com"),
            Some(b"123-45-6789"),
            Some(b"late"),
        ],
        [Some(b"bo@example.org"), None, Some(b"4111 1111 1111 1111")],
    ];
    let prepared = classifier.prepare(&names);
    assert_eq!(prepared.len(), 3);
    let mut reports = Vec::new();
    for mut acc in [
        classifier.start(&names),
        classifier.start_prepared(&prepared),
    ] {
        for row in &rows {
            acc.observe_row(row);
        }
        reports.push(acc.finish());
    }
    assert_eq!(reports[0], reports[1]);
    assert!(reports[0].get(&DataClass::Email).is_some());
    // A prepared set serves many result sets.
    let mut again = classifier.start_prepared(&prepared);
    again.observe_row(&rows[0]);
    assert!(again.finish().get(&DataClass::Ssn).is_some());
}
