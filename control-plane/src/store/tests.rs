//! Store behaviour, written against `&dyn Store` so every backend runs it:
//! each test in [`both!`] runs on SQLite and on a real PostgreSQL server
//! (a throwaway cluster started by `custody-testkit`; a missing PostgreSQL
//! fails the test, it is never skipped).

use std::sync::{Arc, Mutex, Weak};

use custody_context::api::v1;
use custody_context::policy::EgressPolicy;

use super::*;
use crate::assembly::assemble;
use rusqlite::OptionalExtension as _;

/// A backend under test: stores over the same data, and a raw look at it.
trait Backend {
    /// The store (a second call reopens the same data).
    fn open(&self) -> Arc<dyn Store>;
    /// Fact rows of `chain` with another time than `not_at` (`-1`: all).
    fn fact_rows(&self, chain: &str, not_at: i64) -> i64;
}

struct Sqlite(tempfile::TempDir);

impl Sqlite {
    fn new() -> Self {
        Sqlite(tempfile::tempdir().unwrap())
    }
}

impl Backend for Sqlite {
    fn open(&self) -> Arc<dyn Store> {
        Arc::new(open(self.0.path()))
    }

    fn fact_rows(&self, chain: &str, not_at: i64) -> i64 {
        fact_rows_not_at(self.0.path(), chain, not_at)
    }
}

/// One PostgreSQL server shared by the tests that run at the same time
/// (stopped when the last one ends), a database per test.
struct Postgres {
    server: Arc<custody_testkit::Postgres>,
    dbname: String,
}

impl Postgres {
    fn new() -> Self {
        static SERVER: Mutex<Weak<custody_testkit::Postgres>> = Mutex::new(Weak::new());
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let server = {
            let mut shared = SERVER.lock().unwrap();
            match shared.upgrade() {
                Some(s) => s,
                None => {
                    let s = Arc::new(
                        custody_testkit::Postgres::start()
                            .expect("PostgreSQL (scripts/install-deps installs it)"),
                    );
                    *shared = Arc::downgrade(&s);
                    s
                }
            }
        };
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dbname = format!("store_test_{}_{n}", std::process::id());
        server
            .superuser_sql(&format!(
                "CREATE DATABASE {dbname} OWNER {};",
                server.user()
            ))
            .unwrap();
        Postgres { server, dbname }
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions {
            host: self.server.host(),
            port: self.server.port(),
            user: self.server.user().to_owned(),
            password: Some(self.server.password().to_owned()),
            dbname: self.dbname.clone(),
            pool_size: 4,
            connect_timeout: std::time::Duration::from_secs(10),
            ca_pem: None,
        }
    }
}

impl Backend for Postgres {
    fn open(&self) -> Arc<dyn Store> {
        Arc::new(PostgresStore::open(&self.options()).unwrap())
    }

    fn fact_rows(&self, chain: &str, not_at: i64) -> i64 {
        let out = self
            .server
            .superuser_sql(&format!(
                "\\c {}\nSELECT count(*) FROM chain_facts WHERE chain_id = '{chain}' AND last_ns <> {not_at};",
                self.dbname
            ))
            .unwrap();
        out.trim().parse().unwrap()
    }
}

/// Runs each named test (a `fn(&dyn Backend)`) on every backend.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Sqlite::new());
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&super::Postgres::new());
            })*
        }
    };
}

both!(
    hops_are_stored_once_by_event_id_and_survive_a_reopen,
    chains_are_found_by_every_filter,
    policy_changes_are_versioned_and_audited,
    client_versions_and_keys_are_kept,
    retention_deletes_by_age_then_by_size,
    neighbours_are_found_by_context_and_connection,
    parents_are_requests_that_contain_a_span_and_last_at_most_the_longest_request,
    facts_follow_reassembly_supersession_and_retention,
    concurrent_batches_are_each_answered_for_their_own_hops,
    a_chain_is_found_by_an_id_joined_into_it,
    a_chain_reported_again_after_retention_is_stored_whole,
);

/// The files of a store in one connection: `custody.db`, with `chains.db`
/// and `ids.db` attached (table names resolve in any).
fn raw_db(dir: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("custody.db")).unwrap();
    for (file, name) in [("chains.db", "chains_db"), ("ids.db", "ids_db")] {
        conn.execute(
            &format!("ATTACH DATABASE ?1 AS {name}"),
            [dir.join(file).to_str().unwrap()],
        )
        .unwrap();
    }
    conn
}

/// Puts a closed store back in the single-file layout of earlier versions:
/// chains, their facts, fact values and chain ids in `custody.db`, no
/// `chains.db` or `ids.db`.
fn single_file_layout(dir: &std::path::Path) {
    raw_db(dir)
        .execute_batch(
            "CREATE TABLE main.chains (chain_seq INTEGER PRIMARY KEY, coverage TEXT NOT NULL,
                 first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, summary TEXT NOT NULL,
                 shape TEXT NOT NULL);
             CREATE INDEX main.chains_time ON chains (last_ns);
             CREATE INDEX main.chains_coverage ON chains (coverage, last_ns);
             CREATE TABLE main.chain_facts (fact INTEGER NOT NULL, last_ns INTEGER NOT NULL,
                 chain_seq INTEGER NOT NULL, PRIMARY KEY (fact, last_ns, chain_seq)) WITHOUT ROWID;
             CREATE TABLE main.fact_values (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                 value TEXT NOT NULL, UNIQUE (kind, value));
             CREATE TABLE main.chain_ids (seq INTEGER PRIMARY KEY,
                 chain_id TEXT NOT NULL UNIQUE);
             INSERT INTO main.chains SELECT * FROM chains_db.chains;
             INSERT INTO main.chain_facts SELECT * FROM chains_db.chain_facts;
             INSERT INTO main.fact_values SELECT * FROM chains_db.fact_values;
             INSERT INTO main.chain_ids SELECT * FROM ids_db.chain_ids;",
        )
        .unwrap();
    for file in [
        "chains.db",
        "chains.db-wal",
        "chains.db-shm",
        "ids.db",
        "ids.db-wal",
        "ids.db-shm",
    ] {
        let _ = std::fs::remove_file(dir.join(file));
    }
}

/// Stores a two-hop chain of `C1` with its tree and closes the store; the tree.
fn closed_store_with_a_two_hop_chain(dir: &std::path::Path) -> ChainTree {
    let hops = [
        hop("a", C1, "1111111111111111", "", 100),
        hop("b", C1, "2222222222222222", "1111111111111111", 101),
    ];
    let tree = assemble(&hops, &[]).remove(0);
    let store = open(dir);
    store.put_hops(&hops).unwrap();
    store
        .put_chains(std::slice::from_ref(&tree), &[], &[])
        .unwrap();
    tree
}

/// Stores a later child hop of `root`'s chain and the chain assembled
/// again with it; the new trees.
fn reassemble_with_a_later_hop(store: &SqliteStore, root: &HopEvent) -> Vec<ChainTree> {
    let mut later = root.clone();
    later.event_id = "b".into();
    later.span_id = "2222222222222222".into();
    later.parent_span_id = "1111111111111111".into();
    later.start_unix_nanos = 500;
    let both = [root.clone(), later];
    store.put_hops(&both).unwrap();
    let trees = assemble(&both, &[]);
    store.put_chains(&trees, &[], &[]).unwrap();
    trees
}

fn open(dir: &std::path::Path) -> SqliteStore {
    SqliteStore::open(&SqliteOptions {
        data_dir: dir.to_path_buf(),
        sync_full: false,
    })
    .unwrap()
}

