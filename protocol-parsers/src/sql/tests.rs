use super::*;

/// One line per statement: `kind read:.. write:.. cols:.. set:.. star:..`,
/// empty parts left out; `unparsed` first when the text was not parsed.
fn render(a: &Analysis) -> String {
    fn list<T: ToString>(items: &[T]) -> String {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
    let mut lines = Vec::new();
    for s in &a.statements {
        let mut line = String::new();
        if !a.parsed {
            line.push_str("unparsed ");
        }
        line.push_str(s.kind.as_str());
        for (label, value) in [
            ("read", list(&s.tables_read)),
            ("write", list(&s.tables_written)),
            ("cols", list(&s.columns_read)),
            ("set", list(&s.columns_written)),
        ] {
            if !value.is_empty() {
                line.push_str(&format!(" {label}:{value}"));
            }
        }
        if s.wildcard {
            line.push_str(&format!(" star:{}", list(&s.wildcard_tables)));
        }
        lines.push(line);
    }
    lines.join("\n")
}

#[track_caller]
fn check_dialect(dialect: Dialect, sql: &str, expected: &str) {
    let got = render(&analyze(sql, dialect));
    assert_eq!(got, expected.trim(), "{dialect:?}: {sql}");
}

/// Asserts the same analysis in both dialects.
#[track_caller]
fn check(sql: &str, expected: &str) {
    check_dialect(Dialect::Postgres, sql, expected);
    check_dialect(Dialect::MySql, sql, expected);
}

#[track_caller]
fn check_pg(sql: &str, expected: &str) {
    check_dialect(Dialect::Postgres, sql, expected);
}

#[track_caller]
fn check_my(sql: &str, expected: &str) {
    check_dialect(Dialect::MySql, sql, expected);
}

#[test]
fn point_selects() {
    check(
        "SELECT id, name FROM users WHERE id = 1",
        "select read:users cols:users.id,users.name",
    );
    check(
        "select u.email from users u where u.id = 42",
        "select read:users cols:users.email,users.id",
    );
    check_pg(
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "select read:pgbench_accounts cols:pgbench_accounts.abalance,pgbench_accounts.aid",
    );
    check_my(
        "SELECT abalance FROM pgbench_accounts WHERE aid = ?",
        "select read:pgbench_accounts cols:pgbench_accounts.abalance,pgbench_accounts.aid",
    );
    check("SELECT 1", "select");
    check("SELECT now()", "select");
    check("SELECT count(*) FROM t", "select read:t");
}

#[test]
fn wildcards() {
    check("SELECT * FROM users", "select read:users star:users");
    check(
        "SELECT * FROM a JOIN b ON a.id = b.a_id",
        "select read:a,b cols:a.id,b.a_id star:a,b",
    );
    check(
        "SELECT o.*, c.name FROM orders o JOIN customers c ON c.id = o.customer_id",
        "select read:customers,orders cols:customers.id,customers.name,orders.customer_id star:orders",
    );
    check(
        "SELECT * FROM (SELECT id FROM t) AS s",
        "select read:t cols:t.id star:",
    );
}

#[test]
fn joins_and_schemas() {
    check(
        "SELECT c.name, o.total, p.title FROM shop.customers c \
         JOIN shop.orders o ON o.customer_id = c.id \
         LEFT JOIN shop.products p ON p.id = o.product_id WHERE c.id = 7",
        "select read:shop.customers,shop.orders,shop.products \
         cols:shop.customers.id,shop.customers.name,shop.orders.customer_id,shop.orders.product_id,shop.orders.total,shop.products.id,shop.products.title",
    );
    check(
        "SELECT shop.orders.id FROM shop.orders",
        "select read:shop.orders cols:shop.orders.id",
    );
    // Unqualified columns with two tables in scope stay unqualified.
    check(
        "SELECT name, total FROM a, b WHERE a.id = b.id",
        "select read:a,b cols:name,total,a.id,b.id",
    );
    check("SELECT a.x FROM a CROSS JOIN b", "select read:a,b cols:a.x");
    check(
        "SELECT x FROM a JOIN b USING (id)",
        "select read:a,b cols:id,x",
    );
}

#[test]
fn identifier_case_per_dialect() {
    check_pg(
        r#"SELECT "Email", Name FROM Public."Users""#,
        r#"select read:public.Users cols:public.Users.Email,public.Users.name"#,
    );
    check_my(
        "SELECT `Email`, Name FROM Shop.`Users`",
        "select read:Shop.Users cols:Shop.Users.email,Shop.Users.name",
    );
    check_pg("SELECT ID FROM USERS", "select read:users cols:users.id");
    check_my("SELECT ID FROM USERS", "select read:USERS cols:USERS.id");
}

#[test]
fn subqueries_everywhere() {
    check(
        "SELECT name FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 100)",
        "select read:orders,users cols:orders.total,orders.user_id,users.id,users.name",
    );
    check(
        "SELECT name FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)",
        "select read:orders,users cols:orders.user_id,users.id,users.name",
    );
    check(
        "SELECT (SELECT max(total) FROM orders) AS m FROM users",
        "select read:orders,users cols:orders.total",
    );
    check(
        "SELECT a FROM t1 UNION SELECT b FROM t2 UNION ALL SELECT c FROM t3",
        "select read:t1,t2,t3 cols:t1.a,t2.b,t3.c",
    );
    check(
        "SELECT s.n FROM (SELECT name AS n FROM people) s JOIN pets p ON p.owner = s.n",
        "select read:people,pets cols:n,people.name,pets.owner",
    );
    check(
        "SELECT x FROM a WHERE y > (SELECT avg(y) FROM a) ORDER BY x",
        "select read:a cols:a.x,a.y",
    );
}

#[test]
fn ctes() {
    check(
        "WITH recent AS (SELECT id, user_id FROM orders WHERE created_at > now()) \
         SELECT u.name FROM users u JOIN recent r ON r.user_id = u.id",
        "select read:orders,users cols:user_id,orders.created_at,orders.id,orders.user_id,users.id,users.name",
    );
    check_pg(
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 10) SELECT n FROM t",
        "select cols:n",
    );
    check_pg(
        "WITH moved AS (DELETE FROM queue WHERE id = 1 RETURNING *) INSERT INTO done SELECT * FROM moved",
        "insert write:done,queue cols:queue.id star:queue",
    );
}

