//! The "shop" schema and deterministic fake data, for both dialects.
//!
//! `customers(id, name, email, phone, ssn, card_number)` and
//! `orders(id, customer_id, item, amount)`. The values look real to a
//! classifier: emails at the reserved `example.*` domains, US phone numbers
//! `(NXX) NXX-XXXX`, SSNs `ddd-dd-dddd` in issued ranges, and Luhn-valid
//! 16-digit card numbers in the Visa (`4`) and Mastercard (`51`–`55`) ranges.
//! The same seed always gives the same rows.

use crate::{Error, SqlServer};

/// Which SQL a statement is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MySQL and MariaDB.
    MySql,
}

/// One customer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Customer {
    /// Primary key, from 1.
    pub id: i64,
    /// Full name.
    pub name: String,
    /// Email address.
    pub email: String,
    /// US phone number, `(NXX) NXX-XXXX`.
    pub phone: String,
    /// Social Security number, `ddd-dd-dddd`.
    pub ssn: String,
    /// Card number, 16 digits, Luhn-valid.
    pub card_number: String,
}

/// One order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// Primary key, from 1.
    pub id: i64,
    /// The customer who placed it.
    pub customer_id: i64,
    /// What was bought.
    pub item: String,
    /// The amount in cents (the column is `NUMERIC(10,2)` / `DECIMAL(10,2)`).
    pub amount_cents: i64,
}

/// The whole data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shop {
    /// Customers, by id.
    pub customers: Vec<Customer>,
    /// Orders, by id.
    pub orders: Vec<Order>,
}

/// Customers in [`Shop::standard`].
pub const STANDARD_CUSTOMERS: usize = 50;
/// Orders in [`Shop::standard`].
pub const STANDARD_ORDERS: usize = 200;
/// Rows of the table [`create_big_table`] makes.
pub const BIG_TABLE_ROWS: usize = 100_000;

const FIRST: [&str; 16] = [
    "Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
    "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
];
const LAST: [&str; 12] = [
    "Anderson", "Brown", "Chen", "Diaz", "Evans", "Garcia", "Hughes", "Kim", "Lopez", "Miller",
    "Nguyen", "Patel",
];
const DOMAINS: [&str; 3] = ["example.com", "example.org", "example.net"];
const AREA_CODES: [u32; 8] = [212, 312, 415, 617, 646, 702, 206, 303];
const ITEMS: [&str; 8] = [
    "notebook",
    "pen set",
    "desk lamp",
    "backpack",
    "headphones",
    "coffee mug",
    "usb cable",
    "monitor stand",
];

/// SplitMix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + u32::try_from(self.next() % u64::from(hi - lo + 1)).unwrap_or(0)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.range(0, items.len() as u32 - 1) as usize]
    }
}

/// The Luhn check digit that completes `digits` (ASCII digits).
pub fn luhn_check_digit(digits: &str) -> u8 {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    b'0' + u8::try_from((10 - sum % 10) % 10).unwrap_or(0)
}

/// Whether `number` (ASCII digits) passes the Luhn check.
pub fn luhn_valid(number: &str) -> bool {
    match number.len().checked_sub(1) {
        Some(n) if n > 0 && number.bytes().all(|b| b.is_ascii_digit()) => {
            number.as_bytes()[n] == luhn_check_digit(&number[..n])
        }
        _ => false,
    }
}

fn card(rng: &mut Rng) -> String {
    let mut n = if rng.next().is_multiple_of(2) {
        "4".to_owned()
    } else {
        rng.range(51, 55).to_string()
    };
    while n.len() < 15 {
        n.push(char::from(b'0' + rng.range(0, 9) as u8));
    }
    let check = luhn_check_digit(&n);
    n.push(char::from(check));
    n
}

fn ssn(rng: &mut Rng) -> String {
    let area = loop {
        let a = rng.range(1, 899);
        if a != 666 {
            break a;
        }
    };
    format!(
        "{area:03}-{:02}-{:04}",
        rng.range(1, 99),
        rng.range(1, 9999)
    )
}

fn phone(rng: &mut Rng) -> String {
    let area = AREA_CODES[rng.range(0, AREA_CODES.len() as u32 - 1) as usize];
    format!("({area}) {}-{:04}", rng.range(201, 989), rng.range(0, 9999))
}

impl Shop {
    /// `customers` customers and `orders` orders from `seed`.
    pub fn generate(customers: usize, orders: usize, seed: u64) -> Shop {
        let mut rng = Rng(seed);
        let customers: Vec<Customer> = (1..=customers as i64)
            .map(|id| {
                let first = rng.pick(&FIRST);
                let last = rng.pick(&LAST);
                Customer {
                    id,
                    name: format!("{first} {last}"),
                    email: format!(
                        "{}.{}{id}@{}",
                        first.to_lowercase(),
                        last.to_lowercase(),
                        rng.pick(&DOMAINS)
                    ),
                    phone: phone(&mut rng),
                    ssn: ssn(&mut rng),
                    card_number: card(&mut rng),
                }
            })
            .collect();
        let n = customers.len().max(1) as u32;
        let orders = (1..=orders as i64)
            .map(|id| Order {
                id,
                customer_id: i64::from(rng.range(1, n)),
                item: rng.pick(&ITEMS).to_owned(),
                amount_cents: i64::from(rng.range(199, 49_999)),
            })
            .collect();
        Shop { customers, orders }
    }

    /// The data set tests share: [`STANDARD_CUSTOMERS`] customers and
    /// [`STANDARD_ORDERS`] orders.
    pub fn standard() -> Shop {
        Shop::generate(STANDARD_CUSTOMERS, STANDARD_ORDERS, 0x5eed_c0ff_ee00_0001)
    }