fn hop(id: &str, chain: &str, span: &str, parent: &str, start: u64) -> HopEvent {
    HopEvent {
        schema_version: 1,
        event_id: id.into(),
        chain_id: chain.into(),
        span_id: span.into(),
        parent_span_id: parent.into(),
        workload: Some(v1::WorkloadId {
            trust_domain: "td".into(),
            namespace: "shop".into(),
            service_account: if parent.is_empty() { "web" } else { "orders" }.into(),
            pod: String::new(),
        }),
        direction: v1::Direction::Inbound as i32,
        initiator: Some(v1::Initiator {
            subject: "alice".into(),
            kind: v1::InitiatorKind::Human as i32,
            actors: vec!["agent-7".into()],
            scope: String::new(),
        }),
        attribution: Some(v1::Attribution {
            method: v1::AttributionMethod::Propagated as i32,
            confidence: 1.0,
        }),
        context_outcome: v1::ContextOutcome::Propagated as i32,
        start_unix_nanos: start,
        duration_nanos: 10,
        ..Default::default()
    }
}

const C1: &str = "11111111111111111111111111111111";
const C2: &str = "22222222222222222222222222222222";
const C3: &str = "33333333333333333333333333333333";

fn put_idempotent(store: &dyn Store) {
    let a = [
        hop("a", C1, "1111111111111111", "", 100),
        hop("b", C1, "2222222222222222", "1111111111111111", 101),
    ];
    let out = store.put_hops(&a).unwrap();
    assert_eq!((out.accepted, out.duplicates), (2, 0));
    assert_eq!(out.chains, vec![C1.to_owned()]);
    assert_eq!(out.fresh, vec![true, true]);
    let again = [a[1].clone(), hop("c", C2, "3333333333333333", "", 5_000)];
    let out = store.put_hops(&again).unwrap();
    assert_eq!((out.accepted, out.duplicates), (1, 1));
    assert_eq!(out.fresh, vec![false, true]);
    let mut pending = store.pending_chains(10).unwrap();
    pending.sort();
    assert_eq!(pending, vec![C1.to_owned(), C2.to_owned()]);
    // C1 got hops in two batches: generation 2. Clearing generation 1 (read
    // before the second batch) leaves it pending; clearing 2 does not.
    let generations = store
        .pending_generations(&[C1.to_owned(), "x".into()])
        .unwrap();
    assert_eq!(generations, vec![(C1.to_owned(), 1)]);
    store
        .put_hops(&[hop("d", C1, "4444444444444444", "1111111111111111", 102)])
        .unwrap();
    store.put_chains(&[], &[], &generations).unwrap();
    assert_eq!(store.pending_chains(10).unwrap().len(), 2);
    store.put_chains(&[], &[], &[(C1.to_owned(), 2)]).unwrap();
    assert_eq!(store.pending_chains(10).unwrap(), vec![C2.to_owned()]);
    let mut got = store.hops_of_chains(&[C1.to_owned()]).unwrap();
    got.sort_by(|x, y| x.event_id.cmp(&y.event_id));
    assert_eq!(got.len(), 3);
    assert_eq!(got[..2], a[..]);
}

fn hops_are_stored_once_by_event_id_and_survive_a_reopen(b: &dyn Backend) {
    put_idempotent(b.open().as_ref());
    let store = b.open();
    assert_eq!(store.hop_count().unwrap(), 4);
    let out = store
        .put_hops(&[hop("a", C1, "1111111111111111", "", 100)])
        .unwrap();
    assert_eq!((out.accepted, out.duplicates), (0, 1));
}

fn chains_are_found_by_every_filter(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    let mut hops = vec![
        hop("a", C1, "1111111111111111", "", 100),
        hop("b", C1, "2222222222222222", "1111111111111111", 101),
        hop("c", C2, "3333333333333333", "", 5_000),
    ];
    hops[1].data = vec![v1::DataTouch {
        class: "pii.ssn".into(),
        count: 2,
        confidence: 1.0,
    }];
    hops[1].egress = Some(v1::EgressDecision {
        destination: Some(v1::Destination {
            host: "api.partner.example".into(),
            ip: String::new(),
            port: 443,
        }),
        verdict: v1::Verdict::Block as i32,
        ..Default::default()
    });
    hops[2].initiator.as_mut().unwrap().subject = "bob".into();
    store.put_hops(&hops).unwrap();
    store.put_chains(&assemble(&hops, &[]), &[], &[]).unwrap();

    let ids = |q: ChainQuery| -> Vec<String> {
        store
            .chains(&q)
            .unwrap()
            .into_iter()
            .map(|s| s.chain_id)
            .collect()
    };
    assert_eq!(ids(ChainQuery::default()), vec![C2, C1]);
    let q = |f: fn(&mut ChainQuery)| {
        let mut q = ChainQuery::default();
        f(&mut q);
        q
    };
    assert_eq!(ids(q(|q| q.initiator = Some("alice".into()))), vec![C1]);
    assert_eq!(
        ids(q(|q| q.initiator = Some("agent-7".into()))),
        vec![C2, C1]
    );
    assert_eq!(ids(q(|q| q.data_class = Some("pii.ssn".into()))), vec![C1]);
    assert_eq!(
        ids(q(|q| q.destination = Some("api.partner.example".into()))),
        vec![C1]
    );
    assert_eq!(ids(q(|q| q.verdict = Some("block".into()))), vec![C1]);
    assert_eq!(
        ids(q(
            |q| q.service = Some("spiffe://td/ns/shop/sa/orders".into())
        )),
        vec![C1]
    );
    assert_eq!(
        ids(q(|q| q.coverage = Some(Coverage::Propagated))),
        vec![C2, C1]
    );
    assert_eq!(
        ids(q(|q| q.coverage = Some(Coverage::Orphan))),
        Vec::<String>::new()
    );
    assert_eq!(ids(q(|q| q.since = Some(1_000))), vec![C2]);
    assert_eq!(ids(q(|q| q.until = Some(1_000))), vec![C1]);
    assert_eq!(ids(q(|q| q.limit = 1)), vec![C2]);

    let tree = store.chain(C1).unwrap().unwrap();
    assert_eq!(tree.hops.len(), 2);
    assert!(
        store
            .chain("33333333333333333333333333333333")
            .unwrap()
            .is_none()
    );
}

fn policy_changes_are_versioned_and_audited(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    assert_eq!(store.policy_state().unwrap().version, 0);
    let policy = EgressPolicy::parse(
        "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: {name: p}\nspec:\n  rules:\n    - {name: r, destination: {hosts: [x.example]}, verdict: block}\n",
    )
    .unwrap();
    let state = PolicyState {
        version: 1,
        policies: vec![policy],
        changed_unix_nanos: 42,
        ..Default::default()
    };
    let entry = AuditEntry {
        id: 0,
        at_unix_nanos: 42,
        actor: "alice".into(),
        action: "policy.apply".into(),
        target: "p".into(),
        version: 1,
        detail: serde_json::json!({"rules": 1}),
    };
    store.commit_policy(&state, &entry).unwrap();
    let mut next = state.clone();
    next.version = 2;
    next.policies.clear();
    store
        .commit_policy(
            &next,
            &AuditEntry {
                action: "policy.delete".into(),
                version: 2,
                ..entry.clone()
            },
        )
        .unwrap();
    assert_eq!(store.policy_state().unwrap(), next);
    assert_eq!(store.policy_version(1).unwrap(), Some(state));
    let audit = store.audit(10).unwrap();
    assert_eq!(
        audit.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(),
        ["policy.delete", "policy.apply"]
    );
    assert_eq!(audit[1].actor, "alice");
}