#[test]
fn inserts() {
    check(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP)",
        "insert write:pgbench_history set:pgbench_history.aid,pgbench_history.bid,pgbench_history.delta,pgbench_history.mtime,pgbench_history.tid",
    );
    check(
        "INSERT INTO archive (id, email) SELECT id, email FROM users WHERE deleted",
        "insert read:users write:archive cols:users.deleted,users.email,users.id set:archive.email,archive.id",
    );
    check("INSERT INTO t VALUES (1, 'a'), (2, 'b')", "insert write:t");
    check_pg(
        "INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v RETURNING id",
        "insert write:kv cols:kv.id,kv.k,kv.v set:kv.k,kv.v",
    );
    check_my(
        "INSERT INTO kv (k, v) VALUES (?, ?) ON DUPLICATE KEY UPDATE v = VALUES(v)",
        "insert write:kv cols:kv.v set:kv.k,kv.v",
    );
    check_my("REPLACE INTO kv (k) VALUES (1)", "insert write:kv set:kv.k");
    check_my(
        "INSERT INTO t SET a = 1, b = c + 1",
        "insert write:t cols:t.c set:t.a,t.b",
    );
}

#[test]
fn updates() {
    check(
        "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 3",
        "update write:pgbench_accounts cols:pgbench_accounts.abalance,pgbench_accounts.aid set:pgbench_accounts.abalance",
    );
    check_pg(
        "UPDATE orders o SET status = 'paid' FROM payments p WHERE p.order_id = o.id RETURNING o.id",
        "update read:payments write:orders cols:orders.id,payments.order_id set:orders.status",
    );
    check_my(
        "UPDATE orders o JOIN payments p ON p.order_id = o.id SET o.status = 'paid' WHERE p.ok = 1",
        "update read:payments write:orders cols:orders.id,payments.ok,payments.order_id set:orders.status",
    );
    check(
        "UPDATE t SET a = (SELECT max(b) FROM u) WHERE id IN (SELECT id FROM v)",
        "update read:u,v write:t cols:t.id,u.b,v.id set:t.a",
    );
}

#[test]
fn deletes() {
    check(
        "DELETE FROM sessions WHERE expires_at < now()",
        "delete write:sessions cols:sessions.expires_at",
    );
    check_pg(
        "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id AND c.banned",
        "delete read:customers write:orders cols:customers.banned,customers.id,orders.customer_id",
    );
    check_my(
        "DELETE o FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.banned = 1",
        "delete read:customers write:orders cols:customers.banned,customers.id,orders.customer_id",
    );
}

