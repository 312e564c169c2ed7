//! The embedded store: SQLite in WAL mode, three files (`custody.db`:
//! events, the pending queue, policy; `chains.db`: assembled chains and
//! their facts; `ids.db`: the index from chain id to chain number), the
//! first two each with a writer connection of its own, which also writes
//! `ids.db`, and one reader connection that sees all three; events kept as
//! protobuf blobs next to the columns the queries filter on, chain facts
//! in one indexed table.
//!
//! Hop batches are group-committed: each caller encodes its rows, queues
//! them, and waits for the writer; whoever takes the writer writes every
//! queued batch in one transaction (one WAL sync) and hands each caller its
//! outcome after the commit, so every caller still returns only once its
//! batch is durable.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use custody_context::api::v1::{FlowEvent, HopEvent};
use prost::Message as _;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OptionalExtension as _, params, params_from_iter};

mod chain_numbers;
mod fact_ids;
mod longest;

use chain_numbers::ChainNumbers;
use fact_ids::FactIds;

/// Keyed by chain ids that sidecars report; seeded per process.
type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use super::common::{HopRow, fact_filters, facts, i64_of, shape, u64_of};
use super::compact::{encode_shape, encode_summary, stored_shape, stored_summary};
use super::{
    AuditEntry, ChainQuery, ClientVersion, IssuedKey, PolicyState, PutOutcome, Retention,
    RetentionOutcome, Store, StoreError, contains_any,
};
use crate::assembly::{ChainSummary, ChainTree, Coverage, Join, connection_key, node};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hops (
    event_id TEXT NOT NULL,
    chain_seq INTEGER NOT NULL,
    workload TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    context INTEGER NOT NULL,
    conn TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS hops_event ON hops (start_ns, event_id);
CREATE INDEX IF NOT EXISTS hops_chain ON hops (chain_seq);
CREATE INDEX IF NOT EXISTS hops_contextless ON hops (start_ns) WHERE context = 0;
CREATE INDEX IF NOT EXISTS hops_conn ON hops (conn) WHERE conn != '';
CREATE INDEX IF NOT EXISTS hops_parents_by_end ON hops (workload, end_ns, start_ns) WHERE context = 1;
CREATE TABLE IF NOT EXISTS pending (
    chain_seq INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flows (
    event_id TEXT PRIMARY KEY,
    at_ns INTEGER NOT NULL,
    conn TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS flows_conn ON flows (conn) WHERE conn != '';
CREATE INDEX IF NOT EXISTS flows_time ON flows (at_ns);
CREATE TABLE IF NOT EXISTS policy_current (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_versions (
    version INTEGER PRIMARY KEY,
    at_ns INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ns INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    version INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS client_versions (
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER NOT NULL,
    apply_ns INTEGER NOT NULL,
    acked_ns INTEGER NOT NULL,
    latency_ns INTEGER NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (client, kind)
);
CREATE TABLE IF NOT EXISTS signing_keys (
    key_id TEXT PRIMARY KEY,
    public BLOB NOT NULL,
    workload TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
";

/// The chain-id file (`ids.db`): the index from chain id to number, in a
/// file of its own so that writing a sorted batch of new ids (up to a
/// second at millions of chains) holds up neither commits of hops nor of
/// trees; see `sqlite/chain_numbers.rs`.
const IDS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS chain_ids (
    seq INTEGER PRIMARY KEY,
    chain_id TEXT NOT NULL UNIQUE
);";

/// The chains' file (`chains.db`): assembled trees and the facts they are
/// found by, written by a writer of their own so that storing a pass of
/// trees never holds up a commit of hops, nor the other way round.
const CHAINS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS chains (
    chain_seq INTEGER PRIMARY KEY,
    coverage TEXT NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    summary TEXT NOT NULL,
    shape TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chains_time ON chains (last_ns);
CREATE INDEX IF NOT EXISTS chains_coverage ON chains (coverage, last_ns);
CREATE TABLE IF NOT EXISTS chain_facts (
    fact INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    chain_seq INTEGER NOT NULL,
    PRIMARY KEY (fact, last_ns, chain_seq)
) WITHOUT ROWID;
";

/// The events' writer's page cache (`cache_size`, negative: KiB): 8 MiB.
/// It appends: what it changes is the right-hand edges of the tables and
/// indexes and the pages of the log not yet checkpointed (the rest is
/// read through the mapping). Bigger costs more: B-tree rebalancing parks
/// a page at a number past 1 GiB, and every commit to a smaller file then
/// scans the whole cache to drop it (`pcache1TruncateUnsafe`, 3% of the
/// CPU time of ingest at 64 MiB, with a commit per few batches).
const EVENTS_CACHE_KIB: i64 = -8_192;

/// The chains' writer's page cache: 64 MiB. A pass of trees adds fact
/// rows all over the fact index (a principal's rows are together, and a
/// pass names a thousand principals); in a smaller cache they spill to
/// the log before the commit. It commits once per pass, so the scan above
/// costs little.
const CHAINS_CACHE_KIB: i64 = -65_536;

/// The database file is mapped up to this size (1 GiB); beyond it, pages
/// are read with `pread`.
const MMAP_BYTES: i64 = 1 << 30;

/// The stored hops of one chain number.
const HOPS_OF_CHAIN: &str = "SELECT body FROM hops WHERE chain_seq = ?1";

/// How the embedded store is opened.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The data directory; the database is `custody.db` inside it.
    pub data_dir: PathBuf,
    /// `FULL` syncs every commit to disk (survives power loss); `false`
    /// gives `NORMAL` (survives a process crash, may lose the last commits
    /// on power loss).
    pub sync_full: bool,
}

/// The embedded SQLite store.
pub struct SqliteStore {
    /// Writes `custody.db`: events, the pending queue, policy; reads and
    /// (at open, for retention, or when assembly stalls) writes `ids.db`;
    /// reads `chains.db` only for retention.
    writer: Mutex<Connection>,
    /// Writes `chains.db`; reads `ids.db`.
    chains_writer: Mutex<Connection>,
    /// Writes new chain ids to `ids.db` in batches, on the assembler's
    /// thread before a pass ([`Store::upkeep`]).
    ids_writer: Mutex<Connection>,
    /// Reads all three files.
    reader: Mutex<Connection>,
    path: PathBuf,
    hop_queue: Mutex<HopQueue>,
    /// Recently used chain numbers; changed only with the events' writer
    /// held, read by tree stores too (never locked across a commit).
    chain_seqs: Mutex<IdMap<String, i64>>,
    /// Chain numbers not yet in the chain-id index; given and written with
    /// the writer held, read by every lookup by chain id.
    numbers: Mutex<ChainNumbers>,
    /// The longest request stored for each workload (nanoseconds), raised
    /// by the events' writer before it commits; see `sqlite/longest.rs`.
    longest: Mutex<IdMap<String, i64>>,
    /// Numbers of fact values; only used and changed with the writer held.
    fact_ids: Mutex<FactIds>,
    /// Chains whose trees are stored, with the pending generation they
    /// were assembled at: taken off the pending queue by the next commit
    /// of the events' writer.
    assembled: Mutex<Vec<Assembled>>,
}

/// Chain numbers remembered at most; the map is emptied when full (the
/// hops of a chain arrive close together, so recent ones are what matter).
const CHAIN_SEQ_CACHE: usize = 100_000;

/// Hop batches waiting for the writer, and outcomes of batches another
/// caller committed.
#[derive(Default)]
struct HopQueue {
    next: u64,
    waiting: Vec<(u64, Vec<HopRow>)>,
    done: HashMap<u64, Result<PutOutcome, String>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `options.data_dir`.
    pub fn open(options: &SqliteOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&options.data_dir)?;
        let path = options.data_dir.join("custody.db");
        let chains_path = options.data_dir.join("chains.db");
        let ids_path = options.data_dir.join("ids.db");
        let mut writer = Connection::open(&path)?;
        // An ingest acknowledgement means "durable": in WAL mode `FULL`
        // syncs the log at every commit, so an acknowledged batch survives
        // a power loss as well as a crash. `NORMAL` syncs only at
        // checkpoints: it survives SIGKILL (the log is in the page cache)
        // but may lose the last acknowledged batches on power loss, so it
        // is an explicit choice (`sync: normal`), never the default. The
        // sync costs little here: each commit covers a whole batch, and
        // profiles put `fsync` at 1-2% of the CPU time of ingest.
        configure_writer(&writer, options.sync_full, EVENTS_CACHE_KIB)?;
        migrate(&writer)?;
        writer.execute_batch(SCHEMA)?;
        let longest = longest::open(&writer)?;
        // Trees are always synced: a chain leaves the pending queue (in
        // `custody.db`) only once its tree is on disk, so that no power
        // loss can leave a chain neither assembled nor queued. It is one
        // sync per pass of up to 4,000 chains.
        let chains_writer = Connection::open(&chains_path)?;
        configure_writer(&chains_writer, true, CHAINS_CACHE_KIB)?;
        chains_writer.execute_batch(CHAINS_SCHEMA)?;
        chains_writer.execute_batch(fact_ids::VALUES_TABLE)?;
        // Its writes need no sync of their own: ids lost with the end of
        // its log are read back from the hops (`chain_numbers::recover`).
        // A batch lands on most pages of the index: the larger cache.
        let ids_writer = Connection::open(&ids_path)?;
        configure_writer(&ids_writer, false, CHAINS_CACHE_KIB)?;
        ids_writer.execute_batch(IDS_SCHEMA)?;
        attach(&writer, &chains_path, "chains_db")?;
        attach(&writer, &ids_path, "ids_db")?;
        move_tables(&writer, "chains_db", &CHAIN_TABLES)?;
        move_tables(&writer, "ids_db", &ID_TABLES)?;
        attach(&chains_writer, &ids_path, "ids_db")?;
        for conn in [&writer, &chains_writer] {
            conn.pragma_update(Some("ids_db"), "synchronous", "NORMAL")?;
            conn.pragma_update(Some("ids_db"), "cache_size", -65_536)?;
        }
        let numbers = chain_numbers::recover(&mut writer)?;
        let reader = Connection::open(&path)?;
        reader.busy_timeout(std::time::Duration::from_secs(10))?;
        attach(&reader, &chains_path, "chains_db")?;
        attach(&reader, &ids_path, "ids_db")?;
        for schema in ["main", "chains_db", "ids_db"] {
            reader.pragma_update(Some(schema), "cache_size", -65_536)?;
            // Every commit of a writer empties the reader's page cache of
            // that file, so without a mapping each read pays a `pread` and
            // a copy per page.
            reader.pragma_update(Some(schema), "mmap_size", MMAP_BYTES)?;
        }
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            chains_writer: Mutex::new(chains_writer),
            ids_writer: Mutex::new(ids_writer),
            reader: Mutex::new(reader),
            path,
            hop_queue: Mutex::new(HopQueue::default()),
            chain_seqs: Mutex::new(IdMap::default()),
            numbers: Mutex::new(numbers),
            fact_ids: Mutex::new(FactIds::default()),
            longest: Mutex::new(longest),
            assembled: Mutex::new(Vec::new()),
        })
    }

    /// The events' database file (`custody.db`; `chains.db` and `ids.db`
    /// are next to it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes new chain ids to the index after `n` new chains.
    #[cfg(test)]
    pub(crate) fn flush_chain_numbers_every(&self, n: usize) {
        lock(&self.numbers).flush_every(n);
    }
}

/// Settings of a connection that writes: WAL, syncing every commit when
/// `sync_full`, a page cache of `cache_kib`, checkpoints every 64 MiB of log.
fn configure_writer(conn: &Connection, sync_full: bool, cache_kib: i64) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        if sync_full { "FULL" } else { "NORMAL" },
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "cache_size", cache_kib)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    // Checkpoint every 64 MiB of WAL instead of every 4 MiB: hot index
    // pages are copied into the database once per checkpoint, not once
    // per few batches. The writer does it, right after a commit: a
    // checkpoint from another thread while ingest goes on never copies
    // the whole log, so the log is never started over and grows (to
    // a gigabyte, measured), and every read then searches a longer log.
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)?;
    conn.pragma_update(None, "journal_size_limit", 128_i64 << 20)?;
    // Room for the fact inserts of every size next to the other statements.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Attaches the database file `path` to `conn` as `name`.
fn attach(conn: &Connection, path: &Path, name: &str) -> Result<(), StoreError> {
    let path = path
        .to_str()
        .ok_or_else(|| std::io::Error::other(format!("{} is not UTF-8", path.display())))?;
    conn.execute(&format!("ATTACH DATABASE ?1 AS {name}"), [path])?;
    Ok(())
}

/// Chains, their facts and fact values were kept in `custody.db`; they move
/// to `chains.db` as they are.
const CHAIN_TABLES: [(&str, &str); 3] = [
    (
        "chains",
        "INSERT OR REPLACE INTO chains_db.chains
             (chain_seq, coverage, first_ns, last_ns, summary, shape)
         SELECT chain_seq, coverage, first_ns, last_ns, summary, shape FROM main.chains;",
    ),
    (
        "fact_values",
        "INSERT OR IGNORE INTO chains_db.fact_values (id, kind, value)
         SELECT id, kind, value FROM main.fact_values;",
    ),
    (
        "chain_facts",
        "INSERT OR IGNORE INTO chains_db.chain_facts (fact, last_ns, chain_seq)
         SELECT fact, last_ns, chain_seq FROM main.chain_facts;",
    ),
];

/// The chain-id index was kept in `custody.db`; it moves to `ids.db`.
const ID_TABLES: [(&str, &str); 1] = [(
    "chain_ids",
    "INSERT OR IGNORE INTO ids_db.chain_ids (seq, chain_id)
     SELECT seq, chain_id FROM main.chain_ids;",
)];

/// Moves the `tables` still in `custody.db` (`main`) to the file attached
/// to `conn` as `to`, each by its copy statement. Copied first and dropped
/// after, in two transactions: a crash in between leaves both copies, and
/// the next open copies again over the first.
fn move_tables(conn: &Connection, to: &str, tables: &[(&str, &str)]) -> Result<(), StoreError> {
    let mut copy = String::from("BEGIN;");
    let mut drop = String::from("BEGIN;");
    let mut moved = Vec::new();
    for (table, sql) in tables {
        let present: i64 = conn.query_row(
            "SELECT count(*) FROM main.sqlite_schema WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )?;
        if present > 0 {
            copy.push_str(sql);
            drop.push_str(&format!("DROP TABLE main.{table};"));
            moved.push(*table);
        }
    }
    if moved.is_empty() {
        return Ok(());
    }
    tracing::info!(
        ?moved,
        to,
        "store: moving tables to their own file (one-time migration)"
    );
    conn.execute_batch(&format!("{copy}COMMIT;"))?;
    conn.execute_batch(&format!("{drop}COMMIT;"))?;
    Ok(())
}

/// Moves a store written by an earlier layout to this one: chains kept
/// their whole tree as JSON (now only its shape; the nodes are rebuilt from
/// the stored hops) and facts had no time, so those tables are dropped and
/// every chain is queued for assembly again; one parent-search index was
/// wider; facts had an index by chain id (a chain's facts are now found
/// from its stored summary, see [`delete_facts`]); chains, their facts and
/// the pending queue were keyed by chain id (see [`migrate_chain_keys`]).
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    migrate_hop_keys(conn)?;
    let old_chains: i64 = conn.query_row(
        "SELECT (SELECT count(*) FROM pragma_table_info('chains') WHERE name = 'tree')
              + (SELECT count(*) FROM sqlite_schema WHERE name = 'chain_facts')
              - (SELECT count(*) FROM pragma_table_info('chain_facts') WHERE name = 'last_ns')",
        [],
        |r| r.get(0),
    )?;
    if old_chains > 0 {
        conn.execute_batch(
            "BEGIN;
             DROP TABLE IF EXISTS chains;
             DROP TABLE IF EXISTS chain_facts;
             DROP TABLE IF EXISTS pending;
             CREATE TABLE pending (
                 chain_seq INTEGER PRIMARY KEY,
                 generation INTEGER NOT NULL
             );
             INSERT INTO pending (chain_seq, generation) SELECT DISTINCT chain_seq, 1 FROM hops;
             COMMIT;",
        )?;
    }
    conn.execute_batch(
        "DROP INDEX IF EXISTS hops_workload_time;
         DROP INDEX IF EXISTS chain_facts_chain;",
    )?;
    // Parents were searched by start time: 10 s of one workload's earlier
    // hops per search. By end time, what is searched is what ended after
    // the contextless hop did, which in a stream arriving in time order is
    // the few hops ingested since (see `hops_containing`).
    let by_start: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = 'hops_parents'",
        [],
        |r| r.get(0),
    )?;
    if by_start > 0 {
        tracing::info!("store: indexing parent candidates by end time (one-time migration)");
        conn.execute_batch("DROP INDEX hops_parents;")?;
    }
    migrate_chain_keys(conn)?;
    fact_ids::migrate(conn)
}