fn client_versions_and_keys_are_kept(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    let ack = ClientVersion {
        client: "spiffe://td/ns/shop/sa/web".into(),
        kind: "proxy".into(),
        version: 3,
        apply_nanos: 10,
        acked_unix_nanos: 20,
        change_to_applied_nanos: 30,
        error: String::new(),
    };
    store.record_ack(&ack).unwrap();
    store
        .record_ack(&ClientVersion {
            version: 4,
            ..ack.clone()
        })
        .unwrap();
    let got = store.client_versions().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].version, 4);

    let key = IssuedKey {
        key_id: "k1".into(),
        public: vec![7; 32],
        workload: "spiffe://td/ns/shop/sa/web".into(),
        not_before_unix: 100,
        not_after_unix: 200,
    };
    store.put_signing_key(&key).unwrap();
    assert_eq!(store.signing_keys(150).unwrap(), vec![key]);
    assert!(store.signing_keys(201).unwrap().is_empty());
}

fn retention_deletes_by_age_then_by_size(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    let now = 1_000_000_000_000_000u64;
    let hour = 3_600_000_000_000u64;
    let mut hops = Vec::new();
    for i in 0..2_000u64 {
        let mut h = hop(
            &format!("e{i}"),
            &format!("{:032x}", i + 1),
            "1111111111111111",
            "",
            now - (2_000 - i) * hour / 100,
        );
        h.operation = "x".repeat(500);
        hops.push(h);
    }
    store.put_hops(&hops).unwrap();
    store.put_chains(&assemble(&hops, &[]), &[], &[]).unwrap();
    // 2,000 hops spread over 20 hours: keeping 10 hours drops about half.
    let out = store
        .retain(
            Retention {
                max_age_secs: 10 * 3600,
                max_bytes: u64::MAX,
            },
            now,
        )
        .unwrap();
    assert_eq!(out.hops, 1_000);
    assert_eq!(out.chains, 1_000);
    assert_eq!(store.hop_count().unwrap(), 1_000);
    let size = store.size_bytes().unwrap();
    let out = store
        .retain(
            Retention {
                max_age_secs: u64::MAX / 1_000_000_000,
                max_bytes: size / 2,
            },
            now,
        )
        .unwrap();
    assert!(out.hops > 0);
    assert!(store.size_bytes().unwrap() <= size / 2);
    // The newest survive.
    let left = store.hop_count().unwrap();
    assert!(left > 0 && left < 1_000);
    assert_eq!(
        store
            .hops_of_chains(&[format!("{:032x}", 2_000)])
            .unwrap()
            .len(),
        1
    );
}

fn parents_are_requests_that_contain_a_span_and_last_at_most_the_longest_request(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    const SEC: u64 = 1_000_000_000;
    let web = "spiffe://td/ns/shop/sa/web";
    // Requests of `web` around a contextless call made at 100 s for 1 ms.
    let request = |id: &str, start: u64, duration: u64| {
        let mut h = hop(id, &format!("{id:0>32}"), "1111111111111111", "", start);
        h.duration_nanos = duration;
        h
    };
    let hops = [
        // Contains it: started 5 s before, lasted 6 s.
        request("a", 95 * SEC, 6 * SEC),
        // Contains it, a longer request than the longest one (10 s).
        request("b", 99 * SEC, 12 * SEC),
        // Started too long before it.
        request("c", 89 * SEC, 20 * SEC),
        // Ended before it did, or started after it.
        request("d", 99 * SEC, SEC),
        request("e", 100 * SEC + 1, SEC),
        // Contains it, just within both bounds.
        request("f", 90 * SEC, 10 * SEC + 2 * 1_000_000),
    ];
    store.put_hops(&hops).unwrap();
    let span = (100 * SEC, 100 * SEC + 1_000_000);
    let mut found: Vec<String> = store
        .hops_containing(web, &[span], 10 * SEC)
        .unwrap()
        .into_iter()
        .map(|h| h.event_id)
        .collect();
    found.sort();
    assert_eq!(found, ["a", "f"]);
    // Another workload's requests are never candidates.
    assert!(
        store
            .hops_containing("spiffe://td/ns/shop/sa/orders", &[span], 10 * SEC)
            .unwrap()
            .is_empty()
    );
}

fn neighbours_are_found_by_context_and_connection(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    let conn = v1::FiveTuple {
        src_ip: "10.0.0.1".into(),
        src_port: 4000,
        dst_ip: "10.0.0.2".into(),
        dst_port: 80,
        transport: "tcp".into(),
    };
    let mut with_context = hop("a", C1, "1111111111111111", "", 100);
    with_context.connection = Some(conn.clone());
    let mut without = hop("b", C2, "2222222222222222", "", 150);
    without.attribution.as_mut().unwrap().method = v1::AttributionMethod::PeerOnly as i32;
    without.context_outcome = v1::ContextOutcome::Missing as i32;
    store
        .put_hops(&[with_context.clone(), without.clone()])
        .unwrap();
    assert_eq!(
        store.contextless_in_window(0, 1_000).unwrap(),
        vec![without]
    );
    assert!(store.contextless_in_window(200, 1_000).unwrap().is_empty());
    let key = crate::assembly::connection_key(&conn);
    assert_eq!(
        store
            .hops_by_connection(std::slice::from_ref(&key))
            .unwrap(),
        vec![with_context]
    );
    let flow = FlowEvent {
        schema_version: 1,
        event_id: "f".into(),
        connection: Some(conn),
        unix_nanos: 120,
        ..Default::default()
    };
    let out = store.put_flows(&[flow.clone(), flow.clone()]).unwrap();
    assert_eq!((out.accepted, out.duplicates), (1, 1));
    assert_eq!(
        store.flows_by_connection(&[key]).unwrap(),
        vec![flow.clone()]
    );
    assert_eq!(store.flows_in_window(100, 200).unwrap(), vec![flow]);
    assert!(
        store
            .hops_in_window(&["spiffe://td/ns/shop/sa/web".into()], 0, 105, 106)
            .unwrap()
            .len()
            == 1
    );
}

#[test]
fn sqlite_chains_of_the_earlier_layout_are_assembled_again() {
    let dir = tempfile::tempdir().unwrap();
    let hops = [
        hop("a", C1, "1111111111111111", "", 100),
        hop("b", C1, "2222222222222222", "1111111111111111", 101),
    ];
    {
        let store = open(dir.path());
        store.put_hops(&hops).unwrap();
        store
            .put_chains(&assemble(&hops, &[]), &[], &[(C1.to_owned(), 1)])
            .unwrap();
        assert!(store.pending_chains(10).unwrap().is_empty());
    }
    // The chain tables as the earlier layout wrote them (whole trees as JSON).
    single_file_layout(dir.path());
    rusqlite::Connection::open(dir.path().join("custody.db"))
        .unwrap()
        .execute_batch(
            "DROP TABLE chains; DROP TABLE chain_facts;
             CREATE TABLE chains (chain_id TEXT PRIMARY KEY, initiator TEXT NOT NULL,
                 coverage TEXT NOT NULL, first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL,
                 summary TEXT NOT NULL, tree TEXT NOT NULL);
             CREATE TABLE chain_facts (kind TEXT NOT NULL, value TEXT NOT NULL,
                 chain_id TEXT NOT NULL, PRIMARY KEY (kind, value, chain_id)) WITHOUT ROWID;
             INSERT INTO chains VALUES ('x', 'alice', 'propagated', 0, 0, '{}', '[]');",
        )
        .unwrap();
    let store = open(dir.path());
    assert_eq!(store.pending_chains(10).unwrap(), vec![C1.to_owned()]);
    assert!(store.chain(C1).unwrap().is_none());
    let stored = store.hops_of_chains(&[C1.to_owned()]).unwrap();
    store
        .put_chains(&assemble(&stored, &[]), &[], &[(C1.to_owned(), 1)])
        .unwrap();
    let tree = store.chain(C1).unwrap().unwrap();
    assert_eq!(tree.hops, assemble(&hops, &[])[0].hops);
    assert!(store.pending_chains(10).unwrap().is_empty());
}