#[test]
fn merge() {
    check_pg(
        "MERGE INTO stock s USING deliveries d ON s.item = d.item \
         WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty \
         WHEN NOT MATCHED THEN INSERT (item, qty) VALUES (d.item, d.qty)",
        "merge read:deliveries write:stock cols:deliveries.item,deliveries.qty,stock.item,stock.qty set:stock.item,stock.qty",
    );
}

#[test]
fn copy() {
    check_pg(
        "COPY users (id, email) TO STDOUT",
        "copy read:users cols:users.email,users.id",
    );
    check_pg("COPY events FROM STDIN", "copy write:events");
    check_pg(
        "COPY (SELECT id FROM users WHERE active) TO STDOUT WITH CSV",
        "copy read:users cols:users.active,users.id",
    );
}

#[test]
fn ddl_and_others() {
    check(
        "CREATE TABLE t (id int PRIMARY KEY, email text)",
        "ddl write:t",
    );
    check("DROP TABLE a, b", "ddl write:a,b");
    check("ALTER TABLE t ADD COLUMN x int", "ddl write:t");
    check("CREATE INDEX i ON t (a)", "ddl write:t");
    check_pg(
        "CREATE TABLE s AS SELECT id FROM t",
        "ddl read:t write:s cols:t.id",
    );
    check(
        "CREATE VIEW v AS SELECT a FROM t",
        "ddl read:t write:v cols:t.a",
    );
    check_pg("TRUNCATE pgbench_history", "ddl write:pgbench_history");
    check("BEGIN", "transaction");
    check("COMMIT", "transaction");
    check("ROLLBACK", "transaction");
    check("SAVEPOINT s1", "transaction");
    check_my("START TRANSACTION", "transaction");
    check_pg("SET application_name = 'x'", "other");
    check_my("SET NAMES utf8mb4", "other");
    check_pg("SHOW search_path", "other");
    check_pg("EXPLAIN ANALYZE SELECT * FROM t", "other read:t star:t");
}

#[test]
fn multiple_statements() {
    check(
        "BEGIN; UPDATE a SET x = 1 WHERE id = 2; SELECT y FROM b; COMMIT;",
        "transaction\nupdate write:a cols:a.id set:a.x\nselect read:b cols:b.y\ntransaction",
    );
}

#[test]
fn pgbench_tpcb() {
    for (sql, expected) in [
        (
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
            "update write:pgbench_accounts cols:pgbench_accounts.abalance,pgbench_accounts.aid set:pgbench_accounts.abalance",
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            "select read:pgbench_accounts cols:pgbench_accounts.abalance,pgbench_accounts.aid",
        ),
        (
            "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
            "update write:pgbench_tellers cols:pgbench_tellers.tbalance,pgbench_tellers.tid set:pgbench_tellers.tbalance",
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
            "insert write:pgbench_history set:pgbench_history.aid,pgbench_history.bid,pgbench_history.delta,pgbench_history.mtime,pgbench_history.tid",
        ),
    ] {
        check_pg(sql, expected);
    }
}

#[test]
fn unparsable_keeps_kind() {
    check_pg("SELECT FROM WHERE (", "unparsed select");
    check("UPDATE ??? garbage", "unparsed update");
    check(
        "/* c */ ( WITH x AS (select 1) DELETE FROM",
        "unparsed delete",
    );
    check("frobnicate the database", "unparsed other");
    let a = analyze("SELEC 1", Dialect::Postgres);
    assert!(!a.parsed);
    assert_eq!(a.unparsed, Some(Unparsed::Syntax));
}

#[test]
fn limits_refuse_before_parsing() {
    let deep = format!("SELECT {}1{}", "(".repeat(200), ")".repeat(200));
    let a = analyze(&deep, Dialect::Postgres);
    assert_eq!(a.unparsed, Some(Unparsed::TooDeep));
    assert_eq!(a.statements[0].kind, StatementKind::Select);

    let long_chain = format!("SELECT 1{}", " + x".repeat(5_000));
    let a = analyze(&long_chain, Dialect::MySql);
    assert_eq!(a.unparsed, Some(Unparsed::TooComplex));

    let huge = format!("SELECT '{}'", "a".repeat(MAX_PARSE_BYTES));
    let a = analyze(&huge, Dialect::Postgres);
    assert_eq!(a.unparsed, Some(Unparsed::TooLong));
    assert_eq!(a.normalized, "select ?");

    // Just under the limits still parses.
    let ok = format!("SELECT {}x{} FROM t", "(".repeat(60), ")".repeat(60));
    assert!(analyze(&ok, Dialect::Postgres).parsed);
    let chain = format!("SELECT x{} FROM t", " + x".repeat(900));
    assert!(analyze(&chain, Dialect::Postgres).parsed);
}

