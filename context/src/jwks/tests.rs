use ed25519_dalek::Signer as _;
use serde_json::json;

use super::*;

fn key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

fn okp(key: &ed25519_dalek::SigningKey, kid: &str) -> serde_json::Value {
    json!({
        "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes()),
    })
}

fn write_keys(path: &Path, keys: &[serde_json::Value]) {
    std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
}

fn token(key: &ed25519_dalek::SigningKey, header: &serde_json::Value) -> String {
    let claims = json!({ "sub": "olivia", "exp": crate::unix_now() + 300 });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

fn refusal(keys: &JwksFile, token: &str) -> KeyRefusal {
    keys.key_for(token).map(|k| k.algorithm).unwrap_err()
}

/// The subject of `token` when it verifies with the key `keys` selects.
fn verified_sub(keys: &JwksFile, token: &str) -> String {
    let vk = keys.key_for(token).unwrap();
    let mut validation = jsonwebtoken::Validation::new(vk.algorithm);
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &vk.key, &validation).unwrap();
    data.claims["sub"].as_str().unwrap().to_owned()
}

#[test]
fn an_unknown_key_id_reads_the_file_again_at_most_every_interval() {
    let first = key(1);
    let second = key(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_keys(&path, &[okp(&first, "k1")]);
    let keys = JwksFile::load(&path).unwrap();
    let old = token(&first, &json!({"alg": "EdDSA", "kid": "k1"}));
    let new = token(&second, &json!({"alg": "EdDSA", "kid": "k2"}));
    assert_eq!(verified_sub(&keys, &old), "olivia");

    // The issuer rotates: the file now holds only the new key.
    write_keys(&path, &[okp(&second, "k2")]);
    assert_eq!(
        refusal(&keys, &new),
        KeyRefusal::UnknownKeyId,
        "the file was read less than an interval ago"
    );
    assert_eq!(verified_sub(&keys, &old), "olivia", "keys in force kept");
    keys.mark_stale();
    assert_eq!(verified_sub(&keys, &new), "olivia");
    assert_eq!(refusal(&keys, &old), KeyRefusal::UnknownKeyId);
    assert_eq!(keys.key_count(), 1);

    // A file that turned invalid keeps the keys in force.
    std::fs::write(&path, "{").unwrap();
    keys.mark_stale();
    assert_eq!(refusal(&keys, &old), KeyRefusal::UnknownKeyId);
    assert_eq!(verified_sub(&keys, &new), "olivia");
}

#[test]
fn hmac_none_and_algorithms_the_key_is_not_for_are_refused() {
    let idp = key(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    // A symmetric key in the set does not make HMAC acceptable.
    write_keys(
        &path,
        &[
            okp(&idp, "ed"),
            json!({"kty": "oct", "kid": "secret", "k": URL_SAFE_NO_PAD.encode(b"shared")}),
        ],
    );
    let keys = JwksFile::load(&path).unwrap();
    for (alg, kid) in [
        ("HS256", "secret"),
        ("HS512", "secret"),
        ("none", "ed"),
        ("RS256", "ed"),
        ("ES256", "ed"),
        ("XS999", "ed"),
    ] {
        let t = token(&idp, &json!({"alg": alg, "kid": kid}));
        assert_eq!(refusal(&keys, &t), KeyRefusal::DisallowedAlgorithm, "{alg}");
    }
    assert!(allowed_algorithm("HS256").is_none());
    assert!(allowed_algorithm("none").is_none());
    assert_eq!(allowed_algorithm("PS384"), Some(Algorithm::PS384));
    assert_eq!(
        verified_sub(&keys, &token(&idp, &json!({"alg": "EdDSA", "kid": "ed"}))),
        "olivia"
    );
}

#[test]
fn without_a_kid_only_a_single_key_is_chosen() {
    let a = key(4);
    let b = key(5);
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.json");
    let two = dir.path().join("two.json");
    write_keys(&one, &[okp(&a, "a")]);
    write_keys(&two, &[okp(&a, "a"), okp(&b, "b")]);
    let t = token(&a, &json!({"alg": "EdDSA"}));
    assert_eq!(verified_sub(&JwksFile::load(&one).unwrap(), &t), "olivia");
    assert_eq!(
        refusal(&JwksFile::load(&two).unwrap(), &t),
        KeyRefusal::UnknownKeyId
    );
}

#[test]
fn malformed_tokens_are_malformed() {
    let a = key(6);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_keys(&path, &[okp(&a, "a")]);
    let keys = JwksFile::load(&path).unwrap();
    let garbage = URL_SAFE_NO_PAD.encode("{\"typ\": 1}");
    for t in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!.b.c",
        &format!("{garbage}.b.c"),
    ] {
        assert_eq!(refusal(&keys, t), KeyRefusal::Malformed, "{t}");
    }
}

#[test]
fn a_bad_jwks_file_is_an_error_that_names_the_file_and_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let message = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let error = JwksFile::load(&path).unwrap_err();
        assert!(matches!(error, JwksError::Parse { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("{}: not a JWKS: ", path.display())),
            "{message}"
        );
        message
    };
    message("not-json.json", "keys:");
    assert!(message("empty.json", r#"{"keys": []}"#).ends_with("keys: no key"));
    assert!(message("no-array.json", r#"{"keys": {}}"#).contains("keys: invalid type"));
    let bad_key = message(
        "bad-key.json",
        r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA"}, "not a key"]}"#,
    );
    assert!(bad_key.contains("keys[1]"), "{bad_key}");

    let missing = dir.path().join("missing.json");
    let error = JwksFile::load(&missing).unwrap_err();
    assert!(matches!(error, JwksError::Read { .. }));
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot read {}: ", missing.display())),
        "{error}"
    );
}