/// Chains, their facts and the pending queue were keyed by chain id, a
/// random key: each chain assembled dirtied a page of the chains' id index
/// and of the queue, which the commit then wrote out. They are keyed by
/// chain number now (given in order of first sight, so new keys land at
/// the end); the id is found through `chain_ids`. Rows move as they are.
fn migrate_chain_keys(conn: &Connection) -> Result<(), StoreError> {
    let by_id = |table: &str| -> Result<bool, StoreError> {
        let n: i64 = conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'chain_id'",
            [table],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    };
    let (chains, facts, pending) = (by_id("chains")?, by_id("chain_facts")?, by_id("pending")?);
    if !(chains || facts || pending) {
        return Ok(());
    }
    tracing::info!("store: keying chains by chain number (one-time migration)");
    let mut sql = String::from("BEGIN;");
    for (by_id, table) in [
        (chains, "chains"),
        (facts, "chain_facts"),
        (pending, "pending"),
    ] {
        if by_id {
            // Ids with no number yet (a chain kept longer than its hops).
            sql.push_str(&format!(
                "INSERT OR IGNORE INTO chain_ids (chain_id) SELECT chain_id FROM {table};"
            ));
        }
    }
    if chains {
        sql.push_str(
            "CREATE TABLE chains_by_seq (
                 chain_seq INTEGER PRIMARY KEY,
                 coverage TEXT NOT NULL,
                 first_ns INTEGER NOT NULL,
                 last_ns INTEGER NOT NULL,
                 summary TEXT NOT NULL,
                 shape TEXT NOT NULL
             );
             INSERT INTO chains_by_seq (chain_seq, coverage, first_ns, last_ns, summary, shape)
                 SELECT i.seq, c.coverage, c.first_ns, c.last_ns, c.summary, c.shape
                 FROM chains c JOIN chain_ids i ON i.chain_id = c.chain_id;
             DROP TABLE chains;
             ALTER TABLE chains_by_seq RENAME TO chains;",
        );
    }
    if facts {
        sql.push_str(
            "CREATE TABLE chain_facts_by_seq (
                 kind TEXT NOT NULL,
                 value TEXT NOT NULL,
                 last_ns INTEGER NOT NULL,
                 chain_seq INTEGER NOT NULL,
                 PRIMARY KEY (kind, value, last_ns, chain_seq)
             ) WITHOUT ROWID;
             INSERT OR IGNORE INTO chain_facts_by_seq (kind, value, last_ns, chain_seq)
                 SELECT f.kind, f.value, f.last_ns, i.seq
                 FROM chain_facts f JOIN chain_ids i ON i.chain_id = f.chain_id;
             DROP TABLE chain_facts;
             ALTER TABLE chain_facts_by_seq RENAME TO chain_facts;",
        );
    }
    if pending {
        sql.push_str(
            "CREATE TABLE pending_by_seq (
                 chain_seq INTEGER PRIMARY KEY,
                 generation INTEGER NOT NULL
             );
             INSERT OR IGNORE INTO pending_by_seq (chain_seq, generation)
                 SELECT i.seq, p.generation FROM pending p JOIN chain_ids i ON i.chain_id = p.chain_id;
             DROP TABLE pending;
             ALTER TABLE pending_by_seq RENAME TO pending;",
        );
    }
    sql.push_str("COMMIT;");
    conn.execute_batch(&sql)?;
    Ok(())
}

