//! Column-name evidence.

use super::{ClassSet, DataClass};

/// What a column's name says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Evidence {
    /// Classes the name points to.
    pub(crate) classes: ClassSet,
    /// The name says "version": dotted quads are versions, not addresses.
    pub(crate) version: bool,
}

/// Lowercase words joined by `_`: `EmailAddress` -> `email_address`,
/// `IPAddress` -> `ip_address`, `cc-num` -> `cc_num`.
pub(crate) fn normalize(name: &str) -> String {
    let chars: Vec<char> = name.chars().take(128).collect();
    let mut out = String::with_capacity(chars.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            if c.is_uppercase() && i > 0 {
                let prev = chars[i - 1];
                let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
                if prev.is_lowercase()
                    || prev.is_ascii_digit()
                    || (prev.is_uppercase() && next_lower)
                {
                    push_sep(&mut out);
                }
            }
            out.extend(c.to_lowercase());
        } else {
            push_sep(&mut out);
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

fn push_sep(out: &mut String) {
    if !out.is_empty() && !out.ends_with('_') {
        out.push('_');
    }
}

const PERSON: &[&str] = &[
    "customer",
    "client",
    "person",
    "patient",
    "employee",
    "contact",
    "holder",
    "cardholder",
    "owner",
    "member",
    "student",
    "recipient",
    "sender",
    "beneficiary",
    "applicant",
    "guest",
    "passenger",
    "billing",
    "shipping",
    "legal",
    "real",
];

/// The classes a normalized column name points to.
pub(crate) fn evidence(normalized: &str) -> Evidence {
    let tokens: Vec<&str> = normalized.split('_').filter(|t| !t.is_empty()).collect();
    let compact: String = tokens.concat();
    let has = |t: &str| tokens.contains(&t);
    let contains = |s: &str| compact.contains(s);
    let mut e = Evidence::default();
    let mut add = |c: DataClass| e.classes.add(&c);

    let password = contains("password") || contains("passwd") || has("pwd") || has("pw");
    if password {
        add(DataClass::PasswordHash);
    }
    if contains("email") || has("mail") {
        add(DataClass::Email);
    }
    if contains("phone")
        || contains("msisdn")
        || has("tel")
        || has("mobile")
        || has("cell")
        || has("fax")
    {
        add(DataClass::Phone);
    }
    if has("ssn")
        || contains("socialsecurity")
        || contains("taxid")
        || has("tin")
        || contains("taxnumber")
    {
        add(DataClass::Ssn);
    }
    let name_word = [
        "firstname",
        "lastname",
        "fullname",
        "surname",
        "givenname",
        "familyname",
        "middlename",
        "forename",
        "maidenname",
    ]
    .iter()
    .any(|w| compact.ends_with(w) || compact.starts_with(w));
    let person_name = tokens
        .windows(2)
        .any(|w| w[1] == "name" && PERSON.contains(&w[0]));
    if name_word || person_name || has("fname") || has("lname") {
        add(DataClass::Name);
    }
    let non_postal_address = [
        "email", "ip", "mac", "wallet", "remote", "bitcoin", "eth", "server", "host",
    ]
    .iter()
    .any(|w| has(w) || contains(&format!("{w}address")) || contains(&format!("{w}addr")));
    if ((has("address") || has("addr") || contains("addressline")) && !non_postal_address)
        || contains("street")
        || contains("postalcode")
        || contains("postcode")
        || contains("zipcode")
        || has("zip")
    {
        add(DataClass::Address);
    }
    if has("dob") || contains("birth") {
        add(DataClass::Dob);
    }
    if contains("cardnumber")
        || contains("creditcard")
        || contains("ccnum")
        || contains("cardno")
        || contains("cardnum")
        || has("pan")
    {
        add(DataClass::Card);
    }
    if has("iban") {
        add(DataClass::Iban);
    }
    let token_meta = tokens.last().is_some_and(|t| {
        [
            "type", "expires", "expiry", "at", "count", "id", "ttl", "len", "length",
        ]
        .contains(t)
    });
    if !password
        && !token_meta
        && (contains("apikey")
            || contains("secret")
            || contains("accesskey")
            || contains("privatekey")
            || has("token")
            || contains("authtoken")
            || contains("accesstoken")
            || contains("refreshtoken")
            || contains("apitoken"))
    {
        add(DataClass::ApiKey);
    }
    if contains("jwt") || contains("idtoken") {
        add(DataClass::Jwt);
    }
    if contains("ipaddr")
        || has("ip")
        || has("ipv4")
        || has("ipv6")
        || contains("clientip")
        || contains("remoteip")
        || contains("sourceip")
        || contains("srcip")
        || contains("remoteaddr")
        || contains("peeraddr")
    {
        add(DataClass::Ip);
    }
    e.version = has("version") || has("ver") || has("release") || has("build");
    e
}
