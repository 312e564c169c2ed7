//! Value validators, behind a one-pass byte-class pre-filter.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::OnceLock;

use super::names::Evidence;
use super::{ClassSet, DataClass, Validator};

/// Byte-class counts of one value.
#[derive(Default, Clone, Copy)]
struct Stats {
    digits: usize,
    upper: usize,
    lower: usize,
    at: usize,
    dot: usize,
    dash: usize,
    colon: usize,
    dollar: usize,
    space: usize,
    other: usize,
}

/// Byte classes for [`stats`]: index into the counters.
const DIGIT: u8 = 0;
const UPPER: u8 = 1;
const LOWER_C: u8 = 2;
const AT: u8 = 3;
const DOT: u8 = 4;
const DASH: u8 = 5;
const COLON: u8 = 6;
const DOLLAR: u8 = 7;
const SPACE: u8 = 8;
const OTHER: u8 = 9;

const BYTE_CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = match b {
            b'0'..=b'9' => DIGIT,
            b'A'..=b'Z' => UPPER,
            b'a'..=b'z' => LOWER_C,
            b'@' => AT,
            b'.' => DOT,
            b'-' => DASH,
            b':' => COLON,
            b'$' => DOLLAR,
            b' ' => SPACE,
            _ => OTHER,
        };
        i += 1;
    }
    t
};

/// Per byte, one added to its class's 12-bit field of a packed counter: the
/// counters stay in registers (values are shorter than 4096 bytes, so no
/// field overflows).
const BYTE_INC: [u128; 256] = {
    let mut t = [0u128; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = 1u128 << (12 * BYTE_CLASS[i] as u32);
        i += 1;
    }
    t
};

fn stats(v: &[u8]) -> Stats {
    debug_assert!(v.len() < 4096);
    let mut acc = 0u128;
    for &b in v {
        acc += BYTE_INC[usize::from(b)];
    }
    let field = |class: u8| ((acc >> (12 * u32::from(class))) & 0xfff) as usize;
    Stats {
        digits: field(DIGIT),
        upper: field(UPPER),
        lower: field(LOWER_C),
        at: field(AT),
        dot: field(DOT),
        dash: field(DASH),
        colon: field(COLON),
        dollar: field(DOLLAR),
        space: field(SPACE),
        other: field(OTHER),
    }
}

/// The built-in classes `v` belongs to, given its column's name evidence.
pub(crate) fn detect(v: &[u8], ctx: &Evidence) -> ClassSet {
    let mut out = ClassSet::default();
    let v = v.trim_ascii();
    let len = v.len();
    if !(3..4096).contains(&len) {
        return out;
    }
    let s = stats(v);
    let alnum = s.digits + s.upper + s.lower;

    if s.at >= 1 && email(v, s) {
        out.add(&DataClass::Email);
    }
    if s.dollar >= 2 || (s.dollar >= 1 && v.starts_with(b"pbkdf2_")) {
        if password_hash(v) {
            out.add(&DataClass::PasswordHash);
        }
        return out;
    }
    if s.space == 0 && s.at == 0 {
        if s.dot == 2 && v.starts_with(b"eyJ") && jwt(v) {
            out.add(&DataClass::Jwt);
            return out;
        }
        if len >= 20 && api_key(v, s) {
            out.add(&DataClass::ApiKey);
        }
    }
    let digit_like = s.digits + s.space + s.dash == len;
    if digit_like && s.digits >= 12 && card(v) {
        out.add(&DataClass::Card);
    }
    if s.upper >= 2 && len >= 15 && s.other == 0 && s.dash == 0 && iban_valid(v) {
        out.add(&DataClass::Iban);
    }
    if s.colon == 0 && s.dot == 3 && s.digits + s.dot == len {
        if !ctx.version && ipv4(v) {
            out.add(&DataClass::Ip);
        }
    } else if s.colon >= 2 && s.space == 0 && ipv6(v) {
        out.add(&DataClass::Ip);
    }
    if s.digits == 9 && ssn(v, ctx.classes.has(&DataClass::Ssn)) {
        out.add(&DataClass::Ssn);
    }
    if (7..=15).contains(&s.digits)
        && s.upper + s.lower + s.at + s.colon + s.dollar == 0
        && phone(v, ctx.classes.has(&DataClass::Phone))
    {
        out.add(&DataClass::Phone);
    }
    if ctx.classes.has(&DataClass::Dob) && s.digits >= 6 && date(v) {
        out.add(&DataClass::Dob);
    }
    if s.digits >= 1
        && s.space >= 2
        && s.upper + s.lower >= 4
        && alnum > len / 2
        && len <= 120
        && street(v)
    {
        out.add(&DataClass::Address);
    }
    out
}

