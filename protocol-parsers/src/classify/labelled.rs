//! A generated, labelled set of values (deterministic seed) for measuring
//! the value validators' precision and recall.

use super::DataClass;
use crate::sqlcommenter::url_encode;

/// SplitMix64: small, deterministic, good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.below(10) as u8))
            .collect()
    }

    fn chars(&mut self, alphabet: &[u8], n: usize) -> String {
        (0..n).map(|_| char::from(*self.pick(alphabet))).collect()
    }
}

const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const CRYPT64: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const HEX: &[u8] = b"0123456789abcdef";
const FIRST: &[&str] = &[
    "james", "mary", "li", "fatima", "olga", "juan", "aiko", "noah", "emma", "raj", "zoe", "omar",
];
const LAST: &[&str] = &[
    "smith", "garcia", "chen", "muller", "rossi", "kowalski", "nguyen", "okafor", "silva", "dubois",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "corp.example.co.uk",
    "gmail.com",
    "uni-example.edu",
    "shop.example.io",
];
const WORDS: &[&str] = &[
    "alpha", "order", "shipped", "pending", "blue", "widget", "customer", "invoice", "delta",
    "report", "north", "Premium", "Large", "Red",
];

fn luhn_complete(prefix: &str, len: usize, rng: &mut Rng) -> String {
    let mut s = prefix.to_string();
    s.push_str(&rng.digits(len - 1 - prefix.len()));
    for check in 0..10u8 {
        let candidate = format!("{s}{check}");
        if super::luhn_valid(candidate.as_bytes()) {
            return candidate;
        }
    }
    s
}

