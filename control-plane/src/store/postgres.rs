//! The PostgreSQL store: the same tables as the embedded store (events as
//! protobuf blobs next to the columns the queries filter on, chain facts in
//! one indexed table), reached through a small pool of connections.
//!
//! The trait is synchronous and the server calls it from blocking tasks
//! (and, at start, from async tasks), so the store owns a small tokio
//! runtime of its own: each call runs on that runtime and the caller waits
//! on a plain channel, which works from any thread, inside a runtime or
//! not. Every write is one transaction, committed with
//! `synchronous_commit = on` before the call returns; concurrent ingest
//! batches use different connections and commit in parallel (PostgreSQL
//! flushes concurrent commits together). Rows are written in a fixed order
//! (event id, chain id) so concurrent batches do not deadlock; a
//! transaction that still fails with a deadlock or a serialization failure
//! is retried.
//!
//! With a CA configured, connections use TLS (rustls, the server's
//! certificate verified against the CA and the host name, [`tls`]).
//!
//! The schema is versioned (`schema_version`): [`MIGRATIONS`] are applied
//! in order at open, under an advisory lock, so several servers may open
//! the same database.
//!
//! PostgreSQL keeps the space of deleted rows for reuse instead of giving
//! it back to the file system, so the size that retention bounds is kept as
//! a counter of the bytes of the stored rows (payload plus a fixed
//! allowance per row for the tuple header and index entries), updated in
//! each write transaction: one row per connection of the pool, so
//! concurrent writers never wait on each other for it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use custody_context::api::v1::{FlowEvent, HopEvent};
use prost::Message as _;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Transaction};

use super::common::{HopRow, NodeShape, fact_filters, facts, i64_of, shape, u64_of};

mod tls;

use super::{
    AuditEntry, ChainQuery, ClientVersion, IssuedKey, PolicyState, PutOutcome, Retention,
    RetentionOutcome, Store, StoreError, contains_any,
};
use crate::assembly::{ChainSummary, ChainTree, Coverage, Join, connection_key, node};
pub(crate) use tls::client_config as tls_config;

/// Schema changes, in order: `schema_version` holds how many are applied.
/// Never edit one that was released; append a new one.
const MIGRATIONS: &[&str] = &["
CREATE TABLE hops (
    event_id text COLLATE \"C\" PRIMARY KEY,
    chain_id text COLLATE \"C\" NOT NULL,
    workload text COLLATE \"C\" NOT NULL,
    start_ns bigint NOT NULL,
    end_ns bigint NOT NULL,
    context boolean NOT NULL,
    conn text COLLATE \"C\" NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX hops_chain ON hops (chain_id);
CREATE INDEX hops_contextless ON hops (start_ns) WHERE NOT context;
CREATE INDEX hops_conn ON hops (conn) WHERE conn <> '';
CREATE INDEX hops_parents ON hops (workload, start_ns, end_ns) WHERE context;
CREATE INDEX hops_time ON hops (start_ns);
CREATE TABLE pending (
    chain_id text COLLATE \"C\" PRIMARY KEY,
    generation bigint NOT NULL
);
CREATE TABLE flows (
    event_id text COLLATE \"C\" PRIMARY KEY,
    at_ns bigint NOT NULL,
    conn text COLLATE \"C\" NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX flows_conn ON flows (conn) WHERE conn <> '';
CREATE INDEX flows_time ON flows (at_ns);
CREATE TABLE chains (
    chain_id text COLLATE \"C\" PRIMARY KEY,
    coverage text NOT NULL,
    first_ns bigint NOT NULL,
    last_ns bigint NOT NULL,
    summary text NOT NULL,
    shape text NOT NULL
);
CREATE INDEX chains_time ON chains (last_ns);
CREATE INDEX chains_coverage ON chains (coverage, last_ns);
CREATE TABLE chain_facts (
    kind text COLLATE \"C\" NOT NULL,
    value text COLLATE \"C\" NOT NULL,
    last_ns bigint NOT NULL,
    chain_id text COLLATE \"C\" NOT NULL,
    PRIMARY KEY (kind, value, last_ns, chain_id)
);
CREATE TABLE policy_current (
    id integer PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL,
    state text NOT NULL
);
CREATE TABLE policy_versions (
    version bigint PRIMARY KEY,
    at_ns bigint NOT NULL,
    state text NOT NULL
);
CREATE TABLE audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ns bigint NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    version bigint NOT NULL,
    detail text NOT NULL
);
CREATE TABLE client_versions (
    client text NOT NULL,
    kind text NOT NULL,
    version bigint NOT NULL,
    apply_ns bigint NOT NULL,
    acked_ns bigint NOT NULL,
    latency_ns bigint NOT NULL,
    error text NOT NULL,
    PRIMARY KEY (client, kind)
);
CREATE TABLE signing_keys (
    key_id text PRIMARY KEY,
    public bytea NOT NULL,
    workload text NOT NULL,
    not_before bigint NOT NULL,
    not_after bigint NOT NULL
);
CREATE TABLE usage (
    slot integer PRIMARY KEY,
    bytes bigint NOT NULL
);
"];

/// Any constant: the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x0063_7573_746f_6479;

/// Fixed allowance per row (tuple header, integer columns, index entries).
const HOP_OVERHEAD: i64 = 96;
const FLOW_OVERHEAD: i64 = 64;
const CHAIN_OVERHEAD: i64 = 64;
const FACT_OVERHEAD: i64 = 48;

/// How often a transaction is tried when PostgreSQL aborts it for a
/// deadlock or a serialization failure.
const ATTEMPTS: u32 = 5;

/// How the PostgreSQL store connects.
#[derive(Clone)]
pub struct PostgresOptions {
    /// Host name, IP address, or a Unix socket directory (starting with `/`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The role to log in as.
    pub user: String,
    /// Its password (read from a file by the configuration); `None` for
    /// peer or trust authentication.
    pub password: Option<String>,
    /// The database.
    pub dbname: String,
    /// Connections kept open: concurrent writes commit in parallel up to
    /// this many.
    pub pool_size: usize,
    /// How long to wait for a connection to be established.
    pub connect_timeout: Duration,
    /// CA certificates (PEM): connections then use TLS and verify the
    /// server's certificate and name (`verify-full`). `None`: plain TCP.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("pool_size", &self.pool_size)
            .field("tls", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    /// The store's own runtime: `None` only while being dropped.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Arc<Pool>,
    target: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside an async
        // context: the last reference may go from one.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Connections, each with its slot (its row of `usage`).
struct Pool {
    config: tokio_postgres::Config,
    tls: Option<tls::MakeRustls>,
    idle: std::sync::Mutex<Vec<(i32, Option<Client>)>>,
    permits: tokio::sync::Semaphore,
}

/// A connection taken from the pool, returned when dropped (unless closed).
struct Conn<'a> {
    pool: &'a Pool,
    slot: i32,
    client: Option<Client>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Conn<'_> {
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        self.client
            .as_mut()
            .ok_or(StoreError::Range("connection already closed"))
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let client = self.client.take().filter(|c| !c.is_closed());
        lock(&self.pool.idle).push((self.slot, client));
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>, StoreError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Range("connection pool closed"))?;
        let (slot, client) = lock(&self.idle)
            .pop()
            .ok_or(StoreError::Range("connection pool empty"))?;
        let mut conn = Conn {
            pool: self,
            slot,
            client: client.filter(|c| !c.is_closed()),
            _permit: permit,
        };
        if conn.client.is_none() {
            conn.client = Some(self.connect().await?);
        }
        Ok(conn)
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        fn drive<F>(connection: F)
        where
            F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::warn!(error = %describe(&error), "PostgreSQL connection closed");
                }
            });
        }
        Ok(match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await.map_err(pg)?;
                drive(connection);
                client
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(pg)?;
                drive(connection);
                client
            }
        })
    }
}