/// Hops were keyed by event id and indexed by chain id, both random keys:
/// every insert dirtied a page of each index of its own, which the commit
/// then wrote out. Now a resent event is told apart by `(start_ns,
/// event_id)` (it keeps its start time), whose new keys land at the end of
/// the index and which serves the time queries too; and hops name their
/// chain by a number given in order of first sight (`chain_ids`), so a
/// chain costs one random insert instead of one per hop.
fn migrate_hop_keys(conn: &Connection) -> Result<(), StoreError> {
    let by_chain_id: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('hops') WHERE name = 'chain_id'",
        [],
        |r| r.get(0),
    )?;
    if by_chain_id == 0 {
        return Ok(());
    }
    tracing::info!("store: re-keying hops by time and chain number (one-time migration)");
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS chain_ids (
             seq INTEGER PRIMARY KEY,
             chain_id TEXT NOT NULL UNIQUE
         );
         INSERT OR IGNORE INTO chain_ids (chain_id)
             SELECT chain_id FROM hops GROUP BY chain_id ORDER BY min(start_ns);
         CREATE TABLE hops_rekeyed (
             event_id TEXT NOT NULL,
             chain_seq INTEGER NOT NULL,
             workload TEXT NOT NULL,
             start_ns INTEGER NOT NULL,
             end_ns INTEGER NOT NULL,
             context INTEGER NOT NULL,
             conn TEXT NOT NULL,
             body BLOB NOT NULL
         );
         INSERT INTO hops_rekeyed (event_id, chain_seq, workload, start_ns, end_ns, context, conn, body)
             SELECT h.event_id, c.seq, h.workload, h.start_ns, h.end_ns, h.context, h.conn, h.body
             FROM hops h JOIN chain_ids c ON c.chain_id = h.chain_id ORDER BY h.rowid;
         DROP TABLE hops;
         ALTER TABLE hops_rekeyed RENAME TO hops;
         COMMIT;",
    )?;
    Ok(())
}

fn decode_hops(rows: Vec<Vec<u8>>) -> Result<Vec<HopEvent>, StoreError> {
    rows.iter()
        .map(|b| HopEvent::decode(b.as_slice()).map_err(StoreError::from))
        .collect()
}