#[test]
fn sqlite_chains_stored_as_json_are_read_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let tree = closed_store_with_a_two_hop_chain(dir.path());
    let db = || raw_db(dir.path());
    let stored_as = || -> String {
        db().query_row(
            "SELECT typeof(summary) || ' ' || typeof(shape) FROM chains",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(stored_as(), "blob blob");
    // The row as earlier versions wrote it: summary and shape as JSON text.
    db().execute(
        "UPDATE chains SET summary = ?1, shape = ?2",
        [
            serde_json::to_string(&tree.summary).unwrap(),
            serde_json::to_string(&common::shape(&tree)).unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(stored_as(), "text text");
    let store = open(dir.path());
    assert_eq!(store.chain(C1).unwrap(), Some(tree.clone()));
    let by_initiator = ChainQuery {
        initiator: Some("alice".into()),
        ..ChainQuery::default()
    };
    assert_eq!(store.chains(&by_initiator).unwrap(), vec![tree.summary]);
    // Assembled again with a later hop: the facts written for the JSON
    // summary are found from it and replaced, and the row is now compact.
    let later = hop("c", C1, "3333333333333333", "2222222222222222", 500);
    store.put_hops(std::slice::from_ref(&later)).unwrap();
    let all = store.hops_of_chains(&[C1.to_owned()]).unwrap();
    let again = assemble(&all, &[]).remove(0);
    store
        .put_chains(std::slice::from_ref(&again), &[], &[])
        .unwrap();
    assert_eq!(stored_as(), "blob blob");
    let last = i64::try_from(again.summary.last_unix_nanos).unwrap();
    assert_eq!(fact_rows_not_at(dir.path(), C1, last), 0);
    assert_eq!(
        store.chains(&by_initiator).unwrap(),
        vec![again.summary.clone()]
    );
    assert_eq!(store.chain(C1).unwrap(), Some(again));
}

/// Fact rows of one chain carrying another time than `last_ns`.
fn fact_rows_not_at(dir: &std::path::Path, chain: &str, last_ns: i64) -> i64 {
    let conn = raw_db(dir);
    let Some(seq) = raw_chain_seq(&conn, chain) else {
        return 0;
    };
    conn.query_row(
        "SELECT count(*) FROM chain_facts WHERE chain_seq = ?1 AND last_ns != ?2",
        rusqlite::params![seq, last_ns],
        |r| r.get(0),
    )
    .unwrap()
}

/// The number of `chain` as the database file says: from the chain-id
/// index, or from its hops while the open store has not written it there.
fn raw_chain_seq(conn: &rusqlite::Connection, chain: &str) -> Option<i64> {
    let indexed = conn
        .query_row(
            "SELECT seq FROM chain_ids WHERE chain_id = ?1",
            [chain],
            |r| r.get(0),
        )
        .optional()
        .unwrap();
    indexed.or_else(|| {
        let mut stmt = conn.prepare("SELECT chain_seq, body FROM hops").unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .unwrap();
        rows.map(Result::unwrap)
            .find(|(_, body)| {
                <HopEvent as prost::Message>::decode(body.as_slice())
                    .unwrap()
                    .chain_id
                    == chain
            })
            .map(|(seq, _)| seq)
    })
}

/// Rows of the chain-id index, read from the database file.
fn indexed_chain_ids(dir: &std::path::Path) -> i64 {
    raw_db(dir)
        .query_row("SELECT count(*) FROM chain_ids", [], |r| r.get(0))
        .unwrap()
}

fn event_ids(mut hops: Vec<HopEvent>) -> Vec<String> {
    hops.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    hops.into_iter().map(|h| h.event_id).collect()
}

#[test]
fn sqlite_new_chain_ids_are_indexed_in_batches_and_found_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.flush_chain_numbers_every(3);
    let c3 = "33333333333333333333333333333333";
    let first = [
        hop("a", C1, "1111111111111111", "", 100),
        hop("b", C1, "2222222222222222", "1111111111111111", 101),
        hop("c", C2, "3333333333333333", "", 200),
    ];
    store.put_hops(&first).unwrap();
    // Two new chains: not in the index yet, and found by every lookup.
    assert_eq!(indexed_chain_ids(dir.path()), 0);
    let ids = [C1.to_owned(), C2.to_owned()];
    assert_eq!(
        event_ids(store.hops_of_chains(&ids[..1]).unwrap()),
        ["a", "b"]
    );
    assert_eq!(store.chain_hop_counts(&ids).unwrap(), vec![2, 1]);
    assert_eq!(
        store.pending_generations(&ids).unwrap(),
        vec![(C1.to_owned(), 1), (C2.to_owned(), 1)]
    );
    assert_eq!(store.pending_chains(10).unwrap(), ids.to_vec());
    let trees = assemble(&first, &[]);
    store
        .put_chains(&trees, &[], &[(C1.to_owned(), 1), (C2.to_owned(), 1)])
        .unwrap();
    let c1_tree = trees.iter().find(|t| t.summary.chain_id == C1).unwrap();
    assert_eq!(store.chain(C1).unwrap().as_ref(), Some(c1_tree));
    // A late hop of a chain not yet indexed joins it rather than a new number.
    store
        .put_hops(&[hop("d", C1, "4444444444444444", "1111111111111111", 102)])
        .unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 0);
    assert_eq!(store.chain_hop_counts(&ids[..1]).unwrap(), vec![3]);
    // A third new chain makes them due: the upkeep before the next pass
    // writes them, each under its own number; neither a commit of hops nor
    // a store of trees does.
    store
        .put_hops(&[hop("e", c3, "5555555555555555", "", 300)])
        .unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 0);
    store.put_chains(&[], &[], &[]).unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 0);
    store.upkeep().unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 3);
    assert_eq!(
        event_ids(store.hops_of_chains(&ids[..1]).unwrap()),
        ["a", "b", "d"]
    );
    assert_eq!(
        event_ids(store.hops_of_chains(&[c3.to_owned()]).unwrap()),
        ["e"]
    );
    assert_eq!(store.chain(C1).unwrap().as_ref(), Some(c1_tree));
    assert_eq!(
        store.pending_chains(10).unwrap(),
        vec![C1.to_owned(), c3.to_owned()]
    );
    // With no pass to write them (assembly stalled), a commit of hops
    // writes them once twice as many wait: memory stays bounded.
    let more: Vec<HopEvent> = (0..6u64)
        .map(|i| {
            let span = format!("{:016x}", 0x100 + i);
            hop(
                &format!("m{i}"),
                &format!("{:032x}", 0x100 + i),
                &span,
                "",
                400 + i,
            )
        })
        .collect();
    store.put_hops(&more[..5]).unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 3);
    store.put_hops(&more[5..]).unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 9);
    // A late hop of an indexed chain joins it.
    store
        .put_hops(&[hop("late", C2, "6666666666666666", "3333333333333333", 201)])
        .unwrap();
    assert_eq!(store.chain_hop_counts(&ids[1..]).unwrap(), vec![2]);
    assert_eq!(indexed_chain_ids(dir.path()), 9);
}