/// A PostgreSQL error with the server's message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            // The cause (a refused certificate, a connection reset) is in
            // the source chain.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(describe(&e))
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// A failed attempt: retried when PostgreSQL aborted it for a conflict.
enum Failure {
    Retry(tokio_postgres::Error),
    Fail(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if retryable(&e) {
            Failure::Retry(e)
        } else {
            Failure::Fail(pg(e))
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Fail(e)
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        Failure::Fail(e.into())
    }
}

impl From<prost::DecodeError> for Failure {
    fn from(e: prost::DecodeError) -> Self {
        Failure::Fail(e.into())
    }
}

/// Runs `$body` (which uses `$tx`, a transaction, and `$slot`, the
/// connection's `usage` row) and commits, retrying on conflicts.
macro_rules! in_tx {
    ($pool:expr, |$tx:ident, $slot:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = $pool.get().await?;
            let $slot = conn.slot;
            let result: Result<_, Failure> = async {
                let $tx = conn.client()?.transaction().await?;
                let value = $body;
                $tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Ok(v) => break Ok(v),
                Err(Failure::Retry(e)) if attempt < ATTEMPTS => {
                    tracing::debug!(error = %describe(&e), attempt, "transaction retried");
                }
                Err(Failure::Retry(e)) => break Err(pg(e)),
                Err(Failure::Fail(e)) => break Err(e),
            }
        }
    }};
}

fn len(s: &str) -> i64 {
    i64::try_from(s.len()).unwrap_or(i64::MAX)
}

impl HopRow {
    /// Counted bytes; `hop_bytes_sql` is the same in SQL.
    fn bytes(&self) -> i64 {
        let body = i64::try_from(self.body.len()).unwrap_or(i64::MAX);
        body + len(&self.event_id)
            + len(&self.chain_id)
            + len(&self.workload)
            + len(&self.conn)
            + HOP_OVERHEAD
    }
}

fn hop_bytes_sql() -> String {
    format!(
        "octet_length(body) + octet_length(event_id) + octet_length(chain_id)
         + octet_length(workload) + octet_length(conn) + {HOP_OVERHEAD}"
    )
}

fn flow_bytes_sql() -> String {
    format!("octet_length(body) + octet_length(event_id) + octet_length(conn) + {FLOW_OVERHEAD}")
}

fn chain_bytes(chain_id: &str, coverage: &str, summary: &str, shape: &str) -> i64 {
    len(chain_id) + len(coverage) + len(summary) + len(shape) + CHAIN_OVERHEAD
}

fn fact_bytes(kind: &str, value: &str, chain_id: &str) -> i64 {
    len(kind) + len(value) + len(chain_id) + FACT_OVERHEAD
}

/// Whether each event id is new: the first occurrence of an id the insert
/// returned.
fn freshness<'a>(ids: impl Iterator<Item = &'a str>, inserted: Vec<String>) -> Vec<bool> {
    let mut inserted: HashSet<String> = inserted.into_iter().collect();
    ids.map(|id| inserted.remove(id)).collect()
}

async fn add_usage(tx: &Transaction<'_>, slot: i32, bytes: i64) -> Result<(), Failure> {
    if bytes != 0 {
        tx.execute(
            "INSERT INTO usage (slot, bytes) VALUES ($1, $2)
             ON CONFLICT (slot) DO UPDATE SET bytes = usage.bytes + excluded.bytes",
            &[&slot, &bytes],
        )
        .await?;
    }
    Ok(())
}

fn decode_hops(rows: &[tokio_postgres::Row]) -> Result<Vec<HopEvent>, StoreError> {
    rows.iter()
        .map(|r| HopEvent::decode(r.get::<_, &[u8]>(0)).map_err(StoreError::from))
        .collect()
}

fn decode_flows(rows: &[tokio_postgres::Row]) -> Result<Vec<FlowEvent>, StoreError> {
    rows.iter()
        .map(|r| FlowEvent::decode(r.get::<_, &[u8]>(0)).map_err(StoreError::from))
        .collect()
}