/// Applies a configured checksum to a value.
pub(crate) fn validate(validator: Validator, v: &[u8]) -> bool {
    match validator {
        Validator::None => true,
        Validator::Luhn => {
            let digits: Vec<u8> = v
                .iter()
                .filter(|b| b.is_ascii_digit())
                .map(|b| b - b'0')
                .collect();
            digits.len() >= 2 && luhn_digits(&digits)
        }
        Validator::Mod97 => mod97(v.iter().copied().filter(|b| !b.is_ascii_whitespace())),
    }
}

// ---- email ----

fn email(v: &[u8], s: Stats) -> bool {
    if s.at == 1 && s.space == 0 && email_token(v) {
        return true;
    }
    // An address inside free text.
    v.split(|b| b.is_ascii_whitespace() || b"<>,;\"'()[]".contains(b))
        .filter(|t| t.contains(&b'@'))
        .any(|t| email_token(t.strip_suffix(b".").unwrap_or(t)))
}

fn email_token(t: &[u8]) -> bool {
    let Some(at) = memchr::memchr(b'@', t) else {
        return false;
    };
    let (local, domain) = (&t[..at], &t[at + 1..]);
    if local.is_empty() || local.len() > 64 || domain.len() < 4 || domain.len() > 253 {
        return false;
    }
    if local[0] == b'.'
        || local[local.len() - 1] == b'.'
        || memchr::memmem::find(local, b"..").is_some()
    {
        return false;
    }
    if !local
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b".!#$%&'*+/=?^_`{|}~-".contains(b))
    {
        return false;
    }
    let mut labels = 0;
    let mut tld: &[u8] = &[];
    for l in domain.split(|&b| b == b'.') {
        if l.is_empty() || l.len() > 63 || l[0] == b'-' || l[l.len() - 1] == b'-' {
            return false;
        }
        if !l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
            return false;
        }
        labels += 1;
        tld = l;
    }
    labels >= 2 && tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic)
}

// ---- cards ----

/// The Luhn check over ASCII digits (other bytes make it fail).
pub fn luhn_valid(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let d: Vec<u8> = digits.iter().map(|b| b - b'0').collect();
    luhn_digits(&d)
}

fn luhn_digits(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut x = u32::from(x);
        if i % 2 == 1 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    sum.is_multiple_of(10)
}

fn card(v: &[u8]) -> bool {
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut group = 0usize;
    let mut sep: Option<u8> = None;
    for &b in v {
        if b.is_ascii_digit() {
            if n == digits.len() {
                return false;
            }
            digits[n] = b;
            n += 1;
            group += 1;
        } else {
            // Separators: one kind, between groups of 3 to 6 digits.
            if sep.is_some_and(|s| s != b) || !(3..=6).contains(&group) {
                return false;
            }
            sep = Some(b);
            group = 0;
        }
    }
    if sep.is_some() && !(1..=6).contains(&group) {
        return false;
    }
    let d = &digits[..n];
    if !(12..=19).contains(&n) || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    issuer_accepts(d) && luhn_valid(d)
}

fn prefix_num(d: &[u8], k: usize) -> u32 {
    d.iter()
        .take(k)
        .fold(0u32, |acc, &b| acc * 10 + u32::from(b - b'0'))
}

