//! Sessions captured from MariaDB 10.11 (see `testdata/README.md`).

use super::support::{Log, replay, replay_with, schedule};
use crate::mysql::{CommandKind, Phase};

const CLI: (&[u8], &[u8]) = (
    include_bytes!("../../../testdata/mysql_cli.client.bin"),
    include_bytes!("../../../testdata/mysql_cli.server.bin"),
);
const PREPARED: (&[u8], &[u8]) = (
    include_bytes!("../../../testdata/mysql_prepared.client.bin"),
    include_bytes!("../../../testdata/mysql_prepared.server.bin"),
);
const ROWS: (&[u8], &[u8]) = (
    include_bytes!("../../../testdata/mysql_rows.client.bin"),
    include_bytes!("../../../testdata/mysql_rows.server.bin"),
);

/// Feeds a capture whole, then with every chunk split in two at each byte
/// boundary, then one byte at a time: the log must never change.
fn check_splits(capture: (&[u8], &[u8]), stride: usize) -> Log {
    let (c, s) = capture;
    let sched = schedule(c, s);
    let (whole, _, error) = replay(c, s, &sched);
    assert_eq!(error, None);
    let total: usize = sched.iter().map(|(_, r)| r.len()).sum();
    let mut global = 0;
    let starts: Vec<usize> = sched
        .iter()
        .map(|(_, r)| {
            let at = global;
            global += r.len();
            at
        })
        .collect();
    let mut cut_at = 1;
    while cut_at < total {
        let (log, _, _) = replay_with(c, s, &sched, |i, n| {
            let start = starts[i];
            if cut_at > start && cut_at < start + n {
                vec![cut_at - start, n - (cut_at - start)]
            } else {
                vec![n]
            }
        });
        assert_eq!(log.lines, whole.lines, "split at byte {cut_at}");
        cut_at += if cut_at < 1024 || total - cut_at < 1024 {
            1
        } else {
            stride
        };
    }
    let (bytewise, _, _) = replay_with(c, s, &sched, |_, n| vec![1; n]);
    assert_eq!(bytewise.lines, whole.lines, "one byte at a time");
    // Whole directions glued across chunk borders: pairs of scheduled chunks fed at once
    // where they come from the same direction.
    whole
}

/// SQL, statement id, rows, affected rows, error code.
type Summary<'a> = (&'a str, Option<u32>, u64, u64, Option<u16>);

fn queries(log: &Log) -> Vec<Summary<'_>> {
    log.queries
        .iter()
        .map(|q| {
            (
                q.sql.as_deref().unwrap_or(""),
                q.statement_id,
                q.rows,
                q.affected_rows,
                q.error.as_ref().map(|e| e.code),
            )
        })
        .collect()
}