/// A chain as stored: what its replacement or deletion must undo.
struct StoredChain {
    coverage: String,
    last_ns: i64,
    bytes: i64,
    /// The facts of its stored summary; `None` if it no longer decodes
    /// (its facts are then deleted by chain id).
    facts: Option<BTreeSet<(&'static str, String)>>,
}

/// The stored rows of these chains, locked until the transaction ends.
async fn stored_chains(
    tx: &Transaction<'_>,
    ids: &[String],
) -> Result<HashMap<String, StoredChain>, Failure> {
    let rows = tx
        .query(
            "SELECT chain_id, coverage, last_ns, summary, octet_length(shape) FROM chains
             WHERE chain_id = ANY($1) ORDER BY chain_id FOR UPDATE",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(stored_chain).collect())
}

fn stored_chain(r: &tokio_postgres::Row) -> (String, StoredChain) {
    let id: String = r.get(0);
    let coverage: String = r.get(1);
    let summary: &str = r.get(3);
    let shape_len: i32 = r.get(4);
    let bytes = len(&id) + len(&coverage) + len(summary) + i64::from(shape_len) + CHAIN_OVERHEAD;
    let facts = serde_json::from_str::<ChainSummary>(summary)
        .ok()
        .map(|s| facts(&s));
    (
        id,
        StoredChain {
            coverage,
            last_ns: r.get(2),
            bytes,
            facts,
        },
    )
}

/// Fact rows to delete: by key, and whole chains whose summary no longer
/// decodes. Returns the bytes they counted (the latter read back).
#[derive(Default)]
struct FactDeletes {
    kinds: Vec<&'static str>,
    values: Vec<String>,
    times: Vec<i64>,
    chains: Vec<String>,
    bytes: i64,
    whole: Vec<String>,
}

impl FactDeletes {
    fn push(&mut self, kind: &'static str, value: &str, last_ns: i64, chain_id: &str) {
        self.bytes += fact_bytes(kind, value, chain_id);
        self.kinds.push(kind);
        self.values.push(value.to_owned());
        self.times.push(last_ns);
        self.chains.push(chain_id.to_owned());
    }

    fn all_of(&mut self, chain_id: &str, stored: &StoredChain) {
        match &stored.facts {
            Some(f) => {
                for (kind, value) in f {
                    self.push(kind, value, stored.last_ns, chain_id);
                }
            }
            None => self.whole.push(chain_id.to_owned()),
        }
    }

    /// Deletes them; returns the bytes freed.
    async fn run(self, tx: &Transaction<'_>) -> Result<i64, Failure> {
        let mut freed = 0;
        if !self.kinds.is_empty() {
            tx.execute(
                "DELETE FROM chain_facts f
                 USING unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS d(k, v, l, c)
                 WHERE f.kind = d.k AND f.value = d.v AND f.last_ns = d.l AND f.chain_id = d.c",
                &[&self.kinds, &self.values, &self.times, &self.chains],
            )
            .await?;
            freed += self.bytes;
        }
        if !self.whole.is_empty() {
            let row = tx
                .query_one(
                    &format!(
                        "WITH d AS (DELETE FROM chain_facts WHERE chain_id = ANY($1)
                         RETURNING octet_length(kind) + octet_length(value)
                                 + octet_length(chain_id) + {FACT_OVERHEAD} AS b)
                         SELECT coalesce(sum(b), 0)::bigint FROM d"
                    ),
                    &[&self.whole],
                )
                .await?;
            freed += row.get::<_, i64>(0);
        }
        Ok(freed)
    }
}

/// A query argument of [`PostgresStore::chains`].
enum Param {
    Text(String),
    Int(i64),
}

impl PostgresStore {
    /// Connects, creates or migrates the schema, and opens the pool.
    pub fn open(options: &PostgresOptions) -> Result<Self, StoreError> {
        let pool_size = options.pool_size.max(1);
        let mut config = tokio_postgres::Config::new();
        config
            .host(&options.host)
            .port(options.port)
            .user(&options.user)
            .dbname(&options.dbname)
            .application_name("custody-control")
            .connect_timeout(options.connect_timeout)
            // An acknowledged write is on disk: whatever the server's
            // default, commits wait for the WAL flush.
            .options("-c synchronous_commit=on");
        if let Some(p) = &options.password {
            config.password(p);
        }
        let tls = match &options.ca_pem {
            Some(pem) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let client = tls::client_config(pem)
                    .map_err(|e| StoreError::Postgres(format!("ca_file: {e}")))?;
                Some(tls::MakeRustls(client))
            }
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("custody-postgres")
            .enable_all()
            .build()?;
        let slots = i32::try_from(pool_size).unwrap_or(i32::MAX);
        let store = PostgresStore {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            pool: Arc::new(Pool {
                config,
                tls,
                idle: std::sync::Mutex::new((0..slots).rev().map(|s| (s, None)).collect()),
                permits: tokio::sync::Semaphore::new(pool_size),
            }),
            target: format!("{}:{}/{}", options.host, options.port, options.dbname),
        };
        let version = store.run(|pool| async move { migrate(&pool).await })?;
        tracing::info!(target_db = %store.target, schema = version, "PostgreSQL store open");
        Ok(store)
    }

    /// Runs `work` on the store's runtime and waits for it: callable from
    /// any thread, inside a tokio runtime or not.
    fn run<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Pool>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = work(self.pool.clone());
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Range("store runtime stopped"))?
    }

    /// The rows of one read query, on a pooled connection.
    fn read(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            conn.client()?.query(sql, &params).await.map_err(pg)
        })
    }
}