impl Store for SqliteStore {
    fn put_hops(&self, hops: &[HopEvent]) -> Result<PutOutcome, StoreError> {
        // Encoded before queueing: callers do this in parallel.
        let rows: Vec<HopRow> = hops.iter().map(HopRow::of).collect();
        let ticket = {
            let mut q = lock(&self.hop_queue);
            q.next += 1;
            let ticket = q.next;
            q.waiting.push((ticket, rows));
            ticket
        };
        let mut conn = lock(&self.writer);
        // Outcomes are published before the writer is released, so a batch
        // another caller wrote is found here.
        let group = {
            let mut q = lock(&self.hop_queue);
            if let Some(done) = q.done.remove(&ticket) {
                return done.map_err(StoreError::Group);
            }
            std::mem::take(&mut q.waiting)
        };
        let assembled = std::mem::take(&mut *lock(&self.assembled));
        let written = {
            let stores = HopStores {
                numbers: &self.numbers,
                longest: &self.longest,
            };
            write_hop_batches(&mut conn, &group, &assembled, &self.chain_seqs, &stores)
        };
        if written.is_err() {
            // Taken off the queue by a later commit.
            lock(&self.assembled).extend(assembled);
        }
        let mut q = lock(&self.hop_queue);
        let mut mine = None;
        match written {
            Ok(outcomes) => {
                for ((t, _), out) in group.iter().zip(outcomes) {
                    if *t == ticket {
                        mine = Some(Ok(out));
                    } else {
                        q.done.insert(*t, Ok(out));
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (t, _) in &group {
                    if *t != ticket {
                        q.done.insert(*t, Err(message.clone()));
                    }
                }
                mine = Some(Err(e));
            }
        }
        drop(q);
        drop(conn);
        // Chains stored while this commit ran, unless the next one takes them.
        if lock(&self.hop_queue).waiting.is_empty() {
            self.flush_assembled();
        }
        mine.unwrap_or_else(|| Err(StoreError::Group("batch not in its group".into())))
    }

    fn put_flows(&self, flows: &[FlowEvent]) -> Result<PutOutcome, StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction()?;
        let mut out = PutOutcome::default();
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO flows (event_id, at_ns, conn, body) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for flow in flows {
                let n = stmt.execute(params![
                    flow.event_id,
                    i64_of(flow.unix_nanos),
                    flow.connection
                        .as_ref()
                        .map(connection_key)
                        .unwrap_or_default(),
                    flow.encode_to_vec()
                ])?;
                out.fresh.push(n == 1);
                if n == 1 {
                    out.accepted += 1;
                } else {
                    out.duplicates += 1;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn hops_of_chains(&self, chain_ids: &[String]) -> Result<Vec<HopEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(HOPS_OF_CHAIN)?;
        let mut out = Vec::with_capacity(chain_ids.len() * 4);
        for id in chain_ids {
            let Some(seq) = self.seq_of(&conn, id)? else {
                continue;
            };
            let mut rows = stmt.query([seq])?;
            while let Some(row) = rows.next()? {
                // Decoded in place, without copying the blob first.
                let body = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
                out.push(HopEvent::decode(body)?);
            }
        }
        Ok(out)
    }

    fn chain_hop_counts(&self, chain_ids: &[String]) -> Result<Vec<u64>, StoreError> {
        let conn = lock(&self.reader);
        // Answered from the chain index alone.
        let mut stmt = conn.prepare_cached("SELECT count(*) FROM hops WHERE chain_seq = ?1")?;
        chain_ids
            .iter()
            .map(|id| match self.seq_of(&conn, id)? {
                Some(seq) => Ok(u64_of(stmt.query_row([seq], |r| r.get::<_, i64>(0))?)),
                None => Ok(0),
            })
            .collect()
    }

    fn hops_in_window(
        &self,
        workloads: &[String],
        earliest: u64,
        latest: u64,
        ended_by: u64,
    ) -> Result<Vec<HopEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT body FROM hops WHERE workload = ?1 AND start_ns BETWEEN ?2 AND ?3
             AND end_ns >= ?4 AND context = 1",
        )?;
        let mut rows = Vec::new();
        for w in workloads {
            for body in stmt.query_map(
                params![w, i64_of(earliest), i64_of(latest), i64_of(ended_by)],
                |r| r.get::<_, Vec<u8>>(0),
            )? {
                rows.push(body?);
            }
        }
        decode_hops(rows)
    }

    fn hops_containing(
        &self,
        workload: &str,
        spans: &[(u64, u64)],
        max_request_nanos: u64,
    ) -> Result<Vec<HopEvent>, StoreError> {
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            return Ok(Vec::new());
        };
        let ended_by = spans.iter().map(|s| s.1).min().unwrap_or(0);
        // A parent lasts at most `max_request_nanos`, and no longer than
        // the longest request of its workload stored
        // (`sqlite/longest.rs`), so it started at most that long before
        // the first span and ended at most that long after the last one
        // started: both its start and its end lie in windows that wide.
        let Some(longest) = lock(&self.longest).get(workload).copied() else {
            return Ok(Vec::new());
        };
        let max_request_nanos = max_request_nanos.min(u64_of(longest));
        let conn = lock(&self.reader);
        // Both reads see one snapshot.
        let tx = conn.unchecked_transaction()?;
        // The candidates' times from the index alone (no row is read), then
        // the bodies of those that contain a span: most candidates do not.
        let containing: Vec<i64> = {
            let mut stmt = tx.prepare_cached(
                "SELECT rowid, start_ns, end_ns FROM hops WHERE workload = ?1
                 AND end_ns BETWEEN ?2 AND ?3 AND start_ns BETWEEN ?4 AND ?5 AND context = 1",
            )?;
            let mut rows = stmt.query(params![
                workload,
                i64_of(ended_by),
                i64_of(last.0.saturating_add(max_request_nanos)),
                i64_of(first.0.saturating_sub(max_request_nanos)),
                i64_of(last.0),
            ])?;
            let mut ids = Vec::new();
            while let Some(row) = rows.next()? {
                if contains_any(spans, u64_of(row.get(1)?), u64_of(row.get(2)?)) {
                    ids.push(row.get(0)?);
                }
            }
            ids
        };
        let mut body = tx.prepare_cached("SELECT body FROM hops WHERE rowid = ?1")?;
        let mut out = Vec::with_capacity(containing.len());
        for id in containing {
            let mut rows = body.query([id])?;
            if let Some(row) = rows.next()? {
                let bytes = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
                out.push(HopEvent::decode(bytes)?);
            }
        }
        Ok(out)
    }