// ---- fingerprints ----

#[track_caller]
fn check_norm(dialect: Dialect, sql: &str, expected: &str) {
    assert_eq!(fingerprint(sql, dialect).normalized, expected, "{sql}");
}

#[test]
fn normalization() {
    use Dialect::{MySql, Postgres};
    for d in [Postgres, MySql] {
        check_norm(
            d,
            "SELECT a FROM t WHERE id = 42",
            "select a from t where id = ?",
        );
        check_norm(
            d,
            "select   a\n\tFROM t where id=42;",
            "select a from t where id = ?",
        );
        check_norm(
            d,
            "SELECT * FROM t WHERE id IN (1, 2, 3)",
            "select * from t where id in (?)",
        );
        check_norm(
            d,
            "SELECT * FROM t WHERE id IN (7)",
            "select * from t where id in (?)",
        );
        check_norm(
            d,
            "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z')",
            "insert into t(a, b) values (?)",
        );
        check_norm(
            d,
            "SELECT t.a, f(b, 1.5e-3) FROM s.t",
            "select t.a, f(b, ?) from s.t",
        );
        check_norm(d, "SELECT -1, x - 1, 2 * -3.5", "select ?, x - ?, ? * ?");
        check_norm(d, "select 1 -- trailing\n", "select ?");
        check_norm(d, "select /* c */ 1 /* traceparent='00-ab' */", "select ?");
        check_norm(d, "SELECT 1; SELECT 2;", "select ?; select ?");
        check_norm(d, "SELECT X'0F', 0x1F, .5", "select ?, ?, ?");
        check_norm(
            d,
            "SELECT a FROM t LIMIT 10 OFFSET 20",
            "select a from t limit ? offset ?",
        );
    }
    // PostgreSQL specifics.
    check_norm(Postgres, "SELECT $1, $22 FROM T", "select ?, ? from t");
    check_norm(
        Postgres,
        "SELECT 'it''s', E'a\\'b', $$x'y$$, $fn$ $$ $fn$",
        "select ?, ?, ?, ?",
    );
    check_norm(
        Postgres,
        r#"SELECT "Mixed""Case" FROM "T""#,
        r#"select "Mixed""Case" from "T""#,
    );
    check_norm(
        Postgres,
        "select 1 /* outer /* nested */ still */ + 2",
        "select ? + ?",
    );
    check_norm(
        Postgres,
        "SELECT a::text, b[1] FROM t",
        "select a::text, b[?] from t",
    );
    check_norm(
        Postgres,
        "SELECT U&'d\\0061t' , B'101', N'x'",
        "select ?, ?, ?",
    );
    // MySQL specifics.
    check_norm(
        MySql,
        "SELECT \"str\", 'it\\'s', `Col` FROM `T`",
        "select ?, ?, `Col` from `T`",
    );
    check_norm(MySql, "SELECT 1 # hash comment\n", "select ?");
    check_norm(MySql, "/*!40101 SET NAMES utf8 */", "set NAMES utf8");
    check_norm(
        MySql,
        "SELECT /*+ MAX_EXECUTION_TIME(1000) */ a FROM t",
        "select a from t",
    );
    check_norm(
        MySql,
        "SELECT ?, _utf8mb4'x' FROM Users",
        "select ?, ? from Users",
    );
    check_norm(MySql, "SELECT 1--1", "select ? - ?");
}

