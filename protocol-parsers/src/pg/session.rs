//! Pairing requests with responses: per-query records from both directions.
//!
//! The session consumes the messages of both directions, each in the order
//! its side sent them. Client requests that the server answers are queued;
//! server responses are matched against the head of the queue, as the
//! protocol guarantees they come in request order (after an error, the
//! server skips requests up to the next `Sync`, and so does the queue).
//!
//! Prepared statements and portals are tracked when the client sends
//! `Parse`, `Bind` and `Close`, so an `Execute` is resolved to its SQL at the
//! moment it is sent, even when a pipelining client reuses the unnamed
//! statement before the server has answered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{
    Authentication, BackendMessage, CloseTarget, FrontendMessage, RowDescription, Text,
    TransactionStatus,
};

/// Bounds on what a [`Session`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Named prepared statements tracked; more are counted in
    /// [`SessionStats::untracked_statements`] and execute with unknown SQL.
    pub max_statements: usize,
    /// Portals tracked.
    pub max_portals: usize,
    /// Requests awaiting a response. Beyond this the session stops pairing
    /// until the client and server are back in step (no event is then emitted).
    pub max_pending: usize,
    /// Total bytes of SQL text kept for prepared statements.
    pub max_sql_bytes: usize,
    /// Column names kept per result.
    pub max_columns: usize,
    /// Startup and server parameters kept (each).
    pub max_params: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_statements: 10_000,
            max_portals: 1_000,
            max_pending: 10_000,
            max_sql_bytes: 16 << 20,
            max_columns: 1_664,
            max_params: 64,
        }
    }
}

/// How the server authenticated the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// No password asked (`trust`, `peer`, certificate).
    Trust,
    /// Cleartext password.
    Cleartext,
    /// MD5 password.
    Md5,
    /// SASL (SCRAM-SHA-256).
    Sasl,
    /// GSSAPI.
    Gss,
    /// SSPI.
    Sspi,
    /// Kerberos V5 (obsolete).
    KerberosV5,
    /// Another code.
    Other(i32),
}

/// Where a query came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuerySource {
    /// A simple-protocol `Query`; `index` counts the statements of a
    /// multi-statement query string from 0.
    Simple {
        /// Position of the statement in the query string.
        index: u32,
    },
    /// The extended protocol (`Parse`/`Bind`/`Execute`).
    Extended {
        /// The prepared statement name (`""` unnamed), `None` if unknown.
        statement: Option<Box<str>>,
        /// The portal name (`""` unnamed).
        portal: Box<str>,
    },
    /// A `FunctionCall`.
    FunctionCall,
    /// An error not tied to a request (authentication failure, shutdown).
    Connection,
}

/// How a query ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueryOutcome {
    /// `CommandComplete`.
    Complete,
    /// `EmptyQueryResponse`.
    Empty,
    /// `PortalSuspended`: the row limit of `Execute` was reached.
    Suspended,
    /// `ErrorResponse`.
    Failed,
}

/// The error that ended a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError {
    /// Severity (`ERROR`, `FATAL`, `PANIC`).
    pub severity: Box<str>,
    /// The SQLSTATE code.
    pub sqlstate: Box<str>,
}

/// One statement's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryEvent {
    /// The SQL text (the whole query string for a simple `Query`), `None` when
    /// unknown (statement not tracked, message too large).
    pub sql: Option<Arc<str>>,
    /// How it was sent.
    pub source: QuerySource,
    /// How it ended.
    pub outcome: QueryOutcome,
    /// The command of the command tag (`SELECT`, `INSERT`, `CREATE TABLE`, ...).
    pub command: Option<Box<str>>,
    /// The row count of the command tag.
    pub tag_rows: Option<u64>,
    /// Rows the server sent: `DataRow`s, or `CopyData` messages of a `COPY TO`.
    pub rows_returned: u64,
    /// The error, for a failed query.
    pub error: Option<QueryError>,
    /// Result column names from `RowDescription`, when known.
    pub columns: Option<Arc<[Box<str>]>>,
}