/// Known issuer (IIN) ranges and their lengths.
fn issuer_accepts(d: &[u8]) -> bool {
    let n = d.len();
    let p1 = prefix_num(d, 1);
    let p2 = prefix_num(d, 2);
    let p3 = prefix_num(d, 3);
    let p4 = prefix_num(d, 4);
    let p6 = prefix_num(d, 6);
    // Visa
    (p1 == 4 && matches!(n, 13 | 16 | 19))
        // Mastercard
        || ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && n == 16
        // American Express
        || matches!(p2, 34 | 37) && n == 15
        // Discover
        || (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3)) && (16..=19).contains(&n)
        // JCB
        || (3528..=3589).contains(&p4) && (16..=19).contains(&n)
        // Diners Club
        || ((300..=305).contains(&p3) || p4 == 3095 || matches!(p2, 36 | 38 | 39)) && (14..=19).contains(&n)
        // UnionPay
        || p2 == 62 && (16..=19).contains(&n)
        // Maestro
        || (p2 == 50 || (56..=58).contains(&p2) || p4 == 6304 || p4 == 6759 || p6 == 676770 || p6 == 676774)
            && (12..=19).contains(&n)
        // Mir
        || (2200..=2204).contains(&p4) && (16..=19).contains(&n)
}

// ---- IBAN ----

/// IBAN lengths per country (ISO 13616 registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HN", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
    (b"YE", 30),
];

/// Whether `v` is an IBAN: known country, its length, mod-97 (spaces in
/// groups of four are allowed).
pub fn iban_valid(v: &[u8]) -> bool {
    let mut buf = [0u8; 34];
    let mut n = 0;
    let mut since_space = 0;
    for &b in v {
        if b == b' ' {
            // Printed form: a space after every fourth character.
            if since_space != 4 {
                return false;
            }
            since_space = 0;
            continue;
        }
        since_space += 1;
        if n == buf.len() || !b.is_ascii_alphanumeric() || b.is_ascii_lowercase() {
            return false;
        }
        buf[n] = b;
        n += 1;
    }
    let iban = &buf[..n];
    if n < 15
        || !iban[..2].iter().all(u8::is_ascii_uppercase)
        || !iban[2..4].iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let Some(&(_, want)) = IBAN_LENGTHS.iter().find(|(cc, _)| &iban[..2] == *cc) else {
        return false;
    };
    n == want && mod97(iban.iter().copied())
}

/// ISO 7064 mod 97-10 over an IBAN-like string (first four characters moved
/// to the end, letters as 10..35).
fn mod97(chars: impl Iterator<Item = u8>) -> bool {
    let chars: Vec<u8> = chars.collect();
    if chars.len() < 5 || chars.len() > 64 {
        return false;
    }
    let mut rem: u32 = 0;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            b'a'..=b'z' => u32::from(c - b'a') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

// ---- SSN and phone ----

fn ssn(v: &[u8], named: bool) -> bool {
    let mut d = [0u8; 9];
    match v.len() {
        11 if (v[3] == b'-' && v[6] == b'-') || (v[3] == b' ' && v[6] == b' ') => {
            d[..3].copy_from_slice(&v[..3]);
            d[3..5].copy_from_slice(&v[4..6]);
            d[5..].copy_from_slice(&v[7..]);
        }
        // Bare digits only with a column name saying SSN.
        9 if named => d.copy_from_slice(v),
        _ => return false,
    }
    if !d.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let area = prefix_num(&d, 3);
    let group = prefix_num(&d[3..], 2);
    let serial = prefix_num(&d[5..], 4);
    if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
        return false;
    }
    if d.iter().all(|&x| x == d[0]) {
        return false;
    }
    // Published in advertising or as examples, never issued to a person.
    !matches!(
        &d[..],
        b"078051120" | b"219099999" | b"123456789" | b"457555462"
    )
}

fn phone(v: &[u8], named: bool) -> bool {
    if !v
        .iter()
        .all(|b| b.is_ascii_digit() || b" -.()+".contains(b))
    {
        return false;
    }
    let mut buf = [0u8; 32];
    let mut n = 0;
    for &b in v {
        if b.is_ascii_digit() {
            if n == buf.len() {
                return false;
            }
            buf[n] = b;
            n += 1;
        }
    }
    let digits = &buf[..n];
    if named {
        return (7..=15).contains(&digits.len()) && !digits.iter().all(|&x| x == digits[0]);
    }
    // E.164: `+` and a country code that does not start with 0.
    if v[0] == b'+' {
        return (8..=15).contains(&digits.len())
            && digits[0] != b'0'
            && !v[1..].contains(&b'+')
            && !v.contains(&b'.');
    }
    // North American formats: (NXX) NXX-XXXX, NXX-NXX-XXXX, NXX.NXX.XXXX.
    let shapes: [&[u8]; 4] = [
        b"(ddd) ddd-dddd",
        b"ddd-ddd-dddd",
        b"ddd.ddd.dddd",
        b"(ddd)ddd-dddd",
    ];
    shapes.iter().any(|shape| {
        shape.len() == v.len()
            && shape.iter().zip(v).all(|(s, b)| {
                if *s == b'd' {
                    b.is_ascii_digit()
                } else {
                    s == b
                }
            })
    }) && digits.len() == 10
        && (b'2'..=b'9').contains(&digits[0])
        && (b'2'..=b'9').contains(&digits[3])
}