#[test]
fn sqlite_a_hop_that_does_not_decode_does_not_stop_the_recovery_of_chain_ids() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store
            .put_hops(&[
                hop("a", C1, "1111111111111111", "", 100),
                hop("b", C1, "2222222222222222", "1111111111111111", 101),
                hop("c", C2, "3333333333333333", "", 200),
            ])
            .unwrap();
        std::mem::forget(store);
    }
    // C1's first hop, the one recovery reads first, is damaged on disk.
    rusqlite::Connection::open(dir.path().join("custody.db"))
        .unwrap()
        .execute("UPDATE hops SET body = x'ffff' WHERE event_id = 'a'", [])
        .unwrap();
    let store = open(dir.path());
    assert_eq!(indexed_chain_ids(dir.path()), 2);
    assert_eq!(
        store
            .chain_hop_counts(&[C1.to_owned(), C2.to_owned()])
            .unwrap(),
        vec![2, 1]
    );
}

#[test]
fn sqlite_chain_ids_not_yet_indexed_are_recovered_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let hops = [
        hop("a", C1, "1111111111111111", "", 100),
        hop("b", C1, "2222222222222222", "1111111111111111", 101),
        hop("c", C2, "3333333333333333", "", 200),
    ];
    let trees = assemble(&hops[..2], &[]);
    {
        let store = open(dir.path());
        store.put_hops(&hops).unwrap();
        store
            .put_chains(&trees, &[], &[(C1.to_owned(), 1)])
            .unwrap();
        assert_eq!(indexed_chain_ids(dir.path()), 0);
        // A crash: the store never closes, so nothing is written at close.
        std::mem::forget(store);
    }
    assert_eq!(indexed_chain_ids(dir.path()), 0);
    let store = open(dir.path());
    assert_eq!(indexed_chain_ids(dir.path()), 2);
    assert_eq!(store.chain(C1).unwrap().as_ref(), trees.first());
    assert_eq!(store.pending_chains(10).unwrap(), vec![C2.to_owned()]);
    // Numbers go on after the recovered ones: a new chain gets its own,
    // and a late hop of a recovered chain joins it.
    let c3 = "33333333333333333333333333333333";
    store
        .put_hops(&[
            hop("d", c3, "4444444444444444", "", 300),
            hop("e", C2, "5555555555555555", "3333333333333333", 201),
        ])
        .unwrap();
    assert_eq!(
        event_ids(store.hops_of_chains(&[c3.to_owned()]).unwrap()),
        ["d"]
    );
    assert_eq!(
        event_ids(store.hops_of_chains(&[C2.to_owned()]).unwrap()),
        ["c", "e"]
    );
    assert_eq!(
        store
            .chain_hop_counts(&[C1.to_owned(), C2.to_owned(), c3.to_owned()])
            .unwrap(),
        vec![2, 2, 1]
    );
    drop(store);
    // Closed cleanly: every id is indexed, nothing to recover.
    assert_eq!(indexed_chain_ids(dir.path()), 3);
}

fn facts_follow_reassembly_supersession_and_retention(backend: &dyn Backend) {
    let store = backend.open();
    let store = store.as_ref();
    let ids = |initiator: &str| -> Vec<String> {
        store
            .chains(&ChainQuery {
                initiator: Some(initiator.into()),
                ..ChainQuery::default()
            })
            .unwrap()
            .into_iter()
            .map(|s| s.chain_id)
            .collect()
    };
    let a = hop("a", C1, "1111111111111111", "", 100);
    store.put_hops(std::slice::from_ref(&a)).unwrap();
    store
        .put_chains(&assemble(std::slice::from_ref(&a), &[]), &[], &[])
        .unwrap();
    assert_eq!(ids("alice"), vec![C1]);
    let first = backend.fact_rows(C1, -1);
    assert!(first > 0);
    // Re-assembled with a later hop of another initiator: the old facts go.
    let mut b = hop("b", C1, "2222222222222222", "", 200);
    b.initiator.as_mut().unwrap().subject = "carol".into();
    b.initiator.as_mut().unwrap().actors.clear();
    let both = [b.clone(), a.clone()];
    store.put_hops(&both).unwrap();
    let trees = assemble(&both, &[]);
    let subject = trees[0].summary.initiator.as_ref().unwrap().subject.clone();
    store.put_chains(&trees, &[], &[]).unwrap();
    assert_eq!(ids(&subject), vec![C1]);
    let last = i64::try_from(trees[0].summary.last_unix_nanos).unwrap();
    assert!(backend.fact_rows(C1, -1) > 0);
    assert_eq!(backend.fact_rows(C1, last), 0, "no stale facts");
    let other = if subject == "alice" { "carol" } else { "alice" };
    assert!(ids(other).is_empty(), "{other} is no longer the initiator");
    // The same tree again leaves the same rows.
    let rows = backend.fact_rows(C1, -1);
    store.put_chains(&trees, &[], &[]).unwrap();
    assert_eq!(backend.fact_rows(C1, -1), rows);
    // Joined into another chain: its own row and facts go.
    let c = hop("c", C2, "3333333333333333", "", 7_000);
    store.put_hops(std::slice::from_ref(&c)).unwrap();
    store
        .put_chains(&assemble(std::slice::from_ref(&c), &[]), &[], &[])
        .unwrap();
    assert!(backend.fact_rows(C2, -1) > 0);
    store.put_chains(&[], &[C2.to_owned()], &[]).unwrap();
    assert_eq!(backend.fact_rows(C2, -1), 0);
    assert!(store.chain(C2).unwrap().is_none());
    // Retention takes the facts with the chain.
    store
        .retain(
            Retention {
                max_age_secs: 1,
                max_bytes: u64::MAX,
            },
            10_000_000_000,
        )
        .unwrap();
    assert_eq!(backend.fact_rows(C1, -1), 0);
    assert!(ids(&subject).is_empty());
}

fn concurrent_batches_are_each_answered_for_their_own_hops(b: &dyn Backend) {
    let store = b.open();
    // 8 writers, 20 rounds of 50 hops; every hop is also in one other
    // writer's batch, so each is accepted once and refused once.
    let outcomes: Vec<Vec<(Vec<String>, PutOutcome)>> = (0..8u64)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..20u64)
                    .map(|round| {
                        let batch: Vec<HopEvent> = (0..50u64)
                            .map(|i| {
                                // Writers w and w ^ 1 send the same hops.
                                let n = ((w / 2) * 20 + round) * 50 + i;
                                hop(&format!("e{n}"), &format!("{n:032x}"), "", "", n)
                            })
                            .collect();
                        let out = store.put_hops(&batch).unwrap();
                        (batch.iter().map(|h| h.event_id.clone()).collect(), out)
                    })
                    .collect()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut accepted = std::collections::HashMap::new();
    for (ids, out) in outcomes.iter().flatten() {
        assert_eq!(out.fresh.len(), ids.len());
        assert_eq!(out.accepted + out.duplicates, 50);
        assert_eq!(out.accepted as usize, out.chains.len());
        for (id, fresh) in ids.iter().zip(&out.fresh) {
            *accepted.entry(id.clone()).or_insert(0) += u32::from(*fresh);
        }
    }
    assert_eq!(accepted.len(), 4 * 20 * 50);
    assert!(accepted.values().all(|n| *n == 1));
    assert_eq!(store.hop_count().unwrap(), 4 * 20 * 50);
    let mut pending = store.pending_chains(u32::MAX).unwrap();
    pending.sort();
    assert_eq!(pending.len(), 4 * 20 * 50);
}