impl QueryEvent {
    /// Rows written by the statement: the tag's count for `INSERT`,
    /// `UPDATE`, `DELETE`, `MERGE` and `COPY FROM`.
    pub fn rows_affected(&self) -> Option<u64> {
        match self.command.as_deref() {
            Some("INSERT" | "UPDATE" | "DELETE" | "MERGE") => self.tag_rows,
            Some("COPY") if self.rows_returned == 0 => self.tag_rows,
            _ => None,
        }
    }
}

/// Counters of what a [`Session`] could not track.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Prepared statements not tracked (limits reached or SQL unknown).
    pub untracked_statements: u64,
    /// Portals not tracked (limit reached).
    pub untracked_portals: u64,
    /// Times the pending-request queue overflowed and pairing stopped.
    pub queue_overflows: u64,
    /// Responses that matched no pending request.
    pub unmatched_responses: u64,
    /// Malformed or oversized messages seen.
    pub opaque_messages: u64,
}

type Columns = Arc<[Box<str>]>;

/// Statements or portals by name. The unnamed one (empty name, by far the
/// most used) lives in its own slot: no hashing, no key allocation.
#[derive(Debug)]
struct NameMap<V> {
    unnamed: Option<V>,
    named: HashMap<Box<[u8]>, V>,
}

impl<V> Default for NameMap<V> {
    fn default() -> Self {
        Self {
            unnamed: None,
            named: HashMap::new(),
        }
    }
}

impl<V> NameMap<V> {
    fn get(&self, name: &[u8]) -> Option<&V> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    fn get_mut(&mut self, name: &[u8]) -> Option<&mut V> {
        if name.is_empty() {
            self.unnamed.as_mut()
        } else {
            self.named.get_mut(name)
        }
    }

    fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    fn insert(&mut self, name: &[u8], v: V) {
        if name.is_empty() {
            self.unnamed = Some(v);
        } else {
            self.named.insert(name.into(), v);
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<V> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    /// Named entries only: the limits apply to them.
    fn named_len(&self) -> usize {
        self.named.len()
    }

    fn len(&self) -> usize {
        self.named.len() + usize::from(self.unnamed.is_some())
    }

    fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        if self.unnamed.as_ref().is_some_and(|v| !keep(v)) {
            self.unnamed = None;
        }
        self.named.retain(|_, v| keep(v));
    }
}

#[derive(Debug)]
struct Statement {
    id: u64,
    sql: Option<Arc<str>>,
    columns: Option<Columns>,
}

#[derive(Debug)]
struct Portal {
    id: u64,
    statement: Box<[u8]>,
    stmt_id: Option<u64>,
    sql: Option<Arc<str>>,
    /// The number of `Sync`/`Query` sent before the `Bind`: the portal dies at
    /// the end of the transaction it was created in.
    epoch: u64,
}

#[derive(Debug)]
enum Op {
    /// The `StartupMessage`: answered by the first `ReadyForQuery`.
    Startup,
    Query {
        sql: Option<Arc<str>>,
        index: u32,
        epoch: u64,
    },
    Parse {
        name: Option<Box<[u8]>>,
        stmt_id: Option<u64>,
        sql: Option<Arc<str>>,
    },
    Bind {
        portal: Option<Box<[u8]>>,
        portal_id: Option<u64>,
        statement: Option<Box<[u8]>>,
        sql: Option<Arc<str>>,
    },
    Describe {
        target: Option<CloseTarget>,
        name: Box<[u8]>,
        id: Option<u64>,
    },
    Execute {
        portal: Option<Box<[u8]>>,
        portal_id: Option<u64>,
        statement: Option<Box<[u8]>>,
        stmt_id: Option<u64>,
        sql: Option<Arc<str>>,
    },
    Close,
    Sync {
        epoch: u64,
    },
    FunctionCall,
}

#[derive(Debug, Default)]
struct Acc {
    rows: u64,
    columns: Option<Columns>,
    copy_out: bool,
}

/// Tracks one PostgreSQL connection's state from its decoded messages and
/// emits a [`QueryEvent`] per statement. Pure: no I/O, bounded memory.
#[derive(Debug)]
pub struct Session {
    limits: SessionLimits,
    startup_params: Vec<(Box<str>, Box<str>)>,
    server_params: Vec<(Box<str>, Box<str>)>,
    application_name: Option<Box<str>>,
    protocol: Option<(u16, u16)>,
    encryption_requested: bool,
    encryption_accepted: Option<bool>,
    auth_method: Option<AuthMethod>,
    sasl_mechanism: Option<Box<str>>,
    authenticated: bool,
    backend_pid: Option<i32>,
    transaction_status: Option<TransactionStatus>,
    statements: NameMap<Statement>,
    portals: NameMap<Portal>,
    sql_bytes: usize,
    pending: VecDeque<Op>,
    acc: Acc,
    last_described_portal: Option<(u64, Columns)>,
    next_id: u64,
    /// `Sync`/`Query`/`FunctionCall` sent by the client.
    syncs_sent: u64,
    /// `ReadyForQuery` received.
    syncs_answered: u64,
    /// Pairing stopped after an overflow until `syncs_answered` catches up.
    lost: bool,
    stats: SessionStats,
}

impl Default for Session {
    fn default() -> Self {
        Self::new(SessionLimits::default())
    }
}

fn lossy(t: Text<'_>) -> Box<str> {
    t.to_string_lossy().into()
}

fn capped_push(v: &mut Vec<(Box<str>, Box<str>)>, max: usize, name: Text<'_>, value: Text<'_>) {
    if let Some(slot) = v.iter_mut().find(|(n, _)| n.as_bytes() == name.as_bytes()) {
        slot.1 = lossy(value);
    } else if v.len() < max {
        v.push((lossy(name), lossy(value)));
    }
}

fn find<'s>(v: &'s [(Box<str>, Box<str>)], name: &str) -> Option<&'s str> {
    v.iter().find(|(n, _)| &**n == name).map(|(_, v)| &**v)
}