    fn contextless_in_window(&self, from: u64, to: u64) -> Result<Vec<HopEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT body FROM hops WHERE context = 0 AND start_ns BETWEEN ?1 AND ?2",
        )?;
        let rows = stmt
            .query_map(params![i64_of(from), i64_of(to)], |r| {
                r.get::<_, Vec<u8>>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        decode_hops(rows)
    }

    fn hops_by_connection(&self, keys: &[String]) -> Result<Vec<HopEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached("SELECT body FROM hops WHERE conn = ?1 AND conn != ''")?;
        let mut rows = Vec::new();
        for k in keys {
            for body in stmt.query_map([k], |r| r.get::<_, Vec<u8>>(0))? {
                rows.push(body?);
            }
        }
        decode_hops(rows)
    }

    fn flows_by_connection(&self, keys: &[String]) -> Result<Vec<FlowEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached("SELECT body FROM flows WHERE conn = ?1 AND conn != ''")?;
        let mut out = Vec::new();
        for k in keys {
            for body in stmt.query_map([k], |r| r.get::<_, Vec<u8>>(0))? {
                out.push(FlowEvent::decode(body?.as_slice())?);
            }
        }
        Ok(out)
    }

    fn flows_in_window(&self, from: u64, to: u64) -> Result<Vec<FlowEvent>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached("SELECT body FROM flows WHERE at_ns BETWEEN ?1 AND ?2")?;
        let rows = stmt
            .query_map(params![i64_of(from), i64_of(to)], |r| {
                r.get::<_, Vec<u8>>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.iter()
            .map(|b| FlowEvent::decode(b.as_slice()).map_err(StoreError::from))
            .collect()
    }

    fn put_chains(
        &self,
        trees: &[ChainTree],
        superseded: &[String],
        assembled: &[(String, u64)],
    ) -> Result<Vec<Option<Coverage>>, StoreError> {
        // Encoded before the writer is taken.
        let rows = trees
            .iter()
            .map(|t| (encode_summary(&t.summary), encode_shape(&shape(t))))
            .collect::<Vec<_>>();
        // Numbers the events' writer has cached, copied out so that it is
        // not held up while the trees are written.
        let known: IdMap<String, i64> = {
            let seqs = lock(&self.chain_seqs);
            trees
                .iter()
                .map(|t| &t.summary.chain_id)
                .chain(superseded)
                .chain(assembled.iter().map(|(id, _)| id))
                .filter_map(|id| seqs.get(id).map(|seq| (id.clone(), *seq)))
                .collect()
        };
        let (before, done) = {
            let mut conn = lock(&self.chains_writer);
            let mut fact_ids = lock(&self.fact_ids);
            write_chains(
                &mut conn,
                &known,
                &self.numbers,
                &mut fact_ids,
                &ChainWrite {
                    trees,
                    rows: &rows,
                    superseded,
                    assembled,
                },
            )?
        };
        // The trees are on disk: their chains leave the pending queue with
        // the next commit of hops, or now if the events' writer is free.
        lock(&self.assembled).extend(done);
        self.flush_assembled();
        Ok(before)
    }

    fn upkeep(&self) -> Result<(), StoreError> {
        if lock(&self.numbers).due() {
            self.write_chain_ids()?;
        }
        Ok(())
    }

    fn pending_generations(&self, chain_ids: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached("SELECT generation FROM pending WHERE chain_seq = ?1")?;
        let mut out = Vec::new();
        for id in chain_ids {
            let Some(seq) = self.seq_of(&conn, id)? else {
                continue;
            };
            if let Some(g) = stmt.query_row([seq], |r| r.get::<_, i64>(0)).optional()? {
                out.push((id.clone(), u64_of(g)));
            }
        }
        Ok(out)
    }

    fn pending_chains(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let conn = lock(&self.reader);
        // Oldest first: chains are numbered in order of first sight.
        let mut stmt = conn.prepare_cached(
            "SELECT p.chain_seq, i.chain_id FROM pending p LEFT JOIN chain_ids i ON i.seq = p.chain_seq
             ORDER BY p.chain_seq LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([i64::from(limit)], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        if rows.iter().all(|(_, id)| id.is_some()) {
            return Ok(rows.into_iter().filter_map(|(_, id)| id).collect());
        }
        // Chains numbered since the index was last written are named from
        // memory, or from the index if a flush wrote them since the read.
        let unflushed = lock(&self.numbers).by_seq();
        let mut indexed = conn.prepare_cached("SELECT chain_id FROM chain_ids WHERE seq = ?1")?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, id) in rows {
            let id = match id.or_else(|| unflushed.get(&seq).cloned()) {
                Some(id) => Some(id),
                None => indexed.query_row([seq], |r| r.get(0)).optional()?,
            };
            out.extend(id);
        }
        Ok(out)
    }

    fn chains(&self, q: &ChainQuery) -> Result<Vec<ChainSummary>, StoreError> {
        let filters = fact_filters(q);
        let mut args: Vec<Value> = Vec::new();
        // With a fact to filter on, its index (newest first) drives the
        // query, so only about `limit` chains are read; otherwise the
        // chains' time index does.
        let driver = filters.iter().position(|(_, v)| v.is_some());
        let (mut sql, order) = match driver.and_then(|d| filters[d].1.as_ref().map(|v| (d, v))) {
            Some((d, v)) => {
                args.push(Value::Text(filters[d].0.to_owned()));
                args.push(Value::Text(v.clone()));
                (
                    String::from(
                        "SELECT c.summary FROM chain_facts f CROSS JOIN chains c
                         WHERE f.fact = (SELECT id FROM fact_values WHERE kind = ? AND value = ?)
                         AND c.chain_seq = f.chain_seq AND c.last_ns = f.last_ns",
                    ),
                    " ORDER BY f.last_ns DESC, f.chain_seq LIMIT ?",
                )
            }
            None => (
                String::from("SELECT c.summary FROM chains c WHERE 1 = 1"),
                " ORDER BY c.last_ns DESC, c.chain_seq LIMIT ?",
            ),
        };
        for (i, (kind, value)) in filters.iter().enumerate() {
            if let Some(v) = value
                && Some(i) != driver
            {
                // A point lookup per candidate chain: facts carry its time.
                sql.push_str(
                    " AND EXISTS (SELECT 1 FROM chain_facts g
                      WHERE g.fact = (SELECT id FROM fact_values WHERE kind = ? AND value = ?)
                      AND g.last_ns = c.last_ns AND g.chain_seq = c.chain_seq)",
                );
                args.push(Value::Text((*kind).to_owned()));
                args.push(Value::Text(v.clone()));
            }
        }
        if let Some(c) = q.coverage {
            sql.push_str(" AND c.coverage = ?");
            args.push(Value::Text(c.as_str().to_owned()));
        }
        if let Some(since) = q.since {
            sql.push_str(" AND c.last_ns >= ?");
            args.push(Value::Integer(i64_of(since)));
            if driver.is_some() {
                sql.push_str(" AND f.last_ns >= ?");
                args.push(Value::Integer(i64_of(since)));
            }
        }
        if let Some(until) = q.until {
            sql.push_str(" AND c.first_ns <= ?");
            args.push(Value::Integer(i64_of(until)));
        }
        sql.push_str(order);
        let limit = if q.limit == 0 { 100 } else { q.limit };
        args.push(Value::Integer(i64::from(limit)));
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| document(r, 0))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.iter().map(|s| stored_summary(s)).collect()
    }

    fn chain(&self, chain_id: &str) -> Result<Option<ChainTree>, StoreError> {
        let conn = lock(&self.reader);
        let seq = self.seq_of(&conn, chain_id)?;
        let row = conn
            .prepare_cached(
                "SELECT summary, shape FROM chains WHERE chain_seq IN (
                     SELECT ?2
                     UNION ALL
                     SELECT chain_seq FROM chain_facts WHERE fact =
                         (SELECT id FROM fact_values WHERE kind = 'joined' AND value = ?1)
                 )
                 LIMIT 1",
            )?
            .query_row(params![chain_id, seq], |r| {
                Ok((document(r, 0)?, document(r, 1)?))
            })
            .optional()?;
        let Some((summary, shape)) = row else {
            return Ok(None);
        };
        let shape = stored_shape(&shape)?;
        let summary = stored_summary(&summary)?;
        // Every hop of the tree was reported under the chain or one joined into it.
        let mut stored: HashMap<String, HopEvent> = HashMap::with_capacity(shape.len());
        let mut by_chain = conn.prepare_cached(HOPS_OF_CHAIN)?;
        for id in std::iter::once(&summary.chain_id).chain(&summary.joined_chains) {
            let Some(seq) = self.seq_of(&conn, id)? else {
                continue;
            };
            let mut rows = by_chain.query([seq])?;
            while let Some(row) = rows.next()? {
                let body = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
                let hop = HopEvent::decode(body)?;
                stored.insert(hop.event_id.clone(), hop);
            }
        }
        let mut hops = Vec::with_capacity(shape.len());
        for (event_id, parent, depth, evidence, confidence) in &shape {
            // A hop deleted by retention since leaves its place empty.
            let Some(hop) = stored.get(event_id) else {
                continue;
            };
            let parent = usize::try_from(*parent)
                .ok()
                .and_then(|p| shape.get(p))
                .map(|p| p.0.clone());
            hops.push(node(
                hop,
                parent,
                *depth,
                Join {
                    evidence: *evidence,
                    confidence: *confidence,
                },
            ));
        }
        Ok(Some(ChainTree { summary, hops }))
    }

    fn policy_state(&self) -> Result<PolicyState, StoreError> {
        let conn = lock(&self.reader);
        let row: Option<String> = conn
            .query_row("SELECT state FROM policy_current WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        match row {
            Some(s) => Ok(serde_json::from_str(&s)?),
            None => Ok(PolicyState::default()),
        }
    }

    fn commit_policy(&self, state: &PolicyState, audit: &AuditEntry) -> Result<u64, StoreError> {
        let json = serde_json::to_string(state)?;
        let mut conn = lock(&self.writer);
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO policy_current (id, version, state) VALUES (1, ?1, ?2)",
            params![i64_of(state.version), json],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO policy_versions (version, at_ns, state) VALUES (?1, ?2, ?3)",
            params![
                i64_of(state.version),
                i64_of(state.changed_unix_nanos),
                json
            ],
        )?;
        tx.execute(
            "INSERT INTO audit (at_ns, actor, action, target, version, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                i64_of(audit.at_unix_nanos),
                audit.actor,
                audit.action,
                audit.target,
                i64_of(audit.version),
                serde_json::to_string(&audit.detail)?
            ],
        )?;
        let id = u64_of(tx.last_insert_rowid());
        tx.commit()?;
        Ok(id)
    }

    fn policy_version(&self, version: u64) -> Result<Option<PolicyState>, StoreError> {
        let conn = lock(&self.reader);
        let row: Option<String> = conn
            .query_row(
                "SELECT state FROM policy_versions WHERE version = ?1",
                [i64_of(version)],
                |r| r.get(0),
            )
            .optional()?;
        row.map(|s| serde_json::from_str(&s).map_err(StoreError::from))
            .transpose()
    }

    fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT id, at_ns, actor, action, target, version, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([i64::from(limit)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, at, actor, action, target, version, detail)| {
                Ok(AuditEntry {
                    id: u64_of(id),
                    at_unix_nanos: u64_of(at),
                    actor,
                    action,
                    target,
                    version: u64_of(version),
                    detail: serde_json::from_str(&detail)?,
                })
            })
            .collect()
    }

    fn record_ack(&self, ack: &ClientVersion) -> Result<(), StoreError> {
        let conn = lock(&self.writer);
        conn.execute(
            "INSERT OR REPLACE INTO client_versions (client, kind, version, apply_ns, acked_ns, latency_ns, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                ack.client,
                ack.kind,
                i64_of(ack.version),
                i64_of(ack.apply_nanos),
                i64_of(ack.acked_unix_nanos),
                i64_of(ack.change_to_applied_nanos),
                ack.error
            ],
        )?;
        Ok(())
    }

    fn client_versions(&self) -> Result<Vec<ClientVersion>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT client, kind, version, apply_ns, acked_ns, latency_ns, error FROM client_versions ORDER BY client, kind",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ClientVersion {
                    client: r.get(0)?,
                    kind: r.get(1)?,
                    version: u64_of(r.get(2)?),
                    apply_nanos: u64_of(r.get(3)?),
                    acked_unix_nanos: u64_of(r.get(4)?),
                    change_to_applied_nanos: u64_of(r.get(5)?),
                    error: r.get(6)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn put_signing_key(&self, key: &IssuedKey) -> Result<(), StoreError> {
        let conn = lock(&self.writer);
        conn.execute(
            "INSERT OR REPLACE INTO signing_keys (key_id, public, workload, not_before, not_after)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                key.key_id,
                key.public,
                key.workload,
                i64_of(key.not_before_unix),
                i64_of(key.not_after_unix)
            ],
        )?;
        Ok(())
    }

    fn signing_keys(&self, now: u64) -> Result<Vec<IssuedKey>, StoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT key_id, public, workload, not_before, not_after FROM signing_keys
             WHERE not_after >= ?1 ORDER BY key_id",
        )?;
        let rows = stmt
            .query_map([i64_of(now)], |r| {
                Ok(IssuedKey {
                    key_id: r.get(0)?,
                    public: r.get(1)?,
                    workload: r.get(2)?,
                    not_before_unix: u64_of(r.get(3)?),
                    not_after_unix: u64_of(r.get(4)?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn retain(&self, retention: Retention, now_nanos: u64) -> Result<RetentionOutcome, StoreError> {
        let age_cutoff =
            now_nanos.saturating_sub(retention.max_age_secs.saturating_mul(1_000_000_000));
        let mut out = self.delete_before(age_cutoff)?;
        // Size: delete the oldest tenth while over the limit (a few rounds at most).
        for _ in 0..10 {
            if self.size_bytes()? <= retention.max_bytes {
                break;
            }
            let cutoff: Option<i64> = {
                let conn = lock(&self.reader);
                let count: i64 = conn.query_row("SELECT count(*) FROM hops", [], |r| r.get(0))?;
                if count == 0 {
                    break;
                }
                conn.query_row(
                    "SELECT start_ns FROM hops ORDER BY start_ns LIMIT 1 OFFSET ?1",
                    [count / 10],
                    |r| r.get(0),
                )
                .optional()?
            };
            let Some(cutoff) = cutoff else { break };
            let more = self.delete_before(u64_of(cutoff).saturating_add(1))?;
            out.hops += more.hops;
            out.flows += more.flows;
            out.chains += more.chains;
        }
        Ok(out)
    }

    fn size_bytes(&self) -> Result<u64, StoreError> {
        let conn = lock(&self.reader);
        let mut bytes = 0;
        for schema in ["main", "chains_db", "ids_db"] {
            let pragma = |name: &str| -> Result<i64, StoreError> {
                Ok(conn.query_row(&format!("PRAGMA {schema}.{name}"), [], |r| r.get(0))?)
            };
            bytes += (pragma("page_count")? - pragma("freelist_count")?) * pragma("page_size")?;
        }
        Ok(u64_of(bytes))
    }

    fn hop_count(&self) -> Result<u64, StoreError> {
        let conn = lock(&self.reader);
        let n: i64 = conn.query_row("SELECT count(*) FROM hops", [], |r| r.get(0))?;
        Ok(u64_of(n))
    }
}

/// What the events' writer keeps in memory next to the hops it writes.
struct HopStores<'a> {
    numbers: &'a Mutex<ChainNumbers>,
    longest: &'a Mutex<IdMap<String, i64>>,
}

/// Writes queued hop batches in one transaction; one outcome per batch, in
/// order, valid once this returns `Ok` (the transaction is committed).
fn write_hop_batches(
    conn: &mut Connection,
    group: &[(u64, Vec<HopRow>)],
    assembled: &[Assembled],
    seqs: &Mutex<IdMap<String, i64>>,
    stores: &HopStores<'_>,
) -> Result<Vec<PutOutcome>, StoreError> {
    let numbers = stores.numbers;
    let mut outcomes = Vec::with_capacity(group.len());
    // Numbers of the chains with hops stored by this transaction.
    let mut chains: BTreeSet<i64> = BTreeSet::new();
    // Numbers found or given in this transaction: cached once it commits.
    let mut numbered: IdMap<&str, i64> = IdMap::default();
    // Numbers given to new chains by this transaction.
    let mut given: Vec<(&str, i64)> = Vec::new();
    let tx = conn.transaction()?;
    clear_pending(&tx, assembled)?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO hops (event_id, chain_seq, workload, start_ns, end_ns, context, conn, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut find = tx.prepare_cached("SELECT seq FROM chain_ids WHERE chain_id = ?1")?;
        for (_, rows) in group {
            let mut out = PutOutcome {
                fresh: Vec::with_capacity(rows.len()),
                ..PutOutcome::default()
            };
            let mut batch_chains: BTreeSet<&str> = BTreeSet::new();
            for row in rows {
                let id = row.chain_id.as_str();
                // Locked per row, not for the whole commit: a tree store
                // copies numbers out of it meanwhile.
                let cached = lock(seqs).get(id).copied();
                let seq = match cached.or_else(|| numbered.get(id).copied()) {
                    Some(seq) => seq,
                    None => {
                        let known = lock(numbers).get(id);
                        let seq = match known {
                            Some(seq) => seq,
                            None => match find.query_row([id], |r| r.get(0)).optional()? {
                                Some(seq) => seq,
                                // A new chain: in the index with the next flush.
                                None => {
                                    let seq = lock(numbers).take_next();
                                    given.push((id, seq));
                                    seq
                                }
                            },
                        };
                        numbered.insert(id, seq);
                        seq
                    }
                };
                let n = stmt.execute(params![
                    row.event_id,
                    seq,
                    row.workload,
                    row.start,
                    row.end,
                    row.context,
                    row.conn,
                    row.body,
                ])?;
                out.fresh.push(n == 1);
                if n == 1 {
                    out.accepted += 1;
                    batch_chains.insert(row.chain_id.as_str());
                    chains.insert(seq);
                } else {
                    out.duplicates += 1;
                }
            }
            out.chains = batch_chains.iter().map(|c| (*c).to_owned()).collect();
            outcomes.push(out);
        }
        // One generation step per chain and transaction: enough to tell
        // the assembler that hops arrived since it read the chain.
        let mut pending = tx.prepare_cached(
            "INSERT INTO pending (chain_seq, generation) VALUES (?1, 1)
                 ON CONFLICT (chain_seq) DO UPDATE SET generation = generation + 1",
        )?;
        for seq in &chains {
            pending.execute([seq])?;
        }
    }
    longest::raise(
        &tx,
        &mut lock(stores.longest),
        group.iter().flat_map(|(_, rows)| rows),
    )?;
    // Known before the hops are visible, so no reader finds a hop whose
    // chain it cannot name; forgotten if the commit fails.
    let flush = {
        let mut numbers = lock(numbers);
        numbers.extend(given.iter().copied());
        numbers.overdue()
    };
    let started = std::time::Instant::now();
    let (committed, flushed) = if flush {
        let sorted = lock(numbers).sorted();
        let done = chain_numbers::write(&tx, &sorted).and_then(|()| Ok(tx.commit()?));
        (done, sorted)
    } else {
        (tx.commit().map_err(StoreError::from), Vec::new())
    };
    match committed {
        Ok(()) if flush => {
            lock(numbers).flushed(&flushed);
            // The batches of this commit waited for it: worth seeing.
            tracing::info!(
                chains = flushed.len(),
                took_ms = started.elapsed().as_millis(),
                "store: new chain ids written to the index by a commit of hops (assembly is behind)"
            );
        }
        Ok(()) => {}
        Err(e) => {
            lock(numbers).forget(given.iter().map(|(id, _)| *id));
            return Err(e);
        }
    }
    let mut seqs = lock(seqs);
    if seqs.len() + numbered.len() > CHAIN_SEQ_CACHE {
        seqs.clear();
    }
    seqs.extend(numbered.into_iter().map(|(id, seq)| (id.to_owned(), seq)));
    Ok(outcomes)
}

/// One pass's trees to store.
struct ChainWrite<'a> {
    trees: &'a [ChainTree],
    /// Each tree's encoded summary and shape.
    rows: &'a [(Vec<u8>, Vec<u8>)],
    /// Chains joined into another, deleted as chains of their own.
    superseded: &'a [String],
    /// Chains assembled, with the pending generation they were read at.
    assembled: &'a [(String, u64)],
}

/// Writes assembled trees in one transaction; the stored coverage class of
/// each tree's chain before (`None` if new), and the `(number, pending
/// generation)` of each assembled chain, for [`clear_pending`].
fn write_chains(
    conn: &mut Connection,
    known: &IdMap<String, i64>,
    numbers: &Mutex<ChainNumbers>,
    fact_ids: &mut FactIds,
    pass: &ChainWrite<'_>,
) -> Result<(Vec<Option<Coverage>>, Vec<Assembled>), StoreError> {
    let ChainWrite {
        trees,
        rows,
        superseded,
        assembled,
    } = *pass;
    let mut before = Vec::with_capacity(trees.len());
    let mut given = fact_ids::Given::default();
    let mut done = Vec::with_capacity(assembled.len());
    let tx = conn.transaction()?;

    {
        let mut number = tx.prepare_cached("SELECT seq FROM chain_ids WHERE chain_id = ?1")?;
        let mut seq_of = |id: &str| -> Result<Option<i64>, StoreError> {
            match known.get(id).copied().or_else(|| lock(numbers).get(id)) {
                Some(seq) => Ok(Some(seq)),
                None => Ok(number.query_row([id], |r| r.get(0)).optional()?),
            }
        };
        for (id, generation) in assembled {
            if let Some(seq) = seq_of(id)? {
                done.push((seq, i64_of(*generation)));
            }
        }
        let mut old = tx
            .prepare_cached("SELECT coverage, last_ns, summary FROM chains WHERE chain_seq = ?1")?;
        let mut del_chain = tx.prepare_cached("DELETE FROM chains WHERE chain_seq = ?1")?;
        for id in superseded {
            if let Some(seq) = seq_of(id)?
                && let Some(stored) = stored_chain(&mut old, seq)?
            {
                delete_facts(&tx, fact_ids, &mut given, seq, &stored)?;
                del_chain.execute([seq])?;
            }
        }
        let mut put = tx.prepare_cached(
            "INSERT OR REPLACE INTO chains (chain_seq, coverage, first_ns, last_ns, summary, shape)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (tree, (summary, shape)) in trees.iter().zip(rows) {
            let s = &tree.summary;
            // Every tree is named after one of its hops' chains, so it
            // has a number unless retention just deleted that chain.
            let Some(seq) = seq_of(&s.chain_id)? else {
                before.push(None);
                continue;
            };
            let new_facts = facts(s);
            let previous = stored_chain(&mut old, seq)?;
            before.push(previous.as_ref().and_then(|p| Coverage::parse(&p.coverage)));
            put.execute(params![
                seq,
                s.coverage.as_str(),
                i64_of(s.first_unix_nanos),
                i64_of(s.last_unix_nanos),
                summary,
                shape,
            ])?;
            if let Some(p) = &previous {
                // Re-assembly that changed neither the facts nor the
                // chain's time leaves the fact rows as they are.
                if p.last_ns == s.last_unix_nanos
                    && p.facts.as_ref().is_some_and(|f| *f == new_facts)
                {
                    continue;
                }
                delete_facts(&tx, fact_ids, &mut given, seq, p)?;
            }
            let numbered = new_facts
                .iter()
                .map(|(kind, value)| {
                    fact_ids::fact_id(&tx, fact_ids, &mut given, (kind, value), true)
                })
                .collect::<Result<Vec<Option<i64>>, _>>()?
                .into_iter()
                .flatten()
                .collect::<Vec<i64>>();
            insert_facts(&tx, &numbered, i64_of(s.last_unix_nanos), seq)?;
        }
    }
    tx.commit()?;
    fact_ids.extend(given);
    Ok((before, done))
}

/// A chain whose tree is stored: its number and the pending generation it
/// was assembled at.
type Assembled = (i64, i64);

/// Takes chains whose trees are stored off the pending queue, each only if
/// no hops arrived for it since it was read for assembly (its generation is
/// unchanged); a chain with new hops stays queued.
fn clear_pending(conn: &Connection, done: &[Assembled]) -> rusqlite::Result<()> {
    let mut del =
        conn.prepare_cached("DELETE FROM pending WHERE chain_seq = ?1 AND generation = ?2")?;
    for (seq, generation) in done {
        del.execute([seq, generation])?;
    }
    Ok(())
}

/// Fact rows written by one statement at most.
const FACTS_PER_INSERT: usize = 16;

/// Inserts a chain's fact rows, several per statement: a chain has a
/// handful, and each statement run costs about as much as the row.
fn insert_facts(
    conn: &Connection,
    facts: &[i64],
    last_ns: i64,
    chain_seq: i64,
) -> Result<(), StoreError> {
    for chunk in facts.chunks(FACTS_PER_INSERT) {
        let mut sql =
            String::from("INSERT OR IGNORE INTO chain_facts (fact, last_ns, chain_seq) VALUES ");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 { "(?, ?, ?)" } else { ", (?, ?, ?)" });
        }
        let mut args: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 3);
        for fact in chunk {
            args.extend([fact as &dyn rusqlite::ToSql, &last_ns, &chain_seq]);
        }
        conn.prepare_cached(&sql)?.execute(args.as_slice())?;
    }
    Ok(())
}

