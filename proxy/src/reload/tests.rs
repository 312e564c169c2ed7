use super::*;

/// A self-signed certificate `<name>.crt` and its key `<name>.key` in
/// `dir`, made by openssl.
fn certificate(dir: &Path, name: &str) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `to` with `bytes` in one step (write, then rename).
fn replace(to: &Path, bytes: &[u8]) {
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn serial_of(pem: &[u8]) -> String {
    let chain = parse_chain(pem, "test").unwrap();
    Leaf::of(&chain[0], "test").unwrap().serial
}

fn count(metrics: &Metrics, result: &'static str) -> u64 {
    metrics
        .tls_reloads
        .get_or_create(&TlsReloadLabels {
            material: "listeners.inbound_tls".into(),
            result,
        })
        .get()
}

/// The serial of the certificate a reloader's material shows.
fn served(reloader: &Reloader<CertifiedKey>) -> String {
    let key = reloader.current();
    Leaf::of(&key.cert[0], "test").unwrap().serial
}

#[test]
fn a_replaced_certificate_goes_in_force_and_a_half_written_one_is_refused_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificate(d, "one");
    certificate(d, "two");
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    std::fs::copy(d.join("one.crt"), &cert).unwrap();
    std::fs::copy(d.join("one.key"), &key).unwrap();
    let metrics = Metrics::default();
    let reloader = server_certificate("listeners.inbound_tls", &cert, &key).unwrap();
    let one = serial_of(&std::fs::read(d.join("one.crt")).unwrap());
    let two = serial_of(&std::fs::read(d.join("two.crt")).unwrap());
    assert_ne!(one, two);
    assert_eq!(served(&reloader), one);
    let mut refused = None;
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Unchanged);

    // Half written: the certificate cut in the middle.
    let whole = std::fs::read(d.join("two.crt")).unwrap();
    replace(&cert, &whole[..whole.len() / 2]);
    for _ in 0..3 {
        assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Refused);
    }
    assert_eq!(count(&metrics, "refused"), 1, "counted once per content");
    assert_eq!(served(&reloader), one);
    assert_eq!(reloader.leaf().unwrap().serial, one);

    // The whole certificate, the old key: still refused (a new content).
    replace(&cert, &whole);
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Refused);
    assert_eq!(count(&metrics, "refused"), 2);
    assert_eq!(served(&reloader), one);

    // Then its key: the set is whole.
    replace(&key, &std::fs::read(d.join("two.key")).unwrap());
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Applied);
    assert_eq!(served(&reloader), two);
    assert_eq!(count(&metrics, "applied"), 1);
    let expiry = metrics
        .tls_cert_expiry
        .get_or_create(&TlsMaterialLabels {
            material: "listeners.inbound_tls".into(),
        })
        .get();
    assert_eq!(expiry, reloader.leaf().unwrap().not_after);
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Unchanged);

    // A file that disappears is refused too; the set in force stays.
    std::fs::remove_file(&key).unwrap();
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Refused);
    assert_eq!(served(&reloader), two);
    assert_eq!(count(&metrics, "refused"), 3);
}

#[test]
fn errors_name_the_field_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificate(d, "one");
    certificate(d, "two");
    let check = |cert: &str, key: &str, expected: &str| {
        let error =
            server_certificate("listeners.inbound_tls", &d.join(cert), &d.join(key)).unwrap_err();
        assert!(error.starts_with(expected), "{error}");
    };
    let cert_field = format!(
        "listeners.inbound_tls.cert_file ({})",
        d.join("bad").display()
    );
    std::fs::write(d.join("bad"), "-----BEGIN CERTIFICATE-----\nMII").unwrap();
    check("bad", "one.key", &cert_field);
    std::fs::write(d.join("empty"), "").unwrap();
    check(
        "empty",
        "one.key",
        &format!(
            "listeners.inbound_tls.cert_file ({}): no certificate",
            d.join("empty").display()
        ),
    );
    check(
        "one.crt",
        "two.key",
        &format!(
            "listeners.inbound_tls.key_file ({}): not the key of",
            d.join("two.key").display()
        ),
    );
    check(
        "one.crt",
        "missing.key",
        "listeners.inbound_tls.key_file: cannot read",
    );
}

#[test]
fn a_ca_only_set_has_no_leaf_and_reloads_its_roots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificate(d, "one");
    certificate(d, "two");
    let ca = d.join("ca.crt");
    std::fs::copy(d.join("one.crt"), &ca).unwrap();
    let file = File::new("tls_origination[0].ca_file", &ca);
    let named = file.named();
    let reloader = Reloader::load("tls_origination[0]", vec![file], move |contents| {
        Ok(Checked {
            material: parse_roots(&contents[0], &named)?,
            leaf: None,
        })
    })
    .unwrap();
    assert_eq!(reloader.current().len(), 1);
    assert!(reloader.leaf().is_none());
    let metrics = Metrics::default();
    let mut bundle = std::fs::read(d.join("one.crt")).unwrap();
    bundle.extend(std::fs::read(d.join("two.crt")).unwrap());
    replace(&ca, &bundle);
    let mut refused = None;
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Applied);
    assert_eq!(reloader.current().len(), 2);
    replace(&ca, b"not a certificate");
    assert_eq!(reloader.reload(&metrics, &mut refused), Reload::Refused);
    assert_eq!(reloader.current().len(), 2);
}