#[test]
fn same_shape_same_fingerprint() {
    for d in [Dialect::Postgres, Dialect::MySql] {
        let a = fingerprint("SELECT * FROM users WHERE id = 1 AND name = 'bob'", d);
        let b = fingerprint("select *  from USERS where ID=99 and NAME='alice' -- x", d);
        if d == Dialect::Postgres {
            assert_eq!(a, b);
        } else {
            // MySQL table names are case-sensitive: USERS is another table.
            assert_ne!(a, b);
        }
        let c = fingerprint("SELECT * FROM users WHERE id = 2 AND name = 'x'", d);
        assert_eq!(a, c);
        let other = fingerprint("SELECT * FROM users WHERE id = 2 OR name = 'x'", d);
        assert_ne!(a.hash, other.hash);
    }
    let pg = fingerprint("SELECT 1", Dialect::Postgres);
    let my = fingerprint("SELECT 1", Dialect::MySql);
    assert_eq!(pg.normalized, my.normalized);
    assert_ne!(pg.hash, my.hash);
}

#[test]
fn fingerprint_is_stable() {
    // The hash is part of exported data: it must not change between builds.
    let f = fingerprint("SELECT a FROM t WHERE id = $1", Dialect::Postgres);
    assert_eq!(f.normalized, "select a from t where id = ?");
    assert_eq!(
        f.hash,
        hash64(Dialect::Postgres.seed(), f.normalized.as_bytes())
    );
    assert_eq!(hash64(0, b""), hash64(0, b""));
    assert_ne!(hash64(0, b"a"), hash64(0, b"b"));
    assert_ne!(hash64(0, b"12345678a"), hash64(0, b"12345678b"));
}

#[test]
fn unterminated_tokens_do_not_panic() {
    for sql in [
        "SELECT 'abc",
        "SELECT \"abc",
        "SELECT $$abc",
        "SELECT $a$ x",
        "SELECT /* x",
        "SELECT `x",
        "SELECT E'\\",
        "é",
        "SELECT 'é'",
        "$",
        "$1",
        "-",
        "--",
        "/*!",
        "/*!123",
        "U&",
        "X'",
    ] {
        for d in [Dialect::Postgres, Dialect::MySql] {
            let _ = analyze(sql, d);
        }
    }
}

// ---- the cache ----

#[test]
fn analyzer_caches_by_shape() {
    let analyzer = Analyzer::new(&AnalyzerConfig::default()).unwrap();
    let a = analyzer.analyze("SELECT name FROM users WHERE id = 1", Dialect::Postgres);
    let b = analyzer.analyze("SELECT name FROM users WHERE id = 2", Dialect::Postgres);
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(analyzer.len(), 1);
    let c = analyzer.analyze("SELECT name FROM users WHERE id = 2", Dialect::MySql);
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(analyzer.len(), 2);
    assert_eq!(render(&a), "select read:users cols:users.id,users.name");
}

#[test]
fn analyzer_without_cache() {
    let analyzer = Analyzer::new(&AnalyzerConfig {
        cache_entries: 0,
        cache_bytes: 0,
    })
    .unwrap();
    let a = analyzer.analyze("SELECT 1", Dialect::Postgres);
    let b = analyzer.analyze("SELECT 1", Dialect::Postgres);
    assert!(!Arc::ptr_eq(&a, &b));
    assert_eq!(a, b);
    assert!(analyzer.is_empty());
}

#[test]
fn analyzer_config_errors_name_the_field() {
    let err = Analyzer::new(&AnalyzerConfig {
        cache_entries: 10,
        cache_bytes: 0,
    })
    .unwrap_err();
    assert!(err.to_string().starts_with("cache_bytes"));
    let err = Analyzer::new(&AnalyzerConfig {
        cache_entries: usize::MAX,
        cache_bytes: 1,
    })
    .unwrap_err();
    assert!(err.to_string().starts_with("cache_entries"));
}

#[test]
fn analyzer_stays_bounded() {
    let analyzer = Analyzer::new(&AnalyzerConfig {
        cache_entries: 100,
        cache_bytes: 64 << 10,
    })
    .unwrap();
    for i in 0..2_000 {
        let sql = format!("SELECT c{i} FROM t{i}");
        let a = analyzer.analyze(&sql, Dialect::Postgres);
        assert_eq!(
            a.statements[0].tables_read,
            vec![TableName::new(format!("t{i}"))]
        );
    }
    assert!(analyzer.len() < 2_000);
}