impl Session {
    /// A session at the start of a connection.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            startup_params: Vec::new(),
            server_params: Vec::new(),
            application_name: None,
            protocol: None,
            encryption_requested: false,
            encryption_accepted: None,
            auth_method: None,
            sasl_mechanism: None,
            authenticated: false,
            backend_pid: None,
            transaction_status: None,
            statements: NameMap::default(),
            portals: NameMap::default(),
            sql_bytes: 0,
            pending: VecDeque::new(),
            acc: Acc::default(),
            last_described_portal: None,
            next_id: 0,
            syncs_sent: 0,
            syncs_answered: 0,
            lost: false,
            stats: SessionStats::default(),
        }
    }

    /// The `user` startup parameter.
    pub fn user(&self) -> Option<&str> {
        find(&self.startup_params, "user")
    }

    /// The `database` startup parameter, defaulting to the user as PostgreSQL does.
    pub fn database(&self) -> Option<&str> {
        find(&self.startup_params, "database").or_else(|| self.user())
    }

    /// The current `application_name`: the latest `ParameterStatus`, else the
    /// startup parameter.
    pub fn application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    /// A startup parameter.
    pub fn startup_param(&self, name: &str) -> Option<&str> {
        find(&self.startup_params, name)
    }

    /// A server parameter from `ParameterStatus` (e.g. `server_version`).
    pub fn server_param(&self, name: &str) -> Option<&str> {
        find(&self.server_params, name)
    }

    /// The protocol version of the `StartupMessage`.
    pub fn protocol_version(&self) -> Option<(u16, u16)> {
        self.protocol
    }

    /// Whether the client asked for TLS or GSSAPI encryption, and the answer.
    pub fn encryption(&self) -> (bool, Option<bool>) {
        (self.encryption_requested, self.encryption_accepted)
    }

    /// The authentication method the server asked for.
    pub fn auth_method(&self) -> Option<AuthMethod> {
        self.auth_method
    }

    /// The SASL mechanism the client chose.
    pub fn sasl_mechanism(&self) -> Option<&str> {
        self.sasl_mechanism.as_deref()
    }

    /// Whether the server sent `AuthenticationOk`.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The backend process id from `BackendKeyData`.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// The transaction status of the latest `ReadyForQuery`.
    pub fn transaction_status(&self) -> Option<TransactionStatus> {
        self.transaction_status
    }

    /// The SQL of a tracked prepared statement.
    pub fn statement_sql(&self, name: &str) -> Option<&str> {
        self.statements.get(name.as_bytes())?.sql.as_deref()
    }

    /// How many prepared statements are tracked (the unnamed one included).
    pub fn statement_count(&self) -> usize {
        self.statements.len()
    }

    /// How many portals are tracked.
    pub fn portal_count(&self) -> usize {
        self.portals.len()
    }

    /// How many requests await a response.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The result columns of the statement now returning rows, when known.
    pub fn current_columns(&self) -> Option<&[Box<str>]> {
        self.acc.columns.as_deref()
    }

    /// What could not be tracked.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn push(&mut self, op: Op) {
        if self.lost {
            return;
        }
        if self.pending.len() >= self.limits.max_pending {
            self.stats.queue_overflows += 1;
            self.pending.clear();
            self.acc = Acc::default();
            self.lost = true;
            return;
        }
        self.pending.push_back(op);
    }

    fn remove_statement(&mut self, name: &[u8]) {
        if let Some(s) = self.statements.remove(name) {
            self.sql_bytes -= s.sql.as_deref().map_or(0, str::len);
        }
    }

    fn sync_sent(&mut self) -> u64 {
        let epoch = self.syncs_sent;
        self.syncs_sent += 1;
        epoch
    }

    /// Consumes a client message.
    pub fn on_frontend(&mut self, msg: &FrontendMessage<'_>) {
        match *msg {
            FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                self.encryption_requested = true;
            }
            FrontendMessage::Startup(s) => {
                self.protocol = Some((s.major, s.minor));
                for (name, value) in s.params().filter_map(Result::ok) {
                    capped_push(
                        &mut self.startup_params,
                        self.limits.max_params,
                        name,
                        value,
                    );
                }
                self.application_name = s.application_name().map(lossy);
                self.sync_sent();
                self.push(Op::Startup);
            }
            FrontendMessage::AuthResponse(a) => {
                if self.sasl_mechanism.is_none()
                    && let Ok(m) = a.sasl_mechanism()
                    && (1..=64).contains(&m.as_bytes().len())
                    && m.as_bytes().iter().all(|b| {
                        b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_'
                    })
                {
                    self.sasl_mechanism = Some(lossy(m));
                }
            }
            FrontendMessage::Query { sql } => {
                // A simple Query destroys the unnamed statement.
                self.remove_statement(b"");
                let epoch = self.sync_sent();
                self.push(Op::Query {
                    sql: Some(Arc::from(sql.to_string_lossy())),
                    index: 0,
                    epoch,
                });
            }
            FrontendMessage::Parse { statement, sql, .. } => {
                self.on_parse(statement.as_bytes(), Some(sql))
            }
            FrontendMessage::Bind(b) => {
                self.on_bind(Some(b.portal.as_bytes()), b.statement.as_bytes())
            }
            FrontendMessage::Describe { target, name } => {
                let id = match target {
                    CloseTarget::Statement => self.statements.get(name.as_bytes()).map(|s| s.id),
                    CloseTarget::Portal => self.portals.get(name.as_bytes()).map(|p| p.id),
                };
                self.push(Op::Describe {
                    target: Some(target),
                    name: name.as_bytes().into(),
                    id,
                });
            }
            FrontendMessage::Execute { portal, .. } => self.on_execute(Some(portal.as_bytes())),
            FrontendMessage::Close { target, name } => {
                match target {
                    CloseTarget::Statement => self.remove_statement(name.as_bytes()),
                    CloseTarget::Portal => {
                        self.portals.remove(name.as_bytes());
                    }
                }
                self.push(Op::Close);
            }
            FrontendMessage::Sync => {
                let epoch = self.sync_sent();
                self.push(Op::Sync { epoch });
            }
            FrontendMessage::FunctionCall { .. } => {
                self.sync_sent();
                self.push(Op::FunctionCall);
            }
            FrontendMessage::Oversized { tag, .. } | FrontendMessage::Malformed { tag, .. } => {
                self.on_frontend_opaque(tag);
            }
            FrontendMessage::CancelRequest { .. }
            | FrontendMessage::Flush
            | FrontendMessage::CopyData { .. }
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail { .. }
            | FrontendMessage::Terminate
            | FrontendMessage::Unknown { .. } => {}
        }
    }

    /// A client message whose content is unknown (too large or malformed):
    /// keeps the request queue in step using its tag alone.
    fn on_frontend_opaque(&mut self, tag: u8) {
        self.stats.opaque_messages += 1;
        match tag {
            b'Q' => {
                self.remove_statement(b"");
                let epoch = self.sync_sent();
                self.push(Op::Query {
                    sql: None,
                    index: 0,
                    epoch,
                });
            }
            b'P' => {
                self.stats.untracked_statements += 1;
                self.push(Op::Parse {
                    name: None,
                    stmt_id: None,
                    sql: None,
                });
            }
            b'B' => self.on_bind(None, b""),
            b'D' => self.push(Op::Describe {
                target: None,
                name: Box::default(),
                id: None,
            }),
            b'E' => self.on_execute(None),
            b'C' => self.push(Op::Close),
            b'S' => {
                let epoch = self.sync_sent();
                self.push(Op::Sync { epoch });
            }
            b'F' => {
                self.sync_sent();
                self.push(Op::FunctionCall);
            }
            _ => {}
        }
    }

    fn on_parse(&mut self, name: &[u8], sql: Option<Text<'_>>) {
        let sql: Option<Arc<str>> = sql.map(|s| Arc::from(s.to_string_lossy()));
        let len = sql.as_deref().map_or(0, str::len);
        let exists = self.statements.contains_key(name);
        let mut stmt_id = None;
        if !name.is_empty() && exists {
            // The server refuses to redefine a named statement; keep the old one.
        } else {
            if name.is_empty() {
                self.remove_statement(b"");
            }
            if (name.is_empty() || self.statements.named_len() < self.limits.max_statements)
                && self.sql_bytes + len <= self.limits.max_sql_bytes
            {
                let id = self.next_id();
                self.sql_bytes += len;
                self.statements.insert(
                    name,
                    Statement {
                        id,
                        sql: sql.clone(),
                        columns: None,
                    },
                );
                stmt_id = Some(id);
            } else {
                self.stats.untracked_statements += 1;
            }
        }
        self.push(Op::Parse {
            name: Some(name.into()),
            stmt_id,
            sql,
        });
    }

    fn on_bind(&mut self, portal: Option<&[u8]>, statement: &[u8]) {
        let (stmt_id, sql, stmt_name) = match portal {
            Some(_) => match self.statements.get(statement) {
                Some(s) => (
                    Some(s.id),
                    s.sql.clone(),
                    Some(Box::<[u8]>::from(statement)),
                ),
                None => (None, None, Some(statement.into())),
            },
            None => (None, None, None),
        };
        let mut portal_id = None;
        if let Some(p) = portal {
            let exists = self.portals.contains_key(p);
            if p.is_empty() || !exists {
                if p.is_empty() || self.portals.named_len() < self.limits.max_portals {
                    let id = self.next_id();
                    self.portals.insert(
                        p,
                        Portal {
                            id,
                            statement: statement.into(),
                            stmt_id,
                            sql: sql.clone(),
                            epoch: self.syncs_sent,
                        },
                    );
                    portal_id = Some(id);
                } else {
                    self.stats.untracked_portals += 1;
                }
            }
        } else {
            // An unreadable Bind replaces the unnamed portal, probably.
            self.portals.remove(b"");
        }
        self.push(Op::Bind {
            portal: portal.map(Into::into),
            portal_id,
            statement: stmt_name,
            sql,
        });
    }

    fn on_execute(&mut self, portal: Option<&[u8]>) {
        let op = match portal.and_then(|p| self.portals.get(p).map(|e| (p, e))) {
            Some((p, e)) => Op::Execute {
                portal: Some(p.into()),
                portal_id: Some(e.id),
                statement: Some(e.statement.clone()),
                stmt_id: e.stmt_id,
                sql: e.sql.clone(),
            },
            None => Op::Execute {
                portal: portal.map(Into::into),
                portal_id: None,
                statement: None,
                stmt_id: None,
                sql: None,
            },
        };
        self.push(op);
    }

    fn columns(&self, rd: &RowDescription<'_>) -> Columns {
        rd.fields()
            .take(self.limits.max_columns)
            .filter_map(Result::ok)
            .map(|f| lossy(f.name))
            .collect()
    }

    fn event(
        &mut self,
        outcome: QueryOutcome,
        command: Option<(&str, Option<u64>)>,
        error: Option<QueryError>,
    ) -> Option<QueryEvent> {
        let acc = std::mem::take(&mut self.acc);
        let (sql, source, columns) = match self.pending.front_mut() {
            Some(Op::Query { sql, index, .. }) => {
                let ev = (
                    sql.clone(),
                    QuerySource::Simple { index: *index },
                    acc.columns,
                );
                *index = index.saturating_add(1);
                ev
            }
            Some(Op::Execute {
                portal,
                portal_id,
                statement,
                stmt_id,
                sql,
            }) => {
                let columns = acc.columns.or_else(|| {
                    match (&self.last_described_portal, portal_id) {
                        (Some((id, cols)), Some(pid)) if id == pid => Some(cols.clone()),
                        _ => None,
                    }
                    .or_else(|| {
                        let name = statement.as_deref()?;
                        let s = self.statements.get(name)?;
                        (Some(s.id) == *stmt_id)
                            .then(|| s.columns.clone())
                            .flatten()
                    })
                });
                (
                    sql.clone(),
                    extended_source(statement.as_deref(), portal.as_deref()),
                    columns,
                )
            }
            Some(Op::Parse { name, sql, .. }) => (
                sql.clone(),
                extended_source(name.as_deref(), Some(b"")),
                None,
            ),
            Some(Op::Bind {
                portal,
                statement,
                sql,
                ..
            }) => (
                sql.clone(),
                extended_source(statement.as_deref(), portal.as_deref()),
                None,
            ),
            Some(Op::Describe { .. } | Op::Close) => (None, extended_source(None, None), None),
            Some(Op::FunctionCall) => (None, QuerySource::FunctionCall, None),
            Some(Op::Sync { .. } | Op::Startup) | None => (None, QuerySource::Connection, None),
        };
        Some(QueryEvent {
            sql,
            source,
            outcome,
            command: command.map(|(c, _)| c.into()),
            tag_rows: command.and_then(|(_, r)| r),
            rows_returned: acc.rows,
            error,
            columns,
        })
    }

    fn front_is(&self, f: impl Fn(&Op) -> bool) -> bool {
        self.pending.front().is_some_and(f)
    }

    fn pop_if(&mut self, f: impl Fn(&Op) -> bool) -> Option<Op> {
        if self.front_is(f) {
            self.pending.pop_front()
        } else {
            self.stats.unmatched_responses += u64::from(!self.lost);
            None
        }
    }

    /// Consumes a server message; returns the record of the statement it
    /// completed, if any.
    pub fn on_backend(&mut self, msg: &BackendMessage<'_>) -> Option<QueryEvent> {
        match *msg {
            BackendMessage::DataRow(_) => {
                self.acc.rows += 1;
                None
            }
            BackendMessage::CopyData { .. } if self.acc.copy_out => {
                self.acc.rows += 1;
                None
            }
            BackendMessage::EncryptionResponse { accepted } => {
                self.encryption_accepted = Some(accepted);
                None
            }
            BackendMessage::Authentication(a) => {
                let method = match a {
                    Authentication::Ok => {
                        self.authenticated = true;
                        if self.auth_method.is_none() {
                            self.auth_method = Some(AuthMethod::Trust);
                        }
                        None
                    }
                    Authentication::CleartextPassword => Some(AuthMethod::Cleartext),
                    Authentication::Md5Password => Some(AuthMethod::Md5),
                    Authentication::Sasl(_) => Some(AuthMethod::Sasl),
                    Authentication::Gss => Some(AuthMethod::Gss),
                    Authentication::Sspi => Some(AuthMethod::Sspi),
                    Authentication::KerberosV5 => Some(AuthMethod::KerberosV5),
                    Authentication::Other(c) => Some(AuthMethod::Other(c)),
                    Authentication::GssContinue
                    | Authentication::SaslContinue
                    | Authentication::SaslFinal => None,
                };
                if let Some(m) = method
                    && self.auth_method.is_none()
                {
                    self.auth_method = Some(m);
                }
                None
            }
            BackendMessage::BackendKeyData { process_id } => {
                self.backend_pid = Some(process_id);
                None
            }
            BackendMessage::ParameterStatus { name, value } => {
                if name == "application_name" {
                    self.application_name = Some(lossy(value));
                }
                capped_push(&mut self.server_params, self.limits.max_params, name, value);
                None
            }
            BackendMessage::ParseComplete => {
                self.pop_if(|o| matches!(o, Op::Parse { .. }));
                None
            }
            BackendMessage::BindComplete => {
                self.pop_if(|o| matches!(o, Op::Bind { .. }));
                None
            }
            BackendMessage::CloseComplete => {
                self.pop_if(|o| matches!(o, Op::Close));
                None
            }
            BackendMessage::ParameterDescription(_) => None,
            BackendMessage::NoData => {
                self.pop_if(|o| matches!(o, Op::Describe { .. }));
                None
            }
            BackendMessage::RowDescription(rd) => {
                match self.pending.front() {
                    Some(Op::Describe { .. }) => {
                        let cols = self.columns(&rd);
                        if let Some(Op::Describe { target, name, id }) = self.pending.pop_front() {
                            match (target, id) {
                                (Some(CloseTarget::Portal), Some(id)) => {
                                    self.last_described_portal = Some((id, cols));
                                }
                                (Some(CloseTarget::Statement), Some(id)) => {
                                    if let Some(s) = self.statements.get_mut(&name)
                                        && s.id == id
                                    {
                                        s.columns = Some(cols);
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Some(Op::Query { .. } | Op::Execute { .. }) => {
                        self.acc.columns = Some(self.columns(&rd));
                    }
                    _ => self.stats.unmatched_responses += u64::from(!self.lost),
                }
                None
            }
            BackendMessage::CopyOutResponse(_) | BackendMessage::CopyBothResponse(_) => {
                self.acc.copy_out = true;
                None
            }
            BackendMessage::CopyInResponse(_) => {
                self.acc.copy_out = false;
                None
            }
            BackendMessage::CommandComplete(c) => {
                if !self.front_is(|o| matches!(o, Op::Query { .. } | Op::Execute { .. })) {
                    self.stats.unmatched_responses += u64::from(!self.lost);
                    self.acc = Acc::default();
                    return None;
                }
                let tag = c.parsed();
                self.apply_command_side_effects(tag.command);
                let ev = self.event(QueryOutcome::Complete, Some((tag.command, tag.rows)), None);
                // An Execute is done; a Query stays until ReadyForQuery.
                if self.front_is(|o| matches!(o, Op::Execute { .. })) {
                    self.pending.pop_front();
                }
                ev
            }
            BackendMessage::EmptyQueryResponse => self.finish_statement(QueryOutcome::Empty),
            BackendMessage::PortalSuspended => self.finish_statement(QueryOutcome::Suspended),
            BackendMessage::ErrorResponse(e) => {
                let error = QueryError {
                    severity: e.severity().map(lossy).unwrap_or_default(),
                    sqlstate: e.code().map(lossy).unwrap_or_default(),
                };
                if self.lost {
                    // Out of step: the error cannot be tied to a request.
                    return None;
                }
                let ev = self.event(QueryOutcome::Failed, None, Some(error));
                self.after_error();
                ev
            }
            BackendMessage::ReadyForQuery { status } => {
                self.on_ready(status);
                None
            }
            BackendMessage::CopyData { .. }
            | BackendMessage::CopyDone
            | BackendMessage::NoticeResponse(_)
            | BackendMessage::NotificationResponse { .. }
            | BackendMessage::NegotiateProtocolVersion { .. }
            | BackendMessage::FunctionCallResponse { .. }
            | BackendMessage::Unknown { .. } => None,
            BackendMessage::Oversized { tag, .. } => {
                self.stats.opaque_messages += 1;
                if tag == b'D' {
                    self.acc.rows += 1;
                }
                None
            }
            BackendMessage::Malformed { .. } => {
                self.stats.opaque_messages += 1;
                None
            }
        }
    }

    fn finish_statement(&mut self, outcome: QueryOutcome) -> Option<QueryEvent> {
        if !self.front_is(|o| matches!(o, Op::Query { .. } | Op::Execute { .. })) {
            self.stats.unmatched_responses += u64::from(!self.lost);
            self.acc = Acc::default();
            return None;
        }
        let ev = self.event(outcome, None, None);
        if self.front_is(|o| matches!(o, Op::Execute { .. })) {
            self.pending.pop_front();
        }
        ev
    }

    /// After an `ErrorResponse`: the failed request is done, and in the
    /// extended protocol the server skips everything up to the next `Sync`.
    fn after_error(&mut self) {
        match self.pending.front() {
            Some(Op::Query { .. } | Op::Sync { .. } | Op::FunctionCall | Op::Startup) | None => {}
            Some(_) => {
                while let Some(op) = self.pending.front() {
                    match op {
                        Op::Sync { .. } => break,
                        Op::Parse {
                            name: Some(name),
                            stmt_id: Some(id),
                            ..
                        } => {
                            // A statement whose Parse failed (or was skipped) does not exist.
                            let (name, id) = (name.clone(), *id);
                            if self.statements.get(&name).is_some_and(|s| s.id == id) {
                                self.remove_statement(&name);
                            }
                        }
                        Op::Bind {
                            portal: Some(portal),
                            portal_id: Some(id),
                            ..
                        } => {
                            let (portal, id) = (portal.clone(), *id);
                            if self.portals.get(&portal).is_some_and(|p| p.id == id) {
                                self.portals.remove(&portal);
                            }
                        }
                        _ => {}
                    }
                    self.pending.pop_front();
                }
            }
        }
    }

    fn on_ready(&mut self, status: TransactionStatus) {
        self.transaction_status = Some(status);
        self.acc = Acc::default();
        self.syncs_answered += 1;
        if self.lost {
            if self.syncs_answered >= self.syncs_sent {
                self.lost = false;
                self.pending.clear();
            }
            return;
        }
        let mut epoch = None;
        while let Some(op) = self.pending.pop_front() {
            match op {
                Op::Sync { epoch: e } | Op::Query { epoch: e, .. } => {
                    epoch = Some(e);
                    break;
                }
                Op::FunctionCall | Op::Startup => break,
                _ => self.stats.unmatched_responses += 1,
            }
        }
        if status == TransactionStatus::Idle
            && let Some(e) = epoch
        {
            // Portals end with their transaction.
            self.portals.retain(|p| p.epoch > e);
        }
    }

    fn apply_command_side_effects(&mut self, command: &str) {
        match command {
            "DEALLOCATE ALL" => {
                self.statements.named.clear();
                self.sql_bytes = self
                    .statements
                    .unnamed
                    .as_ref()
                    .and_then(|u| u.sql.as_deref())
                    .map_or(0, str::len);
            }
            "DISCARD ALL" => {
                self.statements.clear();
                self.sql_bytes = 0;
                self.portals.clear();
            }
            "DEALLOCATE" => {
                let name = match self.pending.front() {
                    Some(Op::Query { sql: Some(sql), .. }) => deallocate_target(sql),
                    _ => None,
                };
                if let Some(name) = name {
                    self.remove_statement(name.as_bytes());
                }
            }
            _ => {}
        }
    }
}

fn extended_source(statement: Option<&[u8]>, portal: Option<&[u8]>) -> QuerySource {
    QuerySource::Extended {
        statement: statement.map(|s| String::from_utf8_lossy(s).into()),
        portal: String::from_utf8_lossy(portal.unwrap_or_default()).into(),
    }
}

/// The statement name of a lone `DEALLOCATE [PREPARE] name` query.
pub(crate) fn deallocate_target(sql: &str) -> Option<String> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let mut words = sql.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("DEALLOCATE") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("PREPARE") {
        name = words.next()?;
    }
    if words.next().is_some() || sql.contains(';') {
        return None;
    }
    if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        return (!quoted.contains('"')).then(|| quoted.to_owned());
    }
    // Unquoted identifiers fold to lower case.
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        .then(|| name.to_ascii_lowercase())
}