/// What a stored chain row says about the chain's fact rows.
struct StoredChain {
    coverage: String,
    last_ns: u64,
    /// The facts of its stored summary; `None` if the summary no longer
    /// decodes (its facts are then found by a scan).
    facts: Option<BTreeSet<(&'static str, String)>>,
}

fn stored_chain(
    stmt: &mut rusqlite::CachedStatement<'_>,
    chain_seq: i64,
) -> Result<Option<StoredChain>, StoreError> {
    let row = stmt
        .query_row([chain_seq], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, document(r, 2)?))
        })
        .optional()?;
    Ok(row.map(|(coverage, last_ns, summary)| StoredChain {
        coverage,
        last_ns: u64_of(last_ns),
        facts: stored_summary(&summary).ok().map(|s| facts(&s)),
    }))
}

/// A stored summary or shape, whichever way it was stored: the compact
/// record as a blob, or the JSON of older stores as text.
fn document(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    match row.get_ref(i)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Ok(b.to_vec()),
        other => Err(rusqlite::Error::InvalidColumnType(
            i,
            "summary or shape".into(),
            other.data_type(),
        )),
    }
}

/// Deletes the fact rows of a stored chain, by their primary key.
fn delete_facts(
    conn: &Connection,
    known: &FactIds,
    given: &mut fact_ids::Given,
    chain_seq: i64,
    stored: &StoredChain,
) -> Result<(), StoreError> {
    match &stored.facts {
        Some(facts) => {
            let mut del = conn.prepare_cached(
                "DELETE FROM chain_facts WHERE fact = ?1 AND last_ns = ?2 AND chain_seq = ?3",
            )?;
            for (kind, value) in facts {
                // A value never numbered has no rows to delete.
                if let Some(fact) = fact_ids::fact_id(conn, known, given, (kind, value), false)? {
                    del.execute(params![fact, i64_of(stored.last_ns), chain_seq])?;
                }
            }
        }
        None => {
            conn.execute("DELETE FROM chain_facts WHERE chain_seq = ?1", [chain_seq])?;
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Writes the chain ids numbered since the last write to the index
    /// (`ids.db`) through its own writer: neither a commit of hops nor a
    /// pass of trees waits for it. Lookups find the ids in memory until
    /// they are forgotten there, which waits for both other writers: a
    /// transaction of hops or of trees that read the index before this
    /// commit must not miss an id in both places (and give the chain a
    /// second number, or leave its tree unstored). A failure leaves them
    /// in memory for the next time.
    fn write_chain_ids(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let sorted = lock(&self.numbers).sorted();
        {
            let mut conn = lock(&self.ids_writer);
            let tx = conn.transaction()?;
            chain_numbers::write(&tx, &sorted)?;
            tx.commit()?;
        }
        // Both writers, taken in the usual order, but the events' writer is
        // not held while a store of trees finishes: commits of hops would
        // wait behind it.
        loop {
            let events = lock(&self.writer);
            let chains = match self.chains_writer.try_lock() {
                Ok(chains) => chains,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    drop(events);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    continue;
                }
            };
            lock(&self.numbers).flushed(&sorted);
            drop((chains, events));
            break;
        }
        tracing::debug!(
            chains = sorted.len(),
            took_ms = started.elapsed().as_millis(),
            "store: new chain ids written to the index"
        );
        Ok(())
    }

    /// Takes chains whose trees are stored off the pending queue, unless
    /// the events' writer is busy: a tree store never waits behind commits
    /// of hops for this. Whoever holds the writer then either takes them in
    /// its own commit (`put_hops` does, first thing) or calls this after
    /// letting go, so none is left behind while the store is in use; one
    /// left by a failure stays pending and is assembled again.
    fn flush_assembled(&self) {
        if lock(&self.assembled).is_empty() {
            return;
        }
        let mut conn = match self.writer.try_lock() {
            Ok(conn) => conn,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let done = std::mem::take(&mut *lock(&self.assembled));
        if done.is_empty() {
            return;
        }
        let cleared = conn.transaction().and_then(|tx| {
            clear_pending(&tx, &done)?;
            tx.commit()
        });
        if let Err(error) = cleared {
            tracing::warn!(%error, chains = done.len(), "store: assembled chains stay pending for now");
            lock(&self.assembled).extend(done);
        }
    }

    fn delete_before(&self, cutoff: u64) -> Result<RetentionOutcome, StoreError> {
        // Both writers, always in this order (`put_chains` never holds one
        // while it waits for the other).
        let mut conn = lock(&self.writer);
        // Numbers of chains whose hops are all gone are deleted below.
        lock(&self.chain_seqs).clear();
        // The index is written whole first, so that it alone says which
        // numbers are still in use.
        flush_chain_numbers(&mut conn, &self.numbers)?;
        let chains = {
            let mut chains_conn = lock(&self.chains_writer);
            let mut fact_ids = lock(&self.fact_ids);
            let deleted = delete_chains_before(&mut chains_conn, &fact_ids, cutoff);
            // Values no chain uses any more were deleted with them.
            fact_ids.clear();
            deleted?
        };
        let mut out = delete_events_before(&mut conn, cutoff)?;
        out.chains = chains;
        Ok(out)
    }

    /// The number of chain `chain_id`, if it has one.
    fn seq_of(&self, conn: &Connection, chain_id: &str) -> Result<Option<i64>, StoreError> {
        if let Some(seq) = lock(&self.numbers).get(chain_id) {
            return Ok(Some(seq));
        }
        Ok(conn
            .prepare_cached("SELECT seq FROM chain_ids WHERE chain_id = ?1")?
            .query_row([chain_id], |r| r.get(0))
            .optional()?)
    }
}

/// Writes the chain numbers given since the last flush to the index; the
/// caller holds the writer.
fn flush_chain_numbers(
    conn: &mut Connection,
    numbers: &Mutex<ChainNumbers>,
) -> Result<(), StoreError> {
    let sorted = lock(numbers).sorted();
    if sorted.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    chain_numbers::write(&tx, &sorted)?;
    tx.commit()?;
    lock(numbers).flushed(&sorted);
    Ok(())
}

impl Drop for SqliteStore {
    /// Writes the chain numbers given since the last flush, so that the
    /// next open has none to read back from the hops.
    fn drop(&mut self) {
        let conn = self
            .writer
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = flush_chain_numbers(conn, &self.numbers) {
            tracing::warn!(%error, "store: chain numbers not written at close (read back at the next open)");
        }
    }
}

/// Deletes chains last seen before `cutoff`, with their facts and the fact
/// values no chain uses any more; how many chains.
fn delete_chains_before(
    conn: &mut Connection,
    fact_ids: &FactIds,
    cutoff: u64,
) -> Result<u64, StoreError> {
    let cutoff = i64_of(cutoff);
    let mut given = fact_ids::Given::default();
    let tx = conn.transaction()?;
    // Chains in slices, oldest first, each with its facts.
    let mut chains = 0;
    loop {
        let old: Vec<(i64, StoredChain)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT chain_seq, coverage, last_ns, summary FROM chains
                 WHERE last_ns < ?1 ORDER BY last_ns LIMIT 10000",
            )?;
            stmt.query_map([cutoff], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    document(r, 3)?,
                ))
            })?
            .map(|row| {
                row.map(|(id, coverage, last_ns, summary)| {
                    let facts = stored_summary(&summary).ok().map(|s| facts(&s));
                    (
                        id,
                        StoredChain {
                            coverage,
                            last_ns: u64_of(last_ns),
                            facts,
                        },
                    )
                })
            })
            .collect::<Result<_, _>>()?
        };
        if old.is_empty() {
            break;
        }
        let mut del_chain = tx.prepare_cached("DELETE FROM chains WHERE chain_seq = ?1")?;
        for (seq, stored) in &old {
            delete_facts(&tx, fact_ids, &mut given, *seq, stored)?;
            chains += del_chain.execute([seq])?;
        }
    }
    fact_ids::delete_unused(&tx)?;
    tx.commit()?;
    Ok(chains as u64)
}

/// Deletes hops and flows from before `cutoff`, and the chain numbers
/// nothing uses any more (after the chains were deleted).
fn delete_events_before(
    conn: &mut Connection,
    cutoff: u64,
) -> Result<RetentionOutcome, StoreError> {
    let cutoff = i64_of(cutoff);
    let tx = conn.transaction()?;
    let hops = tx.execute("DELETE FROM hops WHERE start_ns < ?1", [cutoff])?;
    let flows = tx.execute("DELETE FROM flows WHERE at_ns < ?1", [cutoff])?;
    // Chains are numbered in order of first sight: numbers below the
    // smallest one still used by a hop, a chain or the queue name nothing.
    tx.execute(
        "DELETE FROM chain_ids WHERE seq < (SELECT min(m) FROM (
             SELECT coalesce(min(chain_seq), 9223372036854775807) AS m FROM hops
             UNION ALL SELECT coalesce(min(chain_seq), 9223372036854775807) FROM chains_db.chains
             UNION ALL SELECT coalesce(min(chain_seq), 9223372036854775807) FROM pending))",
        [],
    )?;
    tx.commit()?;
    Ok(RetentionOutcome {
        hops: hops as u64,
        flows: flows as u64,
        chains: 0,
    })
}