#[test]
fn keyword_table_is_sorted() {
    // `is_keyword` binary-searches it.
    assert!(fingerprint::KEYWORDS.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn worst_accepted_inputs_fit_a_worker_stack() {
    // Inputs just under the limits, analyzed on a thread with a 2 MiB stack
    // (the default of Rust and tokio worker threads), in a debug build.
    let inputs = [
        format!(
            "SELECT x{} FROM t",
            " + x".repeat(MAX_PARSE_OPERATORS as usize - 2)
        ),
        format!("SELECT x FROM t WHERE {}", vec!["a = 1"; 300].join(" OR ")),
        format!("SELECT {}x{} FROM t", "(".repeat(60), ")".repeat(60)),
        format!(
            "SELECT a FROM t WHERE id IN {}(1){}",
            "(SELECT id FROM t WHERE id IN ".repeat(60),
            ")".repeat(60)
        ),
        format!(
            "SELECT {}",
            "CASE WHEN a THEN ".repeat(100) + "1" + &" END".repeat(100)
        ),
        format!("SELECT {}1", "NOT ".repeat(500)),
        format!("SELECT {}1", "- ".repeat(500)),
        format!("SELECT x{} FROM t", "::int".repeat(900)),
    ];
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            inputs
                .iter()
                .map(|sql| {
                    let pg = analyze(sql, Dialect::Postgres);
                    let my = analyze(sql, Dialect::MySql);
                    (pg.parsed, my.parsed)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let parsed = handle.join().expect("no stack overflow");
    assert!(
        parsed[0].0 && parsed[1].0 && parsed[2].0 && parsed[3].0,
        "{parsed:?}"
    );
}

#[test]
fn more_select_shapes() {
    check(
        "SELECT DISTINCT status, count(*) FROM orders GROUP BY status HAVING count(*) > 1 ORDER BY status",
        "select read:orders cols:orders.status",
    );
    check(
        "SELECT name AS n FROM users ORDER BY n",
        "select read:users cols:users.name",
    );
    check(
        "SELECT id, row_number() OVER (PARTITION BY team ORDER BY score DESC) FROM players",
        "select read:players cols:players.id,players.score,players.team",
    );
    check(
        "SELECT CASE WHEN age > 18 THEN 'adult' ELSE kind END FROM people WHERE email IS NOT NULL AND name LIKE 'A%'",
        "select read:people cols:people.age,people.email,people.kind,people.name",
    );
    check(
        "SELECT a FROM t1 INTERSECT SELECT a FROM t2 EXCEPT SELECT a FROM t3",
        "select read:t1,t2,t3 cols:t1.a,t2.a,t3.a",
    );
    check(
        "SELECT id FROM jobs WHERE state = 'ready' LIMIT 1 FOR UPDATE SKIP LOCKED",
        "select read:jobs cols:jobs.id,jobs.state",
    );
    check(
        "SELECT a.x, c.z FROM (a JOIN b ON a.id = b.id) JOIN c ON c.id = b.id",
        "select read:a,b,c cols:a.id,a.x,b.id,c.id,c.z",
    );
    check_pg("SELECT g FROM generate_series(1, 10) AS g", "select cols:g");
    check_pg(
        "SELECT u.id, l.total FROM users u, LATERAL (SELECT sum(amount) AS total FROM payments p WHERE p.user_id = u.id) l",
        "select read:payments,users cols:total,payments.amount,payments.user_id,users.id",
    );
    check_my(
        "SELECT id FROM t ORDER BY id LIMIT ?, ?",
        "select read:t cols:t.id",
    );
    check_pg(
        "SELECT * INTO backup_users FROM users",
        "select read:users write:backup_users star:users",
    );
    check_pg("TABLE accounts", "unparsed select");
}

#[test]
fn more_dml_shapes() {
    check(
        "INSERT INTO t (a, b) VALUES (DEFAULT, 1)",
        "insert write:t set:t.a,t.b",
    );
    check_pg(
        "DELETE FROM sessions WHERE user_id IN (SELECT id FROM users WHERE banned) RETURNING *",
        "delete read:users write:sessions cols:sessions.user_id,users.banned,users.id star:sessions",
    );
    check_pg(
        "UPDATE accounts SET (a, b) = (1, 2) WHERE id = 3",
        "update write:accounts cols:accounts.id set:accounts.a,accounts.b",
    );
    check_my(
        "UPDATE t SET a = 1 ORDER BY id LIMIT 10",
        "update write:t cols:t.id set:t.a",
    );
    check_my(
        "DELETE FROM t WHERE created < NOW() ORDER BY created LIMIT 100",
        "delete write:t cols:t.created",
    );
    check_pg(
        "INSERT INTO events (payload) SELECT to_jsonb(o) FROM orders o",
        "insert read:orders write:events set:events.payload star:orders",
    );
}