fn b64url(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(B64URL[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn iban(rng: &mut Rng) -> String {
    let (cc, len) = *rng.pick(&[
        ("DE", 22usize),
        ("GB", 22),
        ("FR", 27),
        ("NL", 18),
        ("ES", 24),
        ("IT", 27),
        ("CH", 21),
        ("BE", 16),
        ("PL", 28),
        ("NO", 15),
    ]);
    let bban: String = match cc {
        "GB" => format!(
            "{}{}",
            rng.chars(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 4),
            rng.digits(14)
        ),
        "NL" => format!(
            "{}{}",
            rng.chars(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 4),
            rng.digits(10)
        ),
        _ => rng.digits(len - 4),
    };
    let numeric: String = format!("{bban}{cc}00")
        .chars()
        .map(|c| {
            if c.is_ascii_uppercase() {
                (c as u32 - 'A' as u32 + 10).to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    let rem = numeric
        .bytes()
        .fold(0u32, |r, b| (r * 10 + u32::from(b - b'0')) % 97);
    let check = 98 - rem;
    let plain = format!("{cc}{check:02}{bban}");
    if rng.below(3) == 0 {
        plain
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        plain
    }
}

/// One positive value of `class`.
pub(crate) fn positive(class: &DataClass, rng: &mut Rng) -> String {
    match class {
        DataClass::Email => {
            let local = match rng.below(4) {
                0 => format!("{}.{}", rng.pick(FIRST), rng.pick(LAST)),
                1 => format!("{}{}", rng.pick(FIRST), rng.range(1, 9999)),
                2 => format!("{}+{}", rng.pick(FIRST), rng.pick(WORDS).to_lowercase()),
                _ => format!("{}_{}", rng.chars(LOWER, 1), rng.pick(LAST)),
            };
            format!("{local}@{}", rng.pick(DOMAINS))
        }
        DataClass::Phone => {
            let area = rng.range(201, 989);
            let exch = rng.range(200, 999);
            let line = rng.range(0, 9999);
            match rng.below(5) {
                0 => format!("({area}) {exch}-{line:04}"),
                1 => format!("{area}-{exch}-{line:04}"),
                2 => format!("{area}.{exch}.{line:04}"),
                3 => format!("+1{area}{exch}{line:04}"),
                _ => format!("+44 20 {} {}", rng.digits(4), rng.digits(4)),
            }
        }
        DataClass::Ssn => loop {
            let area = rng.range(1, 899);
            let group = rng.range(1, 99);
            let serial = rng.range(1, 9999);
            if area != 666 {
                break format!("{area:03}-{group:02}-{serial:04}");
            }
        },
        DataClass::Card => {
            let (prefix, len) = *rng.pick(&[
                ("4", 16usize),
                ("4", 13),
                ("51", 16),
                ("55", 16),
                ("2221", 16),
                ("2720", 16),
                ("34", 15),
                ("37", 15),
                ("6011", 16),
                ("65", 16),
                ("3530", 16),
                ("36", 14),
                ("62", 16),
                ("6759", 18),
            ]);
            let number = luhn_complete(prefix, len, rng);
            match rng.below(3) {
                0 => number,
                k => {
                    let sep = if k == 1 { " " } else { "-" };
                    number
                        .as_bytes()
                        .chunks(4)
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect::<Vec<_>>()
                        .join(sep)
                }
            }
        }
        DataClass::Iban => iban(rng),
        DataClass::ApiKey => match rng.below(8) {
            0 => format!("AKIA{}", rng.chars(UPPER_ALNUM, 16)),
            1 => format!("ghp_{}", rng.chars(ALNUM, 36)),
            2 => format!("sk_live_{}", rng.chars(ALNUM, 24)),
            3 => format!(
                "xoxb-{}-{}-{}",
                rng.digits(11),
                rng.digits(12),
                rng.chars(ALNUM, 24)
            ),
            4 => format!("AIza{}", rng.chars(B64URL, 35)),
            5 => format!("glpat-{}", rng.chars(B64URL, 20)),
            _ => {
                let n = rng.range(32, 48) as usize;
                rng.chars(ALNUM, n)
            }
        },
        DataClass::Jwt => {
            let alg = rng.pick(&["HS256", "RS256", "EdDSA", "ES256"]);
            let header = b64url(format!("{{\"alg\":\"{alg}\",\"typ\":\"JWT\"}}").as_bytes());
            let payload = b64url(
                format!(
                    "{{\"sub\":\"{}\",\"iat\":{}}}",
                    rng.pick(FIRST),
                    rng.range(1_600_000_000, 1_800_000_000)
                )
                .as_bytes(),
            );
            format!("{header}.{payload}.{}", rng.chars(B64URL, 43))
        }
        DataClass::PasswordHash => match rng.below(6) {
            0 => format!("$2b$12${}", rng.chars(CRYPT64, 53)),
            1 => format!(
                "$argon2id$v=19$m=65536,t=3,p=4${}${}",
                rng.chars(&B64[..62], 22),
                rng.chars(&B64[..62], 43)
            ),
            2 => format!("$6${}${}", rng.chars(CRYPT64, 16), rng.chars(CRYPT64, 86)),
            3 => format!("$1${}${}", rng.chars(CRYPT64, 8), rng.chars(CRYPT64, 22)),
            4 => format!(
                "pbkdf2_sha256$600000${}${}=",
                rng.chars(ALNUM, 22),
                rng.chars(B64, 43)
            ),
            _ => format!(
                "$5$rounds=5000${}${}",
                rng.chars(CRYPT64, 16),
                rng.chars(CRYPT64, 43)
            ),
        },
        DataClass::Ip => {
            if rng.below(3) == 0 {
                let groups: Vec<String> =
                    (0..8).map(|_| format!("{:x}", rng.below(65536))).collect();
                let addr: std::net::Ipv6Addr = groups
                    .join(":")
                    .parse()
                    .unwrap_or(std::net::Ipv6Addr::LOCALHOST);
                addr.to_string()
            } else {
                format!(
                    "{}.{}.{}.{}",
                    rng.range(1, 223),
                    rng.below(256),
                    rng.below(256),
                    rng.range(1, 254)
                )
            }
        }
        _ => String::new(),
    }
}

/// One value that belongs to no class, from realistic generators.
pub(crate) fn negative(rng: &mut Rng) -> String {
    match rng.below(20) {
        0 => {
            let n = rng.range(4, 20) as usize;
            rng.digits(n)
        }
        1 => format!("ORD-{}-{:06}", rng.range(2015, 2026), rng.below(1_000_000)),
        2 => format!(
            "{}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            rng.range(2000, 2026),
            rng.range(1, 12),
            rng.range(1, 28),
            rng.below(24),
            rng.below(60),
            rng.below(60)
        ),
        3 => rng.range(1_000_000_000, 1_900_000_000_000).to_string(),
        4 => format!(
            "{}-{}-4{}-{}{}-{}",
            rng.chars(HEX, 8),
            rng.chars(HEX, 4),
            rng.chars(HEX, 3),
            rng.pick(&["8", "9", "a", "b"]),
            rng.chars(HEX, 3),
            rng.chars(HEX, 12)
        ),
        5 => format!("{}.{}.{}", rng.below(20), rng.below(40), rng.below(200)),
        6 => format!("{}.{:02}", rng.below(10_000), rng.below(100)),
        7 => format!(
            "${},{:03}.{:02}",
            rng.range(1, 999),
            rng.below(1000),
            rng.below(100)
        ),
        8 => format!(
            "978-{}-{}-{}-{}",
            rng.digits(1),
            rng.digits(2),
            rng.digits(6),
            rng.digits(1)
        ),
        9 => {
            let n = *rng.pick(&[32usize, 40, 64]);
            rng.chars(HEX, n)
        }
        10 => format!(
            "{} {} {}",
            rng.pick(WORDS),
            rng.pick(WORDS),
            rng.pick(WORDS)
        ),
        11 => format!("{:05}", rng.below(100_000)),
        12 => format!(
            "{}/{}/{}",
            rng.range(1, 12),
            rng.range(1, 28),
            rng.range(2000, 2026)
        ),
        13 => rng
            .pick(&["true", "false", "NULL", "N/A", "pending", "shipped"])
            .to_string(),
        14 => format!(
            "https://www.example.com/{}/{}?id={}",
            rng.pick(WORDS),
            rng.pick(WORDS),
            rng.below(10_000)
        ),
        15 => format!("/var/lib/{}/{}.log", rng.pick(WORDS), rng.digits(6)),
        16 => {
            let w: String = (0..4)
                .map(|_| {
                    let w = rng.pick(WORDS);
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_uppercase().chain(c).collect::<String>())
                        .unwrap_or_default()
                })
                .collect();
            format!("{w}{}", rng.range(1, 99))
        }
        17 => format!("SKU-{}-{}", rng.chars(UPPER_ALNUM, 6), rng.digits(4)),
        18 => format!(
            "{}x{} {}",
            rng.range(1, 99),
            rng.range(1, 99),
            rng.pick(WORDS)
        ),
        _ => url_encode(&format!("{} {}", rng.pick(WORDS), rng.digits(3))),
    }
}

/// The classes measured on values alone.
pub(crate) const MEASURED: [DataClass; 9] = [
    DataClass::Email,
    DataClass::Phone,
    DataClass::Ssn,
    DataClass::Card,
    DataClass::Iban,
    DataClass::ApiKey,
    DataClass::Jwt,
    DataClass::PasswordHash,
    DataClass::Ip,
];