/// Applies the migrations not applied yet; returns the schema version.
async fn migrate(pool: &Pool) -> Result<usize, StoreError> {
    let mut conn = pool.get().await?;
    let client = conn.client()?;
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        .await
        .map_err(pg)?;
    let current: Option<i32> = tx
        .query_opt("SELECT version FROM schema_version", &[])
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(StoreError::Range(
            "the database's schema is newer than this server",
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tracing::info!(version = i + 1, "migrating the PostgreSQL schema");
        tx.batch_execute(sql).await.map_err(pg)?;
    }
    let version = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if current == 0 {
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(pg)?;
    } else {
        tx.execute("UPDATE schema_version SET version = $1", &[&version])
            .await
            .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(MIGRATIONS.len())
}

impl Store for PostgresStore {
    fn put_hops(&self, hops: &[HopEvent]) -> Result<PutOutcome, StoreError> {
        // Encoded here: callers do this in parallel.
        let rows: Vec<HopRow> = hops.iter().map(HopRow::of).collect();
        self.run(|pool| async move {
            // Inserted in event-id order: concurrent batches holding the
            // same ids then wait for each other instead of deadlocking.
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.sort_by(|a, b| rows[*a].event_id.cmp(&rows[*b].event_id));
            let col = |f: fn(&HopRow) -> &str| -> Vec<&str> {
                order.iter().map(|i| f(&rows[*i])).collect()
            };
            let ids = col(|r| &r.event_id);
            let chains = col(|r| &r.chain_id);
            let workloads = col(|r| &r.workload);
            let conns = col(|r| &r.conn);
            let starts: Vec<i64> = order.iter().map(|i| rows[*i].start).collect();
            let ends: Vec<i64> = order.iter().map(|i| rows[*i].end).collect();
            let contexts: Vec<bool> = order.iter().map(|i| rows[*i].context).collect();
            let bodies: Vec<&[u8]> = order.iter().map(|i| rows[*i].body.as_slice()).collect();
            in_tx!(pool, |tx, slot| {
                let inserted: Vec<String> = tx
                    .query(
                        "INSERT INTO hops (event_id, chain_id, workload, start_ns, end_ns, context, conn, body)
                         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                                              $5::bigint[], $6::boolean[], $7::text[], $8::bytea[])
                         ON CONFLICT (event_id) DO NOTHING
                         RETURNING event_id",
                        &[&ids, &chains, &workloads, &starts, &ends, &contexts, &conns, &bodies],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let fresh = freshness(rows.iter().map(|r| r.event_id.as_str()), inserted);
                let mut out = PutOutcome {
                    fresh,
                    ..PutOutcome::default()
                };
                let mut accepted_chains: BTreeSet<&str> = BTreeSet::new();
                let mut bytes = 0;
                for (row, fresh) in rows.iter().zip(&out.fresh) {
                    if *fresh {
                        out.accepted += 1;
                        accepted_chains.insert(&row.chain_id);
                        bytes += row.bytes();
                    } else {
                        out.duplicates += 1;
                    }
                }
                out.chains = accepted_chains.iter().map(|c| (*c).to_owned()).collect();
                if !out.chains.is_empty() {
                    // One generation step per chain and batch: enough to
                    // tell the assembler that hops arrived since it read
                    // the chain. In chain order, like the hops.
                    tx.execute(
                        "INSERT INTO pending (chain_id, generation)
                         SELECT unnest($1::text[]), 1
                         ON CONFLICT (chain_id) DO UPDATE SET generation = pending.generation + 1",
                        &[&out.chains],
                    )
                    .await?;
                }
                add_usage(&tx, slot, bytes).await?;
                out
            })
        })
    }

    fn put_flows(&self, flows: &[FlowEvent]) -> Result<PutOutcome, StoreError> {
        struct FlowRow {
            event_id: String,
            at: i64,
            conn: String,
            body: Vec<u8>,
        }
        let rows: Vec<FlowRow> = flows
            .iter()
            .map(|f| FlowRow {
                event_id: f.event_id.clone(),
                at: i64_of(f.unix_nanos),
                conn: f
                    .connection
                    .as_ref()
                    .map(connection_key)
                    .unwrap_or_default(),
                body: f.encode_to_vec(),
            })
            .collect();
        self.run(|pool| async move {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.sort_by(|a, b| rows[*a].event_id.cmp(&rows[*b].event_id));
            let ids: Vec<&str> = order.iter().map(|i| rows[*i].event_id.as_str()).collect();
            let ats: Vec<i64> = order.iter().map(|i| rows[*i].at).collect();
            let conns: Vec<&str> = order.iter().map(|i| rows[*i].conn.as_str()).collect();
            let bodies: Vec<&[u8]> = order.iter().map(|i| rows[*i].body.as_slice()).collect();
            in_tx!(pool, |tx, slot| {
                let inserted: Vec<String> = tx
                    .query(
                        "INSERT INTO flows (event_id, at_ns, conn, body)
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[])
                         ON CONFLICT (event_id) DO NOTHING
                         RETURNING event_id",
                        &[&ids, &ats, &conns, &bodies],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let fresh = freshness(rows.iter().map(|r| r.event_id.as_str()), inserted);
                let mut out = PutOutcome::default();
                let mut bytes = 0;
                for (row, fresh) in rows.iter().zip(&fresh) {
                    if *fresh {
                        out.accepted += 1;
                        bytes += i64::try_from(row.body.len()).unwrap_or(i64::MAX)
                            + len(&row.event_id)
                            + len(&row.conn)
                            + FLOW_OVERHEAD;
                    } else {
                        out.duplicates += 1;
                    }
                }
                out.fresh = fresh;
                add_usage(&tx, slot, bytes).await?;
                out
            })
        })
    }

    fn hops_of_chains(&self, chain_ids: &[String]) -> Result<Vec<HopEvent>, StoreError> {
        let ids = chain_ids.to_vec();
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query("SELECT body FROM hops WHERE chain_id = ANY($1)", &[&ids])
                .await
                .map_err(pg)?;
            decode_hops(&rows)
        })
    }

    fn chain_hop_counts(&self, chain_ids: &[String]) -> Result<Vec<u64>, StoreError> {
        let ids = chain_ids.to_vec();
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query(
                    "SELECT chain_id, count(*) FROM hops WHERE chain_id = ANY($1) GROUP BY chain_id",
                    &[&ids],
                )
                .await
                .map_err(pg)?;
            let counts: HashMap<String, i64> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            Ok(ids
                .iter()
                .map(|id| counts.get(id).copied().map(u64_of).unwrap_or(0))
                .collect())
        })
    }

    fn hops_in_window(
        &self,
        workloads: &[String],
        earliest: u64,
        latest: u64,
        ended_by: u64,
    ) -> Result<Vec<HopEvent>, StoreError> {
        let workloads = workloads.to_vec();
        let (earliest, latest, ended_by) = (i64_of(earliest), i64_of(latest), i64_of(ended_by));
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query(
                    "SELECT body FROM hops WHERE workload = ANY($1) AND start_ns BETWEEN $2 AND $3
                     AND end_ns >= $4 AND context",
                    &[&workloads, &earliest, &latest, &ended_by],
                )
                .await
                .map_err(pg)?;
            decode_hops(&rows)
        })
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
        let ended_by = i64_of(spans.iter().map(|s| s.1).min().unwrap_or(0));
        let earliest = i64_of(first.0.saturating_sub(max_request_nanos));
        let latest = i64_of(last.0);
        let ended_at_most = i64_of(last.0.saturating_add(max_request_nanos));
        let workload = workload.to_owned();
        let spans = spans.to_vec();
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let client = conn.client()?;
            // The candidates' times first; only the bodies of those that
            // contain a span are read and decoded.
            let rows = client
                .query(
                    "SELECT event_id, start_ns, end_ns FROM hops WHERE workload = $1
                     AND start_ns BETWEEN $2 AND $3 AND end_ns BETWEEN $4 AND $5 AND context",
                    &[&workload, &earliest, &latest, &ended_by, &ended_at_most],
                )
                .await
                .map_err(pg)?;
            let ids: Vec<&str> = rows
                .iter()
                .filter(|r| contains_any(&spans, u64_of(r.get(1)), u64_of(r.get(2))))
                .map(|r| r.get(0))
                .collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let bodies = client
                .query("SELECT body FROM hops WHERE event_id = ANY($1)", &[&ids])
                .await
                .map_err(pg)?;
            decode_hops(&bodies)
        })
    }

    fn contextless_in_window(&self, from: u64, to: u64) -> Result<Vec<HopEvent>, StoreError> {
        decode_hops(&self.read(
            "SELECT body FROM hops WHERE NOT context AND start_ns BETWEEN $1 AND $2",
            vec![Box::new(i64_of(from)), Box::new(i64_of(to))],
        )?)
    }

    fn hops_by_connection(&self, keys: &[String]) -> Result<Vec<HopEvent>, StoreError> {
        decode_hops(&self.read(
            "SELECT body FROM hops WHERE conn = ANY($1) AND conn <> ''",
            vec![Box::new(keys.to_vec())],
        )?)
    }

    fn flows_by_connection(&self, keys: &[String]) -> Result<Vec<FlowEvent>, StoreError> {
        decode_flows(&self.read(
            "SELECT body FROM flows WHERE conn = ANY($1) AND conn <> ''",
            vec![Box::new(keys.to_vec())],
        )?)
    }

    fn flows_in_window(&self, from: u64, to: u64) -> Result<Vec<FlowEvent>, StoreError> {
        decode_flows(&self.read(
            "SELECT body FROM flows WHERE at_ns BETWEEN $1 AND $2",
            vec![Box::new(i64_of(from)), Box::new(i64_of(to))],
        )?)
    }

    fn put_chains(
        &self,
        trees: &[ChainTree],
        superseded: &[String],
        assembled: &[(String, u64)],
    ) -> Result<Vec<Option<Coverage>>, StoreError> {
        // Encoded before a connection is taken: ingest may be waiting.
        struct ChainRow {
            chain_id: String,
            coverage: &'static str,
            first_ns: i64,
            last_ns: i64,
            summary: String,
            shape: String,
            facts: BTreeSet<(&'static str, String)>,
        }
        let rows = trees
            .iter()
            .map(|t| {
                let s = &t.summary;
                Ok(ChainRow {
                    chain_id: s.chain_id.clone(),
                    coverage: s.coverage.as_str(),
                    first_ns: i64_of(s.first_unix_nanos),
                    last_ns: i64_of(s.last_unix_nanos),
                    summary: serde_json::to_string(s)?,
                    shape: serde_json::to_string(&shape(t))?,
                    facts: facts(s),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let superseded = superseded.to_vec();
        // In chain order, like ingest's pending rows: no lock cycle.
        let mut done: Vec<(String, i64)> = assembled
            .iter()
            .map(|(id, g)| (id.clone(), i64_of(*g)))
            .collect();
        done.sort_unstable();
        let (done_ids, done_generations): (Vec<String>, Vec<i64>) = done.into_iter().unzip();
        self.run(|pool| async move {
            // The last tree of each chain is what stays stored.
            let mut last: BTreeMap<&str, usize> = BTreeMap::new();
            for (i, r) in rows.iter().enumerate() {
                last.insert(r.chain_id.as_str(), i);
            }
            let superseded_only: Vec<&str> = {
                let mut s: Vec<&str> = superseded
                    .iter()
                    .map(String::as_str)
                    .filter(|id| !last.contains_key(id))
                    .collect();
                s.sort_unstable();
                s.dedup();
                s
            };
            let mut touched: Vec<String> = superseded.clone();
            touched.extend(last.keys().map(|k| (*k).to_owned()));
            touched.sort_unstable();
            touched.dedup();
            in_tx!(pool, |tx, slot| {
                if !done_ids.is_empty() {
                    tx.execute(
                        "SELECT 1 FROM pending WHERE chain_id = ANY($1) ORDER BY chain_id FOR UPDATE",
                        &[&done_ids],
                    )
                    .await?;
                    tx.execute(
                        "DELETE FROM pending p USING unnest($1::text[], $2::bigint[]) AS a(id, g)
                         WHERE p.chain_id = a.id AND p.generation = a.g",
                        &[&done_ids, &done_generations],
                    )
                    .await?;
                }
                let stored = stored_chains(&tx, &touched).await?;
                let mut freed = 0;
                let mut facts_out = FactDeletes::default();
                // Coverage before each tree, as if they were written one
                // after the other, after the superseded chains were deleted.
                let mut coverage: HashMap<&str, Option<&str>> = HashMap::new();
                for id in &superseded {
                    coverage.insert(id.as_str(), None);
                }
                let mut before = Vec::with_capacity(rows.len());
                for r in &rows {
                    let previous = match coverage.get(r.chain_id.as_str()) {
                        Some(c) => *c,
                        None => stored.get(&r.chain_id).map(|s| s.coverage.as_str()),
                    };
                    before.push(previous.and_then(Coverage::parse));
                    coverage.insert(&r.chain_id, Some(r.coverage));
                }
                // Chains only deleted.
                for id in &superseded_only {
                    if let Some(s) = stored.get(*id) {
                        facts_out.all_of(id, s);
                        freed += s.bytes;
                    }
                }
                if !superseded_only.is_empty() {
                    tx.execute(
                        "DELETE FROM chains WHERE chain_id = ANY($1)",
                        &[&superseded_only],
                    )
                    .await?;
                }
                // Chains stored: the fact rows that change.
                let mut added = 0;
                let mut put = Vec::with_capacity(last.len());
                let (mut k, mut v, mut l, mut c) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (id, i) in &last {
                    let r = &rows[*i];
                    put.push(r);
                    added += chain_bytes(id, r.coverage, &r.summary, &r.shape);
                    let old = stored.get(*id);
                    if let Some(s) = old {
                        freed += s.bytes;
                    }
                    // The old facts stay stored when the chain was not
                    // superseded and keeps its time; the rest is replaced.
                    let kept: Option<&BTreeSet<(&'static str, String)>> = match old {
                        Some(s) if s.last_ns == r.last_ns && !superseded.contains(&r.chain_id) => {
                            s.facts.as_ref()
                        }
                        _ => None,
                    };
                    if let Some(s) = old {
                        match (&s.facts, kept) {
                            (Some(f), Some(_)) => {
                                for (kind, value) in f.difference(&r.facts) {
                                    facts_out.push(kind, value, s.last_ns, id);
                                }
                            }
                            _ => facts_out.all_of(id, s),
                        }
                    }
                    for (kind, value) in &r.facts {
                        if kept.is_some_and(|f| f.contains(&(*kind, value.clone()))) {
                            continue;
                        }
                        added += fact_bytes(kind, value, id);
                        k.push(*kind);
                        v.push(value.as_str());
                        l.push(r.last_ns);
                        c.push(*id);
                    }
                }
                freed += facts_out.run(&tx).await?;
                if !put.is_empty() {
                    let ids: Vec<&str> = put.iter().map(|r| r.chain_id.as_str()).collect();
                    let coverages: Vec<&str> = put.iter().map(|r| r.coverage).collect();
                    let firsts: Vec<i64> = put.iter().map(|r| r.first_ns).collect();
                    let lasts: Vec<i64> = put.iter().map(|r| r.last_ns).collect();
                    let summaries: Vec<&str> = put.iter().map(|r| r.summary.as_str()).collect();
                    let shapes: Vec<&str> = put.iter().map(|r| r.shape.as_str()).collect();
                    tx.execute(
                        "INSERT INTO chains (chain_id, coverage, first_ns, last_ns, summary, shape)
                         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                              $5::text[], $6::text[])
                         ON CONFLICT (chain_id) DO UPDATE SET coverage = excluded.coverage,
                             first_ns = excluded.first_ns, last_ns = excluded.last_ns,
                             summary = excluded.summary, shape = excluded.shape",
                        &[&ids, &coverages, &firsts, &lasts, &summaries, &shapes],
                    )
                    .await?;
                }
                if !k.is_empty() {
                    tx.execute(
                        "INSERT INTO chain_facts (kind, value, last_ns, chain_id)
                         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
                         ON CONFLICT DO NOTHING",
                        &[&k, &v, &l, &c],
                    )
                    .await?;
                }
                add_usage(&tx, slot, added - freed).await?;
                before
            })
        })
    }

    fn pending_chains(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let rows = self.read(
            "SELECT chain_id FROM pending LIMIT $1",
            vec![Box::new(i64::from(limit))],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn pending_generations(&self, chain_ids: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.read(
            "SELECT chain_id, generation FROM pending WHERE chain_id = ANY($1)",
            vec![Box::new(chain_ids.to_vec())],
        )?;
        let found: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(chain_ids
            .iter()
            .filter_map(|id| Some((id.clone(), u64_of(*found.get(id)?))))
            .collect())
    }

    fn chains(&self, q: &ChainQuery) -> Result<Vec<ChainSummary>, StoreError> {
        // The same plan as the embedded store: the first fact filter drives
        // the query through the fact index (newest first), the others are
        // point lookups.
        let filters = fact_filters(q);
        let mut args: Vec<Param> = Vec::new();
        let mut arg = |p: Param| {
            args.push(p);
            format!("${}", args.len())
        };
        let driver = filters.iter().position(|(_, v)| v.is_some());
        let (mut sql, order) = match driver.and_then(|d| filters[d].1.as_ref().map(|v| (d, v))) {
            Some((d, v)) => {
                let kind = arg(Param::Text(filters[d].0.to_owned()));
                let value = arg(Param::Text(v.clone()));
                (
                    format!(
                        "SELECT c.summary FROM chain_facts f CROSS JOIN chains c
                         WHERE f.kind = {kind} AND f.value = {value} AND c.chain_id = f.chain_id
                         AND c.last_ns = f.last_ns"
                    ),
                    "ORDER BY f.last_ns DESC, f.chain_id",
                )
            }
            None => (
                String::from("SELECT c.summary FROM chains c WHERE true"),
                "ORDER BY c.last_ns DESC, c.chain_id",
            ),
        };
        for (i, (kind, value)) in filters.iter().enumerate() {
            if let Some(v) = value
                && Some(i) != driver
            {
                let kind = arg(Param::Text((*kind).to_owned()));
                let value = arg(Param::Text(v.clone()));
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM chain_facts g WHERE g.kind = {kind} AND g.value = {value}
                      AND g.last_ns = c.last_ns AND g.chain_id = c.chain_id)"
                ));
            }
        }
        if let Some(c) = q.coverage {
            let p = arg(Param::Text(c.as_str().to_owned()));
            sql.push_str(&format!(" AND c.coverage = {p}"));
        }
        if let Some(since) = q.since {
            let p = arg(Param::Int(i64_of(since)));
            sql.push_str(&format!(" AND c.last_ns >= {p}"));
            if driver.is_some() {
                sql.push_str(&format!(" AND f.last_ns >= {p}"));
            }
        }
        if let Some(until) = q.until {
            let p = arg(Param::Int(i64_of(until)));
            sql.push_str(&format!(" AND c.first_ns <= {p}"));
        }
        let limit = if q.limit == 0 { 100 } else { q.limit };
        let p = arg(Param::Int(i64::from(limit)));
        sql.push_str(&format!(" {order} LIMIT {p}"));
        self.run(|pool| async move {
            let params: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|a| match a {
                    Param::Text(s) => s as &(dyn ToSql + Sync),
                    Param::Int(i) => i as &(dyn ToSql + Sync),
                })
                .collect();
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query(sql.as_str(), &params)
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(StoreError::from))
                .collect()
        })
    }

    fn chain(&self, chain_id: &str) -> Result<Option<ChainTree>, StoreError> {
        let chain_id = chain_id.to_owned();
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let client = conn.client()?;
            let row = client
                .query_opt(
                    "SELECT summary, shape FROM chains WHERE chain_id = $1
                     OR chain_id = (SELECT chain_id FROM chain_facts
                                    WHERE kind = 'joined' AND value = $1 LIMIT 1)
                     LIMIT 1",
                    &[&chain_id],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let summary: ChainSummary = serde_json::from_str(row.get::<_, &str>(0))?;
            let shape: Vec<NodeShape> = serde_json::from_str(row.get::<_, &str>(1))?;
            let ids: Vec<&str> = shape.iter().map(|n| n.0.as_str()).collect();
            let bodies = client
                .query(
                    "SELECT event_id, body FROM hops WHERE event_id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(pg)?;
            let bodies: HashMap<&str, &[u8]> =
                bodies.iter().map(|r| (r.get(0), r.get(1))).collect();
            let mut hops = Vec::with_capacity(shape.len());
            for (event_id, parent, depth, evidence, confidence) in &shape {
                // A hop deleted by retention since leaves its place empty.
                let Some(raw) = bodies.get(event_id.as_str()) else {
                    continue;
                };
                let hop = HopEvent::decode(*raw)?;
                let parent = usize::try_from(*parent)
                    .ok()
                    .and_then(|p| shape.get(p))
                    .map(|p| p.0.clone());
                hops.push(node(
                    &hop,
                    parent,
                    *depth,
                    Join {
                        evidence: *evidence,
                        confidence: *confidence,
                    },
                ));
            }
            Ok(Some(ChainTree { summary, hops }))
        })
    }

    fn policy_state(&self) -> Result<PolicyState, StoreError> {
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let row = conn
                .client()?
                .query_opt("SELECT state FROM policy_current WHERE id = 1", &[])
                .await
                .map_err(pg)?;
            match row {
                Some(r) => Ok(serde_json::from_str(r.get::<_, &str>(0))?),
                None => Ok(PolicyState::default()),
            }
        })
    }

    fn commit_policy(&self, state: &PolicyState, audit: &AuditEntry) -> Result<u64, StoreError> {
        let json = serde_json::to_string(state)?;
        let detail = serde_json::to_string(&audit.detail)?;
        let version = i64_of(state.version);
        let changed = i64_of(state.changed_unix_nanos);
        let audit = audit.clone();
        self.run(|pool| async move {
            let at = i64_of(audit.at_unix_nanos);
            let audit_version = i64_of(audit.version);
            in_tx!(pool, |tx, _slot| {
                tx.execute(
                    "INSERT INTO policy_current (id, version, state) VALUES (1, $1, $2)
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version, state = excluded.state",
                    &[&version, &json],
                )
                .await?;
                tx.execute(
                    "INSERT INTO policy_versions (version, at_ns, state) VALUES ($1, $2, $3)
                     ON CONFLICT (version) DO UPDATE SET at_ns = excluded.at_ns, state = excluded.state",
                    &[&version, &changed, &json],
                )
                .await?;
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO audit (at_ns, actor, action, target, version, detail)
                         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                        &[
                            &at,
                            &audit.actor,
                            &audit.action,
                            &audit.target,
                            &audit_version,
                            &detail,
                        ],
                    )
                    .await?
                    .get(0);
                u64_of(id)
            })
        })
    }

    fn policy_version(&self, version: u64) -> Result<Option<PolicyState>, StoreError> {
        let version = i64_of(version);
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let row = conn
                .client()?
                .query_opt(
                    "SELECT state FROM policy_versions WHERE version = $1",
                    &[&version],
                )
                .await
                .map_err(pg)?;
            row.map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(StoreError::from))
                .transpose()
        })
    }

    fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::from(limit);
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query(
                    "SELECT id, at_ns, actor, action, target, version, detail FROM audit
                     ORDER BY id DESC LIMIT $1",
                    &[&limit],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    Ok(AuditEntry {
                        id: u64_of(r.get(0)),
                        at_unix_nanos: u64_of(r.get(1)),
                        actor: r.get(2),
                        action: r.get(3),
                        target: r.get(4),
                        version: u64_of(r.get(5)),
                        detail: serde_json::from_str(r.get::<_, &str>(6))?,
                    })
                })
                .collect()
        })
    }

    fn record_ack(&self, ack: &ClientVersion) -> Result<(), StoreError> {
        let ack = ack.clone();
        self.run(|pool| async move {
            let nums = [
                i64_of(ack.version),
                i64_of(ack.apply_nanos),
                i64_of(ack.acked_unix_nanos),
                i64_of(ack.change_to_applied_nanos),
            ];
            in_tx!(pool, |tx, _slot| {
                tx.execute(
                    "INSERT INTO client_versions (client, kind, version, apply_ns, acked_ns, latency_ns, error)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (client, kind) DO UPDATE SET version = excluded.version,
                         apply_ns = excluded.apply_ns, acked_ns = excluded.acked_ns,
                         latency_ns = excluded.latency_ns, error = excluded.error",
                    &[
                        &ack.client,
                        &ack.kind,
                        &nums[0],
                        &nums[1],
                        &nums[2],
                        &nums[3],
                        &ack.error,
                    ],
                )
                .await?;
            })
        })
    }

    fn client_versions(&self) -> Result<Vec<ClientVersion>, StoreError> {
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query(
                    "SELECT client, kind, version, apply_ns, acked_ns, latency_ns, error
                     FROM client_versions ORDER BY client, kind",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| ClientVersion {
                    client: r.get(0),
                    kind: r.get(1),
                    version: u64_of(r.get(2)),
                    apply_nanos: u64_of(r.get(3)),
                    acked_unix_nanos: u64_of(r.get(4)),
                    change_to_applied_nanos: u64_of(r.get(5)),
                    error: r.get(6),
                })
                .collect())
        })
    }

    fn put_signing_key(&self, key: &IssuedKey) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(|pool| async move {
            let (nb, na) = (i64_of(key.not_before_unix), i64_of(key.not_after_unix));
            in_tx!(pool, |tx, _slot| {
                tx.execute(
                    "INSERT INTO signing_keys (key_id, public, workload, not_before, not_after)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (key_id) DO UPDATE SET public = excluded.public,
                         workload = excluded.workload, not_before = excluded.not_before,
                         not_after = excluded.not_after",
                    &[&key.key_id, &key.public, &key.workload, &nb, &na],
                )
                .await?;
            })
        })
    }

    fn signing_keys(&self, now: u64) -> Result<Vec<IssuedKey>, StoreError> {
        let now = i64_of(now);
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let rows = conn
                .client()?
                .query(
                    "SELECT key_id, public, workload, not_before, not_after FROM signing_keys
                     WHERE not_after >= $1 ORDER BY key_id",
                    &[&now],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| IssuedKey {
                    key_id: r.get(0),
                    public: r.get(1),
                    workload: r.get(2),
                    not_before_unix: u64_of(r.get(3)),
                    not_after_unix: u64_of(r.get(4)),
                })
                .collect())
        })
    }

    fn retain(&self, retention: Retention, now_nanos: u64) -> Result<RetentionOutcome, StoreError> {
        let age_cutoff =
            now_nanos.saturating_sub(retention.max_age_secs.saturating_mul(1_000_000_000));
        let mut out =
            self.run(move |pool| async move { delete_before(&pool, age_cutoff).await })?;
        // Size: delete the oldest tenth while over the limit (a few rounds at most).
        for _ in 0..10 {
            if self.size_bytes()? <= retention.max_bytes {
                break;
            }
            let cutoff: Option<i64> = self.run(|pool| async move {
                let mut conn = pool.get().await?;
                let client = conn.client()?;
                let count: i64 = client
                    .query_one("SELECT count(*) FROM hops", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                if count == 0 {
                    return Ok(None);
                }
                Ok(client
                    .query_opt(
                        "SELECT start_ns FROM hops ORDER BY start_ns LIMIT 1 OFFSET $1",
                        &[&(count / 10)],
                    )
                    .await
                    .map_err(pg)?
                    .map(|r| r.get(0)))
            })?;
            let Some(cutoff) = cutoff else { break };
            let cutoff = u64_of(cutoff).saturating_add(1);
            let more = self.run(move |pool| async move { delete_before(&pool, cutoff).await })?;
            out.hops += more.hops;
            out.flows += more.flows;
            out.chains += more.chains;
        }
        Ok(out)
    }

    fn size_bytes(&self) -> Result<u64, StoreError> {
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let n: i64 = conn
                .client()?
                .query_one("SELECT coalesce(sum(bytes), 0)::bigint FROM usage", &[])
                .await
                .map_err(pg)?
                .get(0);
            Ok(u64_of(n))
        })
    }

    fn hop_count(&self) -> Result<u64, StoreError> {
        self.run(|pool| async move {
            let mut conn = pool.get().await?;
            let n: i64 = conn
                .client()?
                .query_one("SELECT count(*) FROM hops", &[])
                .await
                .map_err(pg)?
                .get(0);
            Ok(u64_of(n))
        })
    }
}