#[test]
fn sqlite_chains_keyed_by_id_are_rekeyed_by_number_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hops = [hop("a", C1, "1111111111111111", "", 100)];
    let waiting = hop("w", C2, "2222222222222222", "", 300);
    {
        let store = open(dir.path());
        store.put_hops(&hops).unwrap();
        store.put_chains(&assemble(&hops, &[]), &[], &[]).unwrap();
        store.put_hops(std::slice::from_ref(&waiting)).unwrap();
    }
    // The earlier layout: chains, their facts and the queue keyed by chain
    // id, with an index of facts by chain id.
    single_file_layout(dir.path());
    rusqlite::Connection::open(dir.path().join("custody.db"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE old_chains (chain_id TEXT PRIMARY KEY, coverage TEXT NOT NULL,
                 first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, summary TEXT NOT NULL,
                 shape TEXT NOT NULL);
             INSERT INTO old_chains SELECT i.chain_id, c.coverage, c.first_ns, c.last_ns,
                 c.summary, c.shape FROM chains c JOIN chain_ids i ON i.seq = c.chain_seq;
             CREATE TABLE old_facts (kind TEXT NOT NULL, value TEXT NOT NULL,
                 last_ns INTEGER NOT NULL, chain_id TEXT NOT NULL,
                 PRIMARY KEY (kind, value, last_ns, chain_id)) WITHOUT ROWID;
             INSERT INTO old_facts SELECT v.kind, v.value, f.last_ns, i.chain_id
                 FROM chain_facts f JOIN chain_ids i ON i.seq = f.chain_seq
                 JOIN fact_values v ON v.id = f.fact;
             CREATE TABLE old_pending (chain_id TEXT PRIMARY KEY, generation INTEGER NOT NULL)
                 WITHOUT ROWID;
             INSERT INTO old_pending SELECT i.chain_id, p.generation
                 FROM pending p JOIN chain_ids i ON i.seq = p.chain_seq;
             DROP TABLE chains; DROP TABLE chain_facts; DROP TABLE pending;
             DROP TABLE fact_values;
             ALTER TABLE old_chains RENAME TO chains;
             ALTER TABLE old_facts RENAME TO chain_facts;
             ALTER TABLE old_pending RENAME TO pending;
             CREATE INDEX chain_facts_chain ON chain_facts (chain_id);",
        )
        .unwrap();
    let store = open(dir.path());
    let schema =
        |sql: &str| -> i64 { raw_db(dir.path()).query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        schema("SELECT count(*) FROM sqlite_schema WHERE name = 'chain_facts_chain'"),
        0
    );
    assert_eq!(
        schema(
            "SELECT count(*) FROM pragma_table_info('chains') WHERE name = 'chain_id'
             UNION ALL SELECT count(*) FROM pragma_table_info('chain_facts') WHERE name = 'chain_id'
             UNION ALL SELECT count(*) FROM pragma_table_info('pending') WHERE name = 'chain_id'
             ORDER BY 1 DESC LIMIT 1"
        ),
        0
    );
    // The stored chain, its facts and the queue are kept.
    assert_eq!(
        store.chain(C1).unwrap().unwrap().hops,
        assemble(&hops, &[])[0].hops
    );
    assert_eq!(
        store.pending_chains(10).unwrap(),
        vec![C1.to_owned(), C2.to_owned()]
    );
    assert_eq!(
        store.pending_generations(&[C2.to_owned()]).unwrap(),
        vec![(C2.to_owned(), 1)]
    );
    let ids = |q: ChainQuery| -> Vec<String> {
        store
            .chains(&q)
            .unwrap()
            .into_iter()
            .map(|s| s.chain_id)
            .collect()
    };
    let by_alice = ChainQuery {
        initiator: Some("alice".into()),
        ..ChainQuery::default()
    };
    assert_eq!(ids(by_alice.clone()), vec![C1]);
    // Facts are still replaced when the chain is assembled again.
    let trees = reassemble_with_a_later_hop(&store, &hops[0]);
    assert_eq!(
        ids(ChainQuery {
            since: Some(505),
            ..by_alice
        }),
        vec![C1]
    );
    let last = i64::try_from(trees[0].summary.last_unix_nanos).unwrap();
    assert!(fact_rows_not_at(dir.path(), C1, -1) > 0);
    assert_eq!(fact_rows_not_at(dir.path(), C1, last), 0, "no stale facts");
}

