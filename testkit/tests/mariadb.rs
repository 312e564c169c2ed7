//! A real MariaDB 10.11 server, driven by real clients.

mod common;

use std::net::TcpStream;
use std::process::Command;

use common::{Netns, output, total_amount};
use custody_testkit::fixtures::{self, BIG_TABLE_ROWS, Shop};
use custody_testkit::{MariaDb, Options, SqlServer};
use mysql_async::prelude::Queryable as _;
use mysql_async::{Conn, Opts};

async fn connect(url: &str) -> Result<Conn, mysql_async::Error> {
    Conn::new(Opts::from_url(url).expect("a valid URL")).await
}

#[tokio::test]
async fn native_password_login_and_the_shop_through_mysql_async() {
    let db = MariaDb::start().unwrap();
    let shop = fixtures::load_shop(&db).unwrap();

    let plugin = db
        .root_sql(&format!(
            "SELECT plugin FROM mysql.user WHERE user = '{}' AND host = '%'",
            db.user()
        ))
        .unwrap();
    assert_eq!(plugin.trim(), "mysql_native_password");
    let wrong = db.url().replace(db.password(), "wrong");
    let err = connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    assert!(err.to_string().contains("Access denied"), "{err}");

    let mut conn = connect(&db.url()).await.unwrap();
    let n: Option<i64> = conn
        .query_first("SELECT COUNT(*) FROM customers")
        .await
        .unwrap();
    assert_eq!(n, Some(shop.customers.len() as i64));
    // A server-side prepared statement (binary protocol).
    for want in [&shop.customers[0], &shop.customers[17]] {
        let got: Option<(String, String, String, String, String)> = conn
            .exec_first(
                "SELECT name, email, phone, ssn, card_number FROM customers WHERE id = ?",
                (want.id,),
            )
            .await
            .unwrap();
        assert_eq!(
            got,
            Some((
                want.name.clone(),
                want.email.clone(),
                want.phone.clone(),
                want.ssn.clone(),
                want.card_number.clone()
            ))
        );
    }
    let total: Option<String> = conn
        .query_first("SELECT CAST(SUM(amount) AS CHAR) FROM orders")
        .await
        .unwrap();
    assert_eq!(total, Some(total_amount()));
    conn.disconnect().await.unwrap();
}

#[tokio::test]
async fn the_big_table_streams_every_row() {
    let db = MariaDb::start().unwrap();
    fixtures::create_big_table(&db, "big").unwrap();
    let mut conn = connect(&db.url()).await.unwrap();
    let rows: Vec<(i64, String, String)> = conn
        .query("SELECT id, email, payload FROM big ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows.len(), BIG_TABLE_ROWS);
    let (id, email, payload) = &rows[BIG_TABLE_ROWS - 1];
    assert_eq!(*id, BIG_TABLE_ROWS as i64);
    assert_eq!(*email, format!("user{BIG_TABLE_ROWS}@example.com"));
    assert_eq!(payload.len(), 100);
    conn.disconnect().await.unwrap();
}

#[test]
fn the_mariadb_client_logs_in_over_tcp_with_the_password() {
    let db = MariaDb::start().unwrap();
    Shop::standard().load(&db).unwrap();
    let out = output(
        Command::new("mariadb")
            .env("MYSQL_PWD", db.password())
            .args(["--no-defaults", "--protocol=TCP", "-h", &db.host()])
            .args(["-P", &db.port().to_string(), "-u", db.user(), db.database()])
            .args(["--batch", "--skip-column-names"])
            .args(["-e", "SELECT SUM(amount) FROM orders"]),
    );
    assert_eq!(out.trim(), total_amount());
    let refused = Command::new("mariadb")
        .env("MYSQL_PWD", "wrong")
        .args(["--no-defaults", "--protocol=TCP", "-h", &db.host()])
        .args([
            "-P",
            &db.port().to_string(),
            "-u",
            db.user(),
            "-e",
            "SELECT 1",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn drop_stops_the_server_and_removes_its_directory() {
    let db = MariaDb::start().unwrap();
    let (dir, addr) = (db.dir().to_owned(), db.addr());
    assert_eq!(db.execute("SELECT 1").unwrap().trim(), "1");
    TcpStream::connect(addr).unwrap();
    drop(db);
    assert!(!dir.exists());
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn a_server_inside_a_network_namespace() {
    let ns = Netns::new("my");
    let db = MariaDb::start_with(Options::default().command_prefix(&ns.prefix())).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.0,
        "mariadb",
        "--no-defaults",
        "--protocol=TCP",
    ])
    .env("MYSQL_PWD", db.password())
    .args([
        "-h",
        "127.0.0.1",
        "-P",
        &db.port().to_string(),
        "-u",
        db.user(),
    ])
    .args([
        "--batch",
        "--skip-column-names",
        "-e",
        "SELECT CURRENT_USER()",
    ]);
    assert_eq!(output(&mut cmd).trim(), format!("{}@%", db.user()));
    assert!(TcpStream::connect(("127.0.0.1", db.port())).is_err());
}