// ---- dates ----

fn date(v: &[u8]) -> bool {
    let t = v.split(|&b| b == b'T' || b == b' ').next().unwrap_or(v);
    let parts: Vec<&[u8]> = t.split(|&b| b == b'-' || b == b'/' || b == b'.').collect();
    if parts.len() != 3
        || !parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.iter().all(u8::is_ascii_digit))
    {
        return false;
    }
    let n: Vec<u32> = parts.iter().map(|p| prefix_num(p, 4)).collect();
    let (y, m, d) = if parts[0].len() == 4 {
        (n[0], n[1], n[2])
    } else if parts[2].len() == 4 {
        // MM/DD/YYYY or DD.MM.YYYY: accept either order.
        if n[0] > 12 {
            (n[2], n[1], n[0])
        } else {
            (n[2], n[0], n[1])
        }
    } else {
        return false;
    };
    (1900..=2100).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d)
}

// ---- network ----

fn ipv4(v: &[u8]) -> bool {
    // `Ipv4Addr` rejects leading zeros and octets above 255.
    std::str::from_utf8(v).is_ok_and(|s| Ipv4Addr::from_str(s).is_ok())
}

fn ipv6(v: &[u8]) -> bool {
    v.len() >= 3
        && v.iter().all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        && std::str::from_utf8(v).is_ok_and(|s| Ipv6Addr::from_str(s).is_ok())
}

// ---- secrets ----

fn b64url_decode(s: &[u8], out: &mut Vec<u8>) -> bool {
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            b'=' => continue,
            _ => return false,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    true
}

fn jwt(v: &[u8]) -> bool {
    let mut parts = v.split(|&b| b == b'.');
    let (Some(h), Some(p), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if h.len() > 1024 || p.is_empty() {
        return false;
    }
    let url_safe = |x: &[u8]| {
        x.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(b))
    };
    if !url_safe(p) || !url_safe(sig) {
        return false;
    }
    let mut header = Vec::with_capacity(h.len());
    if !b64url_decode(h, &mut header) {
        return false;
    }
    let header = header.trim_ascii();
    header.first() == Some(&b'{')
        && header.last() == Some(&b'}')
        && memchr::memmem::find(header, b"\"alg\"").is_some()
}

fn password_hash(v: &[u8]) -> bool {
    static RE: OnceLock<Option<regex::bytes::RegexSet>> = OnceLock::new();
    let set = RE.get_or_init(|| {
        regex::bytes::RegexSet::new([
            // bcrypt
            r"^\$2[abxy]?\$\d{2}\$[./A-Za-z0-9]{53}$",
            // argon2
            r"^\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$",
            // scrypt (passlib, libxcrypt `$7$`)
            r"^\$scrypt\$ln=\d+,r=\d+,p=\d+\$[A-Za-z0-9+/.=]+\$[A-Za-z0-9+/.=]+$",
            r"^\$7\$[./A-Za-z0-9]{11,}\$[./A-Za-z0-9]{43}$",
            // PBKDF2 (Django, passlib)
            r"^pbkdf2_sha(1|256|512)\$\d+\$[A-Za-z0-9+/.=]+\$[A-Za-z0-9+/=]+$",
            r"^\$pbkdf2(-sha(1|256|512))?\$\d+\$[./A-Za-z0-9+=]+\$[./A-Za-z0-9+=]+$",
            // SHA-crypt and MD5-crypt
            r"^\$6\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}$",
            r"^\$5\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{43}$",
            r"^\$1\$[./A-Za-z0-9]{1,8}\$[./A-Za-z0-9]{22}$",
            r"^\$apr1\$[./A-Za-z0-9]{1,8}\$[./A-Za-z0-9]{22}$",
            // yescrypt
            r"^\$y\$[./A-Za-z0-9]+\$[./A-Za-z0-9]+\$[./A-Za-z0-9]{43}$",
        ])
        .ok()
    });
    set.as_ref().is_some_and(|s| s.is_match(v))
}