#[test]
fn sqlite_parents_are_searched_as_far_back_as_the_longest_request_stored() {
    const MS: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let web = "spiffe://td/ns/shop/sa/web";
    // Requests of `web`, 1-1,500 ms long, one every 7 ms over 10 s, in
    // batches; the longest request grows from batch to batch.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let requests: Vec<HopEvent> = (0..1_500u64)
        .map(|i| {
            let mut h = hop(
                &format!("r{i}"),
                &format!("{i:032x}"),
                "1111111111111111",
                "",
                0,
            );
            h.start_unix_nanos = 100_000 * MS + i * 7 * MS;
            h.duration_nanos = (1 + next() % (i + 1).min(1_500)) * MS;
            h
        })
        .collect();
    let store = open(dir.path());
    for batch in requests.chunks(100) {
        store.put_hops(batch).unwrap();
    }
    let spans: Vec<(u64, u64)> = (0..40u64)
        .map(|k| {
            let start = 100_000 * MS + k * 263 * MS + 3;
            (start, start + 1 + next() % (2 * MS))
        })
        .collect();
    let max_request = 10_000 * MS;
    // What containment alone says, over every stored request.
    let expected = |spans: &[(u64, u64)]| -> Vec<String> {
        let (first, last) = (spans[0].0, spans[spans.len() - 1].0);
        let mut ids: Vec<String> = requests
            .iter()
            .filter(|h| {
                let end = h.start_unix_nanos + h.duration_nanos;
                h.start_unix_nanos + max_request >= first
                    && end <= last + max_request
                    && spans
                        .iter()
                        .any(|s| h.start_unix_nanos <= s.0 && end >= s.1)
            })
            .map(|h| h.event_id.clone())
            .collect();
        ids.sort();
        ids
    };
    let found = |store: &SqliteStore, spans: &[(u64, u64)]| -> Vec<String> {
        let mut ids: Vec<String> = store
            .hops_containing(web, spans, max_request)
            .unwrap()
            .into_iter()
            .map(|h| h.event_id)
            .collect();
        ids.sort();
        ids
    };
    let mut searched = 0;
    for window in spans.windows(3) {
        let want = expected(window);
        searched += want.len();
        assert_eq!(found(&store, window), want);
    }
    assert!(
        searched > 100,
        "the spans have parents to find ({searched})"
    );
    drop(store);
    let longest = |dir: &std::path::Path| -> i64 {
        rusqlite::Connection::open(dir.join("custody.db"))
            .unwrap()
            .query_row(
                "SELECT longest_ns FROM workload_longest WHERE workload = ?1",
                [web],
                |r| r.get(0),
            )
            .unwrap()
    };
    let stored = requests.iter().map(|h| h.duration_nanos).max().unwrap();
    assert_eq!(u64::try_from(longest(dir.path())).unwrap(), stored);
    // A store from before the table: filled from the hops when opened.
    rusqlite::Connection::open(dir.path().join("custody.db"))
        .unwrap()
        .execute_batch("DROP TABLE workload_longest;")
        .unwrap();
    let store = open(dir.path());
    assert_eq!(u64::try_from(longest(dir.path())).unwrap(), stored);
    for window in spans.windows(3) {
        assert_eq!(found(&store, window), expected(window));
    }
    // Another workload has no stored request: nothing to search.
    assert!(
        store
            .hops_containing("spiffe://td/ns/shop/sa/orders", &spans[..1], max_request)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn sqlite_parent_index_by_start_is_replaced_by_one_by_end() {
    let dir = tempfile::tempdir().unwrap();
    let parent = hop("a", C1, "1111111111111111", "", 100);
    open(dir.path())
        .put_hops(std::slice::from_ref(&parent))
        .unwrap();
    let db = || rusqlite::Connection::open(dir.path().join("custody.db")).unwrap();
    db().execute_batch(
        "DROP INDEX hops_parents_by_end;
         CREATE INDEX hops_parents ON hops (workload, start_ns, end_ns) WHERE context = 1;",
    )
    .unwrap();
    let store = open(dir.path());
    let indexes: Vec<String> = db()
        .prepare("SELECT name FROM sqlite_schema WHERE name LIKE 'hops_parents%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, ["hops_parents_by_end"]);
    assert_eq!(
        store
            .hops_containing("spiffe://td/ns/shop/sa/web", &[(101, 105)], 50)
            .unwrap(),
        vec![parent]
    );
}

#[test]
fn sqlite_size_counts_every_file_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.flush_chain_numbers_every(1);
    let hops = [hop("a", C1, "1111111111111111", "", 100)];
    store.put_hops(&hops).unwrap();
    store.put_chains(&assemble(&hops, &[]), &[], &[]).unwrap();
    store.upkeep().unwrap();
    assert_eq!(indexed_chain_ids(dir.path()), 1);
    let conn = raw_db(dir.path());
    let used = |schema: &str| -> u64 {
        let pragma = |name: &str| -> i64 {
            conn.query_row(&format!("PRAGMA {schema}.{name}"), [], |r| r.get(0))
                .unwrap()
        };
        u64::try_from((pragma("page_count") - pragma("freelist_count")) * pragma("page_size"))
            .unwrap()
    };
    let files: Vec<u64> = ["main", "chains_db", "ids_db"].map(used).to_vec();
    assert!(files.iter().all(|b| *b > 0), "{files:?}");
    assert_eq!(store.size_bytes().unwrap(), files.iter().sum::<u64>());
}

#[test]
fn sqlite_chains_move_to_their_own_file_once_even_if_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let tree = closed_store_with_a_two_hop_chain(dir.path());
    let in_events = |dir: &std::path::Path| -> i64 {
        rusqlite::Connection::open(dir.join("custody.db"))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_schema
                 WHERE name IN ('chains', 'chain_facts', 'fact_values', 'chain_ids')",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(in_events(dir.path()), 0);
    let rows = |dir: &std::path::Path| -> (i64, i64, i64) {
        raw_db(dir)
            .query_row(
                "SELECT (SELECT count(*) FROM chains_db.chains),
                        (SELECT count(*) FROM chains_db.chain_facts),
                        (SELECT count(*) FROM chains_db.fact_values)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    };
    let before = rows(dir.path());
    assert!(before.0 == 1 && before.1 > 0 && before.2 > 0);
    // A move cut short after the copy: the single-file tables are still in
    // `custody.db`, and `chains.db` already holds them.
    let copy = tempfile::tempdir().unwrap();
    for file in ["custody.db", "chains.db"] {
        std::fs::copy(dir.path().join(file), copy.path().join(file)).unwrap();
    }
    single_file_layout(dir.path());
    std::fs::copy(copy.path().join("chains.db"), dir.path().join("chains.db")).unwrap();
    assert_eq!(in_events(dir.path()), 4);
    let store = open(dir.path());
    assert_eq!(in_events(dir.path()), 0);
    assert_eq!(rows(dir.path()), before, "copied once, not twice");
    assert_eq!(store.chain(C1).unwrap(), Some(tree.clone()));
    let by_alice = ChainQuery {
        initiator: Some("alice".into()),
        ..ChainQuery::default()
    };
    assert_eq!(store.chains(&by_alice).unwrap(), vec![tree.summary]);
}

#[test]
fn sqlite_facts_keyed_by_value_are_numbered_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hops = [hop("a", C1, "1111111111111111", "", 100)];
    let other = [hop("z", C2, "3333333333333333", "", 200)];
    {
        let store = open(dir.path());
        store.put_hops(&hops).unwrap();
        store.put_hops(&other).unwrap();
        store.put_chains(&assemble(&hops, &[]), &[], &[]).unwrap();
        store.put_chains(&assemble(&other, &[]), &[], &[]).unwrap();
    }
    single_file_layout(dir.path());
    let db = || raw_db(dir.path());
    let count = |sql: &str| -> i64 { db().query_row(sql, [], |r| r.get(0)).unwrap() };
    let rows = count("SELECT count(*) FROM chain_facts");
    assert!(rows > 0);
    // The earlier layout: each fact row keyed by its kind and value.
    db().execute_batch(
        "CREATE TABLE old_facts (kind TEXT NOT NULL, value TEXT NOT NULL,
             last_ns INTEGER NOT NULL, chain_seq INTEGER NOT NULL,
             PRIMARY KEY (kind, value, last_ns, chain_seq)) WITHOUT ROWID;
         INSERT INTO old_facts SELECT v.kind, v.value, f.last_ns, f.chain_seq
             FROM chain_facts f JOIN fact_values v ON v.id = f.fact;
         DROP TABLE chain_facts; DROP TABLE fact_values;
         ALTER TABLE old_facts RENAME TO chain_facts;",
    )
    .unwrap();
    let store = open(dir.path());
    assert_eq!(
        count("SELECT count(*) FROM pragma_table_info('chain_facts') WHERE name = 'kind'"),
        0
    );
    assert_eq!(count("SELECT count(*) FROM chain_facts"), rows);
    let ids = |q: ChainQuery| -> Vec<String> {
        let mut ids: Vec<String> = store
            .chains(&q)
            .unwrap()
            .into_iter()
            .map(|s| s.chain_id)
            .collect();
        ids.sort();
        ids
    };
    let by_alice = ChainQuery {
        initiator: Some("alice".into()),
        ..ChainQuery::default()
    };
    assert_eq!(ids(by_alice.clone()), vec![C1, C2]);
    // A value numbered before the move is found by its number afterwards:
    // re-assembly replaces the chain's facts instead of adding to them.
    let trees = reassemble_with_a_later_hop(&store, &hops[0]);
    let last = i64::try_from(trees[0].summary.last_unix_nanos).unwrap();
    assert!(fact_rows_not_at(dir.path(), C1, -1) > 0);
    assert_eq!(fact_rows_not_at(dir.path(), C1, last), 0, "no stale facts");
    assert_eq!(
        ids(ChainQuery {
            since: Some(505),
            ..by_alice.clone()
        }),
        vec![C1]
    );
    // Retention deletes the values no chain uses any more; a value used
    // again afterwards is numbered again and found.
    store
        .retain(
            Retention {
                max_age_secs: 1,
                max_bytes: u64::MAX,
            },
            10_000_000_000,
        )
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM chain_facts"), 0);
    assert_eq!(count("SELECT count(*) FROM fact_values"), 0);
    let fresh = [hop("n", C3, "4444444444444444", "", 20_000_000_000)];
    store.put_hops(&fresh).unwrap();
    store.put_chains(&assemble(&fresh, &[]), &[], &[]).unwrap();
    assert_eq!(ids(by_alice), vec![C3]);
}

#[test]
fn sqlite_hops_keyed_by_event_id_alone_are_rekeyed_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = hop("a", C1, "1111111111111111", "", 100);
    let mut child = hop("b", C1, "2222222222222222", "1111111111111111", 150);
    child.chain_id = C1.into();
    // The earlier layout: event id as the table's key, a time index of its own.
    {
        let conn = rusqlite::Connection::open(dir.path().join("custody.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE hops (
                 event_id TEXT PRIMARY KEY, chain_id TEXT NOT NULL, workload TEXT NOT NULL,
                 start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, context INTEGER NOT NULL,
                 conn TEXT NOT NULL, body BLOB NOT NULL);
             CREATE INDEX hops_time ON hops (start_ns);",
        )
        .unwrap();
        let mut insert = conn
            .prepare(
                "INSERT INTO hops VALUES (?1, ?2, 'spiffe://td/ns/shop/sa/web', ?3, ?3, 1, '', ?4)",
            )
            .unwrap();
        for h in [&root, &child] {
            insert
                .execute(rusqlite::params![
                    h.event_id,
                    h.chain_id,
                    h.start_unix_nanos as i64,
                    prost::Message::encode_to_vec(h)
                ])
                .unwrap();
        }
    }
    let store = open(dir.path());
    let schema = |name: &str| -> i64 {
        rusqlite::Connection::open(dir.path().join("custody.db"))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(schema("hops_time"), 0);
    assert_eq!(schema("hops_event"), 1);
    // Hops name their chain by number now.
    let columns: i64 = rusqlite::Connection::open(dir.path().join("custody.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM pragma_table_info('hops') WHERE name IN ('chain_id', 'chain_seq')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(columns, 1);
    assert_eq!(store.hop_count().unwrap(), 2);
    let mut stored = store.hops_of_chains(&[C1.to_owned()]).unwrap();
    stored.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(stored, vec![root.clone(), child.clone()]);
    // A resent event is still recognised; a new one is stored.
    let third = hop("c", C1, "3333333333333333", "1111111111111111", 160);
    let out = store.put_hops(&[child, third]).unwrap();
    assert_eq!(out.fresh, vec![false, true]);
    assert_eq!(store.hop_count().unwrap(), 3);
}

fn a_chain_is_found_by_an_id_joined_into_it(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    // A hop that lost its context starts chain C2; joined into C1 later.
    let parent = hop("a", C1, "1111111111111111", "", 100);
    let mut child = hop("b", C2, "2222222222222222", "", 101);
    child.attribution.as_mut().unwrap().method = v1::AttributionMethod::PeerOnly as i32;
    child.context_outcome = v1::ContextOutcome::Missing as i32;
    store.put_hops(&[parent.clone(), child.clone()]).unwrap();
    store
        .put_chains(&assemble(std::slice::from_ref(&child), &[]), &[], &[])
        .unwrap();
    assert!(store.chain(C2).unwrap().is_some());
    let mut tree = assemble(std::slice::from_ref(&parent), &[]).remove(0);
    tree.summary.joined_chains = vec![C2.to_owned()];
    let before = store
        .put_chains(std::slice::from_ref(&tree), &[C2.to_owned()], &[])
        .unwrap();
    assert_eq!(before, vec![None]);
    let found = store.chain(C2).unwrap().unwrap();
    assert_eq!(found.summary.chain_id, C1);
    assert_eq!(store.chains(&ChainQuery::default()).unwrap().len(), 1);
    // Stored before: its coverage is returned.
    let before = store
        .put_chains(std::slice::from_ref(&tree), &[], &[])
        .unwrap();
    assert_eq!(before, vec![Some(tree.summary.coverage)]);
}

#[test]
fn postgres_connections_use_tls_and_verify_the_server() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let pg = custody_testkit::Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
    };
    // A CA, a server certificate for 127.0.0.1 it signed, and another CA.
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
    );
    sh(
        "printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext && openssl x509 -req -in server.csr \
        -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.ext",
    );
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.crt -days 2 -subj /CN=other-ca",
    );
    // The server's certificate and key, owned by the server's user.
    let owner = std::fs::metadata(pg.data_dir()).unwrap();
    for f in ["server.crt", "server.key"] {
        let to = pg.dir().join(f);
        std::fs::copy(dir.path().join(f), &to).unwrap();
        std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // TLS on, and required of every TCP client.
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        "local all all trust\nhostssl all all 0.0.0.0/0 scram-sha-256\nhostssl all all ::/0 scram-sha-256\n",
    )
    .unwrap();
    pg.superuser_sql(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}';\nALTER SYSTEM SET ssl_key_file = '{}';\n\
         ALTER SYSTEM SET ssl = on;\nSELECT pg_reload_conf();",
        pg.dir().join("server.crt").display(),
        pg.dir().join("server.key").display()
    ))
    .unwrap();
    let options = |ca: Option<&str>| PostgresOptions {
        host: pg.host(),
        port: pg.port(),
        user: pg.user().to_owned(),
        password: Some(pg.password().to_owned()),
        dbname: pg.database().to_owned(),
        pool_size: 2,
        connect_timeout: std::time::Duration::from_secs(10),
        ca_pem: ca.map(|f| std::fs::read(dir.path().join(f)).unwrap()),
    };
    // The reload is asynchronous: wait until a TLS connection works.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let store = loop {
        match PostgresStore::open(&options(Some("ca.crt"))) {
            Ok(store) => break store,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    };
    store
        .put_hops(&[hop("a", C1, "1111111111111111", "", 100)])
        .unwrap();
    assert_eq!(store.hop_count().unwrap(), 1);
    // Plain TCP is refused by the server; another CA is refused by the client.
    let plain = PostgresStore::open(&options(None)).unwrap_err().to_string();
    assert!(plain.contains("pg_hba.conf"), "{plain}");
    let other = PostgresStore::open(&options(Some("other.crt")))
        .unwrap_err()
        .to_string();
    assert!(other.to_lowercase().contains("certificate"), "{other}");
}

