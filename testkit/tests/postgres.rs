//! A real PostgreSQL 15 cluster, driven by real clients.

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::{Netns, output, total_amount};
use custody_testkit::fixtures::{self, BIG_TABLE_ROWS, Shop};
use custody_testkit::{Options, Postgres, SqlServer};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test]
async fn scram_login_and_the_shop_through_tokio_postgres() {
    let pg = Postgres::start().unwrap();
    let shop = fixtures::load_shop(&pg).unwrap();

    // Password authentication over TCP is SCRAM: the stored verifier says so.
    let stored = pg
        .superuser_sql(&format!(
            "SELECT substr(rolpassword, 1, 14) FROM pg_authid WHERE rolname = '{}'",
            pg.user()
        ))
        .unwrap();
    assert_eq!(stored.trim(), "SCRAM-SHA-256$");
    let wrong = pg.conninfo().replace(pg.password(), "wrong");
    let err = connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");

    let client = connect(&pg.conninfo()).await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, shop.customers.len() as i64);
    // Extended protocol with a parameter: the row matches the generator.
    let stmt = client
        .prepare("SELECT name, email, phone, ssn, card_number FROM customers WHERE id = $1")
        .await
        .unwrap();
    for want in [&shop.customers[0], &shop.customers[17]] {
        let row = client.query_one(&stmt, &[&want.id]).await.unwrap();
        let got: (String, String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            got,
            (
                want.name.clone(),
                want.email.clone(),
                want.phone.clone(),
                want.ssn.clone(),
                want.card_number.clone()
            )
        );
    }
    let total: String = client
        .query_one("SELECT sum(amount)::text FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, total_amount());
    // The URL form works too.
    let by_url = connect(&pg.url()).await.unwrap();
    let db: String = by_url
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, pg.database());
}

#[tokio::test]
async fn the_big_table_streams_every_row() {
    let pg = Postgres::start().unwrap();
    fixtures::create_big_table(&pg, "big").unwrap();
    let client = connect(&pg.conninfo()).await.unwrap();
    let rows = client
        .query("SELECT id, email, payload FROM big ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), BIG_TABLE_ROWS);
    let last = &rows[BIG_TABLE_ROWS - 1];
    assert_eq!(last.get::<_, i64>(0), BIG_TABLE_ROWS as i64);
    assert_eq!(
        last.get::<_, String>(1),
        format!("user{BIG_TABLE_ROWS}@example.com")
    );
    assert_eq!(last.get::<_, String>(2).len(), 100);
}

#[test]
fn psql_logs_in_over_tcp_with_the_password() {
    let pg = Postgres::start().unwrap();
    Shop::standard().load(&pg).unwrap();
    let out = output(
        Command::new(pg.bin_dir().join("psql"))
            .env("PGPASSWORD", pg.password())
            .args(["-h", &pg.host(), "-p", &pg.port().to_string()])
            .args(["-U", pg.user(), "-d", pg.database(), "-X", "-A", "-t"])
            .args(["-c", "SELECT sum(amount) FROM orders"]),
    );
    assert_eq!(out.trim(), total_amount());
    let refused = Command::new(pg.bin_dir().join("psql"))
        .env("PGPASSWORD", "wrong")
        .args(["-h", &pg.host(), "-p", &pg.port().to_string()])
        .args(["-U", pg.user(), "-d", pg.database(), "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn drop_stops_the_server_and_removes_its_directory() {
    let pg = Postgres::start().unwrap();
    let (dir, addr) = (pg.dir().to_owned(), pg.addr());
    assert_eq!(pg.execute("SELECT 1").unwrap().trim(), "1");
    TcpStream::connect(addr).unwrap();
    drop(pg);
    assert!(!dir.exists());
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn a_cluster_of_a_killed_run_is_removed_as_stale() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_custody-testdb"))
        .arg("postgres")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vars = std::collections::HashMap::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "DB_READY=1" {
            break;
        }
        let (k, v) = line.split_once('=').unwrap();
        vars.insert(k.to_owned(), v.trim_matches('\'').to_owned());
    }
    let dir = std::path::PathBuf::from(&vars["DB_SOCKET"]);
    let pid_file = dir.join("data/postmaster.pid");
    let postmaster: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The owner dies without cleaning up. (Any start in this process also
    // removes stale servers, so the check runs after an explicit call.)
    child.kill().unwrap();
    child.wait().unwrap();

    custody_testkit::remove_stale();
    assert!(!dir.exists());
    // The postmaster is gone (reaped by init, maybe not instantly).
    let gone = (0..100).any(|_| {
        let stat = std::fs::read_to_string(format!("/proc/{postmaster}/stat")).unwrap_or_default();
        let running = stat
            .rsplit_once(") ")
            .is_some_and(|(_, s)| !s.starts_with('Z'));
        if running {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        !running
    });
    assert!(gone, "postmaster {postmaster} still runs");
}

#[test]
fn a_cluster_inside_a_network_namespace() {
    let ns = Netns::new("pg");
    let pg = Postgres::start_with(Options::default().command_prefix(&ns.prefix())).unwrap();
    // Reachable from inside the namespace over TCP with the password...
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(pg.bin_dir().join("psql"))
        .env("PGPASSWORD", pg.password())
        .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", pg.user(), "-d", pg.database(), "-X", "-A", "-t"])
        .args(["-c", "SELECT inet_server_addr()"]);
    assert_eq!(output(&mut cmd).trim(), "127.0.0.1");
    // ...and not from the host's loopback.
    assert!(TcpStream::connect(("127.0.0.1", pg.port())).is_err());
}