/// Deletes events and chains older than `cutoff`, in one transaction.
async fn delete_before(pool: &Pool, cutoff: u64) -> Result<RetentionOutcome, StoreError> {
    let cutoff = i64_of(cutoff);
    let hops_sql = format!(
        "WITH d AS (DELETE FROM hops WHERE start_ns < $1 RETURNING {} AS b)
         SELECT count(*), coalesce(sum(b), 0)::bigint FROM d",
        hop_bytes_sql()
    );
    let flows_sql = format!(
        "WITH d AS (DELETE FROM flows WHERE at_ns < $1 RETURNING {} AS b)
         SELECT count(*), coalesce(sum(b), 0)::bigint FROM d",
        flow_bytes_sql()
    );
    in_tx!(pool, |tx, slot| {
        let row = tx.query_one(hops_sql.as_str(), &[&cutoff]).await?;
        let (hops, mut freed): (i64, i64) = (row.get(0), row.get(1));
        let row = tx.query_one(flows_sql.as_str(), &[&cutoff]).await?;
        let flows: i64 = row.get(0);
        freed += row.get::<_, i64>(1);
        // Chains in slices, oldest first, each with its facts.
        let mut chains = 0_u64;
        loop {
            let old: Vec<(String, StoredChain)> = tx
                .query(
                    "SELECT chain_id, coverage, last_ns, summary, octet_length(shape) FROM chains
                     WHERE last_ns < $1 ORDER BY last_ns LIMIT 10000",
                    &[&cutoff],
                )
                .await?
                .iter()
                .map(stored_chain)
                .collect();
            if old.is_empty() {
                break;
            }
            let mut facts_out = FactDeletes::default();
            for (id, s) in &old {
                facts_out.all_of(id, s);
                freed += s.bytes;
            }
            freed += facts_out.run(&tx).await?;
            let ids: Vec<&str> = old.iter().map(|(id, _)| id.as_str()).collect();
            chains += tx
                .execute("DELETE FROM chains WHERE chain_id = ANY($1)", &[&ids])
                .await?;
        }
        add_usage(&tx, slot, -freed).await?;
        RetentionOutcome {
            hops: u64_of(hops),
            flows: u64_of(flows),
            chains,
        }
    })
}