    /// `CREATE TABLE` for both tables (dropping earlier ones).
    pub fn schema_sql(dialect: Dialect) -> String {
        let serial = match dialect {
            Dialect::Postgres => "BIGINT PRIMARY KEY",
            Dialect::MySql => "BIGINT NOT NULL PRIMARY KEY",
        };
        format!(
            "DROP TABLE IF EXISTS orders;\n\
             DROP TABLE IF EXISTS customers;\n\
             CREATE TABLE customers (\n  id {serial},\n  name VARCHAR(100) NOT NULL,\n  \
             email VARCHAR(200) NOT NULL,\n  phone VARCHAR(20) NOT NULL,\n  ssn CHAR(11) NOT NULL,\n  \
             card_number VARCHAR(19) NOT NULL\n);\n\
             CREATE TABLE orders (\n  id {serial},\n  \
             customer_id BIGINT NOT NULL REFERENCES customers (id),\n  \
             item VARCHAR(100) NOT NULL,\n  amount NUMERIC(10,2) NOT NULL\n);\n\
             CREATE INDEX orders_customer ON orders (customer_id);\n"
        )
    }

    /// `INSERT` statements for every row (the same text for both dialects).
    pub fn insert_sql(&self) -> String {
        let mut sql = String::from(
            "INSERT INTO customers (id, name, email, phone, ssn, card_number) VALUES\n",
        );
        let rows: Vec<String> = self
            .customers
            .iter()
            .map(|c| {
                format!(
                    "({}, '{}', '{}', '{}', '{}', '{}')",
                    c.id, c.name, c.email, c.phone, c.ssn, c.card_number
                )
            })
            .collect();
        sql.push_str(&rows.join(",\n"));
        sql.push_str(";\n");
        if !self.orders.is_empty() {
            sql.push_str("INSERT INTO orders (id, customer_id, item, amount) VALUES\n");
            let rows: Vec<String> = self
                .orders
                .iter()
                .map(|o| {
                    format!(
                        "({}, {}, '{}', {}.{:02})",
                        o.id,
                        o.customer_id,
                        o.item,
                        o.amount_cents / 100,
                        o.amount_cents % 100
                    )
                })
                .collect();
            sql.push_str(&rows.join(",\n"));
            sql.push_str(";\n");
        }
        sql
    }

    /// Creates the tables in `db` and inserts this data set.
    pub fn load(&self, db: &impl SqlServer) -> Result<(), Error> {
        let mut sql = Shop::schema_sql(db.dialect());
        sql.push_str(&self.insert_sql());
        db.execute(&sql).map(drop)
    }
}

/// Creates the shop tables in `db` with [`Shop::standard`] and returns it.
pub fn load_shop(db: &impl SqlServer) -> Result<Shop, Error> {
    let shop = Shop::standard();
    shop.load(db)?;
    Ok(shop)
}

/// Creates `name(id, email, payload)` with [`BIG_TABLE_ROWS`] rows: `id` from
/// 1, `email` `user<id>@example.com`, `payload` 100 characters derived from
/// the id. For result sets larger than any buffer.
pub fn create_big_table(db: &impl SqlServer, name: &str) -> Result<(), Error> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(Error::InvalidOption(format!("table name `{name}`")));
    }
    let n = BIG_TABLE_ROWS;
    let sql = match db.dialect() {
        Dialect::Postgres => format!(
            "DROP TABLE IF EXISTS {name};\n\
             CREATE TABLE {name} (id BIGINT PRIMARY KEY, email TEXT NOT NULL, payload TEXT NOT NULL);\n\
             INSERT INTO {name} SELECT g, 'user' || g || '@example.com', \
             rpad(md5(g::text), 100, md5(g::text)) FROM generate_series(1, {n}) AS g;\n\
             ANALYZE {name};\n"
        ),
        Dialect::MySql => format!(
            "DROP TABLE IF EXISTS {name};\n\
             CREATE TABLE {name} (id BIGINT NOT NULL PRIMARY KEY, email VARCHAR(64) NOT NULL, payload VARCHAR(100) NOT NULL);\n\
             INSERT INTO {name} SELECT seq, CONCAT('user', seq, '@example.com'), \
             RPAD(MD5(seq), 100, MD5(seq)) FROM seq_1_to_{n};\n\
             ANALYZE TABLE {name};\n"
        ),
    };
    db.execute(&sql).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_rows() {
        assert_eq!(Shop::standard(), Shop::standard());
        assert_ne!(Shop::generate(5, 5, 1), Shop::generate(5, 5, 2));
    }

    #[test]
    fn luhn() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("5500005555555559"));
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid("4"));
        assert!(!luhn_valid("41x1"));
    }

    #[test]
    fn values_have_the_promised_shapes() {
        let shop = Shop::standard();
        assert_eq!(shop.customers.len(), STANDARD_CUSTOMERS);
        assert_eq!(shop.orders.len(), STANDARD_ORDERS);
        for c in &shop.customers {
            assert!(luhn_valid(&c.card_number), "{}", c.card_number);
            assert_eq!(c.card_number.len(), 16);
            let p2: u32 = c.card_number[..2].parse().unwrap();
            assert!(c.card_number.starts_with('4') || (51..=55).contains(&p2));
            let ssn = c.ssn.as_bytes();
            assert_eq!((ssn.len(), ssn[3], ssn[6]), (11, b'-', b'-'), "{}", c.ssn);
            assert!(
                !c.ssn.starts_with("000") && !c.ssn.starts_with("666") && !c.ssn.starts_with('9')
            );
            assert!(c.email.contains("@example."));
            assert_eq!(c.phone.len(), 14, "{}", c.phone);
        }
        for o in &shop.orders {
            assert!((1..=STANDARD_CUSTOMERS as i64).contains(&o.customer_id));
        }
    }
}