#[test]
fn mariadb_cli_session() {
    let log = check_splits(CLI, 1);
    let (c, s) = CLI;
    let (_, session, _) = replay(c, s, &schedule(c, s));
    let login = session.login().expect("login seen");
    assert_eq!(&*login.user, "cap");
    assert_eq!(login.database.as_deref(), Some("shop"));
    assert_eq!(login.auth_plugin.as_deref(), Some("mysql_native_password"));
    assert_eq!(login.auth_response_len, 20);
    let attr = |k: &str| {
        login
            .attributes
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(attr("program_name"), Some("mysql"));
    assert_eq!(attr("_client_name"), Some("libmariadb"));
    let greeting = session.greeting().expect("greeting seen");
    assert!(
        greeting.server_version.contains("MariaDB"),
        "{}",
        greeting.server_version
    );
    assert_eq!(greeting.auth_plugin, "mysql_native_password");
    assert_eq!(session.phase(), Phase::Command);
    assert_eq!(session.database(), Some("shop"));
    let q = queries(&log);
    assert_eq!(
        q,
        vec![
            (
                "SELECT id, name, email FROM customers ORDER BY id",
                None,
                2,
                0,
                None
            ),
            ("SELECT * FROM no_such_table", None, 0, 0, Some(1146)),
            ("SELECT DATABASE()", None, 1, 0, None),
            ("", None, 0, 0, None),
            ("SELECT DATABASE()", None, 1, 0, None),
            ("SELECT DATABASE()", None, 1, 0, None),
            ("", None, 0, 0, None),
            (
                "INSERT INTO customers (name, email, phone) VALUES ('Carol Example', 'carol@example.net', '+1 555 0102')",
                None,
                0,
                1,
                None
            ),
            (
                "UPDATE customers SET note = 'new' WHERE id = 3",
                None,
                0,
                1,
                None
            ),
            ("CALL two_results()", None, 4, 0, None),
            ("DELETE FROM customers WHERE id = 3", None, 0, 1, None),
        ]
    );
    let error = log.queries[1].error.as_ref().expect("error");
    assert_eq!(error.sql_state.as_deref(), Some("42S02"));
    assert!(error.message.contains("no_such_table"));
    // COM_INIT_DB moved the current database, and the records say where each query ran.
    assert_eq!(log.queries[3].command, CommandKind::InitDb);
    assert_eq!(log.queries[4].database.as_deref(), Some("mysql"));
    assert_eq!(log.queries[7].database.as_deref(), Some("shop"));
    assert_eq!(log.queries[7].last_insert_id, 3);
    // CALL: two result sets and the final OK.
    let call = &log.queries[9];
    assert_eq!(call.result_sets, 3);
    let names: Vec<Vec<&str>> = call
        .results
        .iter()
        .map(|r| r.columns.iter().map(|c| c.name.as_str()).collect())
        .collect();
    assert_eq!(names, vec![vec!["id", "name"], vec!["n"], vec![]]);
    assert_eq!(
        call.results.iter().map(|r| r.rows).collect::<Vec<_>>(),
        vec![3, 1, 0]
    );
    let first = &log.queries[0];
    assert_eq!(
        first.column_names().collect::<Vec<_>>(),
        vec!["id", "name", "email"]
    );
    let col = &first.results[0].columns[2];
    assert_eq!(
        (
            col.schema.as_str(),
            col.org_table.as_str(),
            col.org_name.as_str()
        ),
        ("shop", "customers", "email")
    );
    assert!(log.lines.contains(
        &r#"row len=34 trunc=false ["1", "Alice Example", "alice@example.com"]"#.to_owned()
    ));
    assert!(log.lines.last().is_some_and(|l| l.contains("Quit")));
}

#[test]
fn prepared_statement_session() {
    let log = check_splits(PREPARED, 1);
    let (c, s) = PREPARED;
    let (_, session, _) = replay(c, s, &schedule(c, s));
    let login = session.login().expect("login seen");
    let attr = |k: &str| {
        login
            .attributes
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(attr("app"), Some("billing"));
    assert_eq!(
        attr("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(attr("_client_name"), Some("mysql-connector-python"));
    let select = "SELECT id, name, email, note, CAST(id AS DOUBLE) AS d, CAST('2024-01-02 03:04:05' AS DATETIME) AS t FROM customers WHERE id >= ?";
    let update = "UPDATE customers SET note = ? WHERE id = ?";
    let executes: Vec<_> = log
        .queries
        .iter()
        .filter(|q| q.command == CommandKind::StmtExecute)
        .map(|q| (q.statement_id, q.sql.as_deref(), q.rows, q.affected_rows))
        .collect();
    assert_eq!(
        executes,
        vec![
            (Some(1), Some(select), 2, 0),
            (Some(1), Some(select), 1, 0),
            (Some(2), Some(update), 0, 1),
        ]
    );
    let prepares: Vec<_> = log
        .queries
        .iter()
        .filter(|q| q.command == CommandKind::StmtPrepare)
        .map(|q| (q.statement_id, q.params, q.error.as_ref().map(|e| e.code)))
        .collect();
    assert_eq!(
        prepares,
        vec![
            (Some(1), 1, None),
            (Some(2), 2, None),
            (None, 0, Some(1054))
        ]
    );
    assert!(log.lines.contains(
        &r#"row len=54 trunc=false [i1, "Alice Example", "alice@example.com", NULL, f1, t[232, 7, 1, 2, 3, 4, 5]]"#.to_owned()
    ));
    // Both statements were closed by the client.
    assert_eq!(session.statement_count(), 0);
}

#[test]
fn three_thousand_rows() {
    let log = check_splits(ROWS, 211);
    let q = queries(&log);
    let big: Vec<_> = q.iter().filter(|q| q.0.contains("seq_1_to_3000")).collect();
    assert_eq!(
        big,
        vec![&(
            "SELECT seq, seq * 2 FROM seq_1_to_3000",
            None,
            3000,
            0,
            None
        )]
    );
    assert!(
        log.lines
            .contains(&r#"row len=10 trunc=false ["3000", "6000"]"#.to_owned())
    );
}