fn all_in(v: &[u8], extra: &[u8]) -> bool {
    v.iter()
        .all(|b| b.is_ascii_alphanumeric() || extra.contains(b))
}

/// Well-known key prefixes, then high-entropy tokens.
fn api_key(v: &[u8], s: Stats) -> bool {
    let len = v.len();
    let upper_alnum = |x: &[u8]| {
        x.iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    if (v.starts_with(b"AKIA") || v.starts_with(b"ASIA")) && len == 20 && upper_alnum(&v[4..]) {
        return true;
    }
    for p in [&b"ghp_"[..], b"gho_", b"ghs_", b"ghu_", b"ghr_"] {
        if v.starts_with(p) && len == 40 && all_in(&v[4..], b"") {
            return true;
        }
    }
    if v.starts_with(b"github_pat_") && len >= 40 && all_in(&v[11..], b"_") {
        return true;
    }
    for p in [
        &b"sk_live_"[..],
        b"rk_live_",
        b"sk_test_",
        b"rk_test_",
        b"pk_live_",
    ] {
        if v.starts_with(p) && len >= p.len() + 16 && all_in(&v[p.len()..], b"") {
            return true;
        }
    }
    for p in [&b"xoxb-"[..], b"xoxp-", b"xoxa-", b"xoxr-", b"xoxs-"] {
        if v.starts_with(p) && len >= 20 && all_in(&v[5..], b"-") {
            return true;
        }
    }
    if v.starts_with(b"AIza") && len == 39 && all_in(&v[4..], b"_-") {
        return true;
    }
    if v.starts_with(b"glpat-") && len >= 26 && all_in(&v[6..], b"_-") {
        return true;
    }
    high_entropy(v, s)
}

/// Characters in runs that look like words: a capital and at least three
/// lowercase letters, or at least four lowercase letters.
fn word_chars(v: &[u8]) -> usize {
    let mut total = 0;
    let mut i = 0;
    while i < v.len() {
        let start = i;
        if v[i].is_ascii_uppercase() {
            i += 1;
        }
        let lower_start = i;
        while i < v.len() && v[i].is_ascii_lowercase() {
            i += 1;
        }
        let capital = lower_start > start;
        if i - lower_start >= if capital { 3 } else { 4 } {
            total += i - start;
        }
        if i == start {
            i += 1;
        }
    }
    total
}

/// A token of 24 to 256 characters from a base64/base62 alphabet, with
/// upper- and lowercase letters (and digits below 32 characters), not mostly
/// made of words, and a Shannon entropy of at least
/// 4 bits per character. Hex digests and UUIDs lack mixed case; identifiers
/// made of words fall below the entropy floor.
fn high_entropy(v: &[u8], s: Stats) -> bool {
    let len = v.len();
    if !(24..=256).contains(&len) || s.upper < 2 || s.lower < 2 || (s.digits == 0 && len < 32) {
        return false;
    }
    // Mostly words (`InvoiceAlphaReport88`): an identifier, not a key.
    if word_chars(v) * 10 > len * 6 {
        return false;
    }
    if !all_in(v, b"+/=_-~") {
        return false;
    }
    // Padding only at the end.
    if let Some(p) = memchr::memchr(b'=', v)
        && !v[p..].iter().all(|&b| b == b'=')
    {
        return false;
    }
    let mut counts = [0u16; 128];
    for &b in v {
        counts[usize::from(b & 0x7f)] += 1;
    }
    let n = len as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    // The expected entropy of a random string grows with its length (up to
    // log2 of the alphabet); ask for most of it.
    let floor = (n.log2() * 0.78).min(4.3);
    entropy >= floor && entropy >= 3.6
}

// ---- addresses ----

fn street(v: &[u8]) -> bool {
    static RE: OnceLock<Option<regex::bytes::Regex>> = OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::bytes::Regex::new(
            r"(?i)^\d{1,6}[a-z]?\s+([a-z0-9.'-]+\s+){1,5}(street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|circle|cir|parkway|pkwy|highway|hwy)\.?(\s*,.*)?$",
        )
        .ok()
    });
    re.as_ref().is_some_and(|r| r.is_match(v))
}