#[test]
fn postgres_schema_is_versioned_and_a_newer_one_is_refused() {
    let backend = Postgres::new();
    let sql = |q: &str| {
        backend
            .server
            .superuser_sql(&format!("\\c {}\n{q}", backend.dbname))
            .unwrap()
            .trim()
            .to_owned()
    };
    let store = backend.open();
    store
        .put_hops(&[hop("a", C1, "1111111111111111", "", 100)])
        .unwrap();
    drop(store);
    assert_eq!(sql("SELECT version FROM schema_version;"), "1");
    // Opening again migrates nothing and keeps the data.
    assert_eq!(backend.open().hop_count().unwrap(), 1);
    assert_eq!(sql("SELECT count(*) FROM schema_version;"), "1");
    // A schema written by a later server is not touched.
    sql("UPDATE schema_version SET version = 99;");
    let refused = PostgresStore::open(&backend.options())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("newer"), "{refused}");
}

fn a_chain_reported_again_after_retention_is_stored_whole(b: &dyn Backend) {
    let store = b.open();
    let store = store.as_ref();
    let now = 1_000_000_000_000_000u64;
    let hour = 3_600_000_000_000u64;
    let old = hop("old", C1, "1111111111111111", "", now - 5 * hour);
    let other = hop("other", C2, "2222222222222222", "", now - hour);
    store.put_hops(&[old, other.clone()]).unwrap();
    let out = store
        .retain(
            Retention {
                max_age_secs: 2 * 3600,
                max_bytes: u64::MAX,
            },
            now,
        )
        .unwrap();
    assert_eq!(out.hops, 1);
    assert!(store.hops_of_chains(&[C1.to_owned()]).unwrap().is_empty());
    // The same chain id again (a long-lived chain, or a reused id): its new
    // hops are found under it, and the chain kept is untouched.
    let again = hop("again", C1, "3333333333333333", "", now);
    let late = hop("late", C1, "4444444444444444", "3333333333333333", now + 1);
    store.put_hops(std::slice::from_ref(&again)).unwrap();
    store.put_hops(std::slice::from_ref(&late)).unwrap();
    let mut found = store.hops_of_chains(&[C1.to_owned()]).unwrap();
    found.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(found, vec![again, late]);
    assert_eq!(
        store
            .chain_hop_counts(&[C1.to_owned(), C2.to_owned()])
            .unwrap(),
        vec![2, 1]
    );
    assert_eq!(store.hops_of_chains(&[C2.to_owned()]).unwrap(), vec![other]);
}
