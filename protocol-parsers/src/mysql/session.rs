//! The connection state shared by both directions, and what it reports.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::framing::{Framer, MAX_PAYLOAD, Packet};
use super::wire::{self, Reader, text};
use super::{MysqlError, capabilities as cap, commands as com, status};

/// The smallest packet cap of a session: greetings and handshake responses fit.
const MIN_PACKET_CAP: usize = 256;

/// Limits that bound what a [`Session`] keeps, whatever the peers send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Bytes of SQL text kept per command (`COM_QUERY`, `COM_STMT_PREPARE`);
    /// longer text is cut and marked truncated. Also caps every client packet.
    pub max_query_bytes: usize,
    /// Bytes kept of one server packet (a row, a column definition); longer
    /// packets are counted and their values cut.
    pub max_server_packet_bytes: usize,
    /// Prepared statements tracked per connection; the oldest is forgotten beyond it.
    pub max_statements: usize,
    /// Approximate bytes (SQL text and column definitions) kept for tracked
    /// prepared statements; the oldest are forgotten beyond it.
    pub max_statement_bytes: usize,
    /// Column definitions kept per result set; further columns are counted
    /// only (their values are then not decoded in binary rows).
    pub max_columns: usize,
    /// Bytes kept of a name (user, database, schema, table, column, attribute key).
    pub max_name_bytes: usize,
    /// Connection attributes kept; further ones are dropped and flagged.
    pub max_attributes: usize,
    /// Bytes kept of one connection attribute value.
    pub max_attribute_value_bytes: usize,
    /// Bytes kept of a server error message.
    pub max_error_message_bytes: usize,
    /// Commands sent ahead of their responses that the session follows; one more fails it.
    pub max_in_flight: usize,
    /// Result sets summarised per command; further ones are counted only.
    pub max_result_sets: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_query_bytes: 1 << 20,
            max_server_packet_bytes: 1 << 20,
            max_statements: 10_000,
            max_statement_bytes: 32 << 20,
            max_columns: 1024,
            max_name_bytes: 256,
            max_attributes: 64,
            max_attribute_value_bytes: 1024,
            max_error_message_bytes: 512,
            max_in_flight: 256,
            max_result_sets: 8,
        }
    }
}

/// Which peer sent a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the server.
    Client,
    /// From the server to the client.
    Server,
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting for the server greeting and the client's handshake response.
    Handshake,
    /// Authentication exchange (after the handshake response or `COM_CHANGE_USER`).
    Auth,
    /// Commands and their responses.
    Command,
    /// The client asked for TLS: the rest of the stream is encrypted and not decoded.
    Tls,
    /// The compressed protocol was negotiated: the rest of the stream is not decoded.
    Compressed,
    /// Authentication failed; the server closes the connection.
    Closed,
    /// The decoder lost track; input is ignored and must be forwarded untouched.
    Failed,
}

impl Phase {
    fn decodes(self) -> bool {
        matches!(self, Self::Handshake | Self::Auth | Self::Command)
    }
}

/// The server's initial handshake (protocol version 10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerGreeting {
    /// Protocol version (10).
    pub protocol_version: u8,
    /// Server version string (MariaDB prefixes it with `5.5.5-`).
    pub server_version: String,
    /// Connection (thread) id.
    pub connection_id: u32,
    /// Capability flags offered by the server.
    pub capabilities: u32,
    /// MariaDB extended capabilities (zero for MySQL).
    pub mariadb_capabilities: u32,
    /// Default character set.
    pub charset: u8,
    /// Status flags.
    pub status: u16,
    /// Default authentication plugin.
    pub auth_plugin: String,
}

/// The client's handshake response (`HandshakeResponse41`). The auth
/// response itself is never kept, only its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLogin {
    /// Capability flags requested by the client.
    pub capabilities: u32,
    /// MariaDB extended capabilities requested by the client.
    pub mariadb_capabilities: u32,
    /// Maximum packet size the client accepts.
    pub max_packet: u32,
    /// Character set.
    pub charset: u8,
    /// Database user.
    pub user: Arc<str>,
    /// Length of the auth response (its bytes are not kept).
    pub auth_response_len: usize,
    /// Initial database (`CLIENT_CONNECT_WITH_DB`).
    pub database: Option<Arc<str>>,
    /// Authentication plugin the client used.
    pub auth_plugin: Option<String>,
    /// Connection attributes (`CLIENT_CONNECT_ATTRS`), in order.
    pub attributes: Arc<[(String, String)]>,
    /// Attributes were dropped or cut by the session's limits.
    pub attributes_truncated: bool,
}

/// A column definition of a result set or prepared statement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ColumnDef {
    /// Schema (database) of the column's table.
    pub schema: String,
    /// Table alias.
    pub table: String,
    /// Physical table name.
    pub org_table: String,
    /// Column alias, as the client sees it.
    pub name: String,
    /// Physical column name.
    pub org_name: String,
    /// Character set number.
    pub charset: u16,
    /// Maximum length of the column's values.
    pub length: u32,
    /// Column type (`MYSQL_TYPE_*`).
    pub column_type: u8,
    /// Column flags (`UNSIGNED_FLAG` is `0x20`).
    pub flags: u16,
    /// Decimals.
    pub decimals: u8,
}

/// An ERR packet sent by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Error code (e.g. 1146 for a missing table).
    pub code: u16,
    /// Five-character SQL state, when the protocol carries it.
    pub sql_state: Option<String>,
    /// Message, cut to the session's limit.
    pub message: String,
}

/// What a client command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `COM_QUERY`: SQL text.
    Query,
    /// `COM_INIT_DB`: change the default database.
    InitDb,
    /// `COM_FIELD_LIST` (legacy): the columns of a table.
    FieldList,
    /// `COM_QUIT`.
    Quit,
    /// `COM_PING`.
    Ping,
    /// `COM_STATISTICS`.
    Statistics,
    /// `COM_PROCESS_INFO`.
    ProcessInfo,
    /// `COM_PROCESS_KILL`.
    ProcessKill,
    /// `COM_DEBUG`.
    Debug,
    /// `COM_CHANGE_USER`: re-authenticate as another user.
    ChangeUser,
    /// `COM_STMT_PREPARE`.
    StmtPrepare,
    /// `COM_STMT_EXECUTE`.
    StmtExecute,
    /// MariaDB `COM_STMT_BULK_EXECUTE`.
    StmtBulkExecute,
    /// `COM_STMT_SEND_LONG_DATA` (no response).
    StmtSendLongData,
    /// `COM_STMT_CLOSE` (no response).
    StmtClose,
    /// `COM_STMT_RESET`.
    StmtReset,
    /// `COM_STMT_FETCH`: rows of an open cursor.
    StmtFetch,
    /// `COM_SET_OPTION`.
    SetOption,
    /// `COM_RESET_CONNECTION`.
    ResetConnection,
    /// `COM_BINLOG_DUMP` and other replication commands; not followed.
    Replication(u8),
    /// A command byte this decoder does not know (or an obsolete one).
    Unknown(u8),
}

impl CommandKind {
    /// The kind of a command byte.
    pub fn from_code(code: u8) -> Self {
        match code {
            com::QUERY => Self::Query,
            com::INIT_DB => Self::InitDb,
            com::FIELD_LIST => Self::FieldList,
            com::QUIT => Self::Quit,
            com::PING => Self::Ping,
            com::STATISTICS => Self::Statistics,
            com::PROCESS_INFO => Self::ProcessInfo,
            com::PROCESS_KILL => Self::ProcessKill,
            com::DEBUG => Self::Debug,
            com::CHANGE_USER => Self::ChangeUser,
            com::STMT_PREPARE => Self::StmtPrepare,
            com::STMT_EXECUTE => Self::StmtExecute,
            com::STMT_BULK_EXECUTE => Self::StmtBulkExecute,
            com::STMT_SEND_LONG_DATA => Self::StmtSendLongData,
            com::STMT_CLOSE => Self::StmtClose,
            com::STMT_RESET => Self::StmtReset,
            com::STMT_FETCH => Self::StmtFetch,
            com::SET_OPTION => Self::SetOption,
            com::RESET_CONNECTION => Self::ResetConnection,
            com::BINLOG_DUMP | com::REGISTER_SLAVE | 0x1e | 0x20 => Self::Replication(code),
            _ => Self::Unknown(code),
        }
    }

    fn expects(self) -> Expect {
        match self {
            Self::Query | Self::ProcessInfo => Expect::ResultSet { binary: false },
            Self::StmtExecute | Self::StmtBulkExecute => Expect::ResultSet { binary: true },
            Self::StmtFetch => Expect::Fetch,
            Self::StmtPrepare => Expect::Prepare,
            Self::FieldList => Expect::FieldList,
            Self::Statistics => Expect::Raw,
            Self::ChangeUser => Expect::Auth,
            Self::Quit | Self::StmtSendLongData | Self::StmtClose | Self::Replication(_) => {
                Expect::Nothing
            }
            _ => Expect::Generic,
        }
    }
}

/// A client command as it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    /// What the command is.
    pub kind: CommandKind,
    /// SQL text: the query, the statement being prepared, or the prepared
    /// statement's SQL for an execute, fetch, reset or close.
    pub sql: Option<&'a str>,
    /// Prepared statement id, for statement commands.
    pub statement_id: Option<u32>,
    /// Full payload length on the wire.
    pub len: u64,
}

/// A server's `AuthMoreData` (`0x01`) packet, as far as it is understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMoreData {
    /// `caching_sha2_password`: the cached hash matched (fast auth).
    FastAuthSuccess,
    /// `caching_sha2_password`: full authentication (TLS or RSA) is required.
    FullAuthRequired,
    /// Other plugin data (such as an RSA public key), by length.
    Other {
        /// Length of the data.
        len: u64,
    },
}

/// One result set (or OK) of a command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResultSummary {
    /// Column definitions (empty for an OK without result set).
    pub columns: Vec<ColumnDef>,
    /// Number of columns announced, which may exceed `columns.len()`.
    pub column_count: u64,
    /// Rows returned.
    pub rows: u64,
}

/// Everything learned about one command once its response is complete.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRecord {
    /// The command.
    pub command: CommandKind,
    /// SQL text (the prepared statement's SQL for statement commands).
    pub sql: Option<Arc<str>>,
    /// Full length of the SQL text on the wire.
    pub sql_len: u64,
    /// The SQL text was cut at [`Config::max_query_bytes`].
    pub sql_truncated: bool,
    /// Prepared statement id (assigned by the server for a prepare).
    pub statement_id: Option<u32>,
    /// Database user of the connection when the command was sent.
    pub user: Option<Arc<str>>,
    /// Default database when the command was sent.
    pub database: Option<Arc<str>>,
    /// Connection attributes of the connection.
    pub attributes: Arc<[(String, String)]>,
    /// Result sets, at most [`Config::max_result_sets`] of them.
    pub results: Vec<ResultSummary>,
    /// Number of result sets, including those not summarised.
    pub result_sets: u32,
    /// Rows returned over all result sets.
    pub rows: u64,
    /// Rows affected (sum over OK packets).
    pub affected_rows: u64,
    /// Last insert id of the last OK packet that set one.
    pub last_insert_id: u64,
    /// Warnings (sum over OK and EOF packets).
    pub warnings: u32,
    /// Parameters of a prepared statement (for a prepare).
    pub params: u16,
    /// The error that ended the command, if any.
    pub error: Option<ServerError>,
    /// The server asked for a `LOCAL INFILE` upload; bytes uploaded.
    pub local_infile_bytes: Option<u64>,
}

impl QueryRecord {
    fn new(command: CommandKind, st: &State) -> Self {
        Self {
            command,
            sql: None,
            sql_len: 0,
            sql_truncated: false,
            statement_id: None,
            user: st.user.clone(),
            database: st.database.clone(),
            attributes: st.attributes.clone(),
            results: Vec::new(),
            result_sets: 0,
            rows: 0,
            affected_rows: 0,
            last_insert_id: 0,
            warnings: 0,
            params: 0,
            error: None,
            local_infile_bytes: None,
        }
    }

    /// Column names of the first result set that has columns.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.results
            .iter()
            .find(|r| !r.columns.is_empty())
            .into_iter()
            .flat_map(|r| r.columns.iter().map(|c| c.name.as_str()))
    }
}

/// One value of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// Text-protocol value, or a binary string, blob, decimal, JSON, enum, bit or geometry.
    Bytes(&'a [u8]),
    /// Signed integer (binary protocol).
    Int(i64),
    /// Unsigned integer (binary protocol).
    UInt(u64),
    /// `FLOAT` or `DOUBLE` (binary protocol).
    Float(f64),
    /// Date, time or datetime in its binary encoding (without the length byte).
    Temporal(&'a [u8]),
}

/// A row of a result set, borrowed: values are decoded only when asked for.
#[derive(Debug, Clone, Copy)]
pub struct RowView<'a> {
    /// The command this row answers (SQL, statement id, user...).
    pub record: &'a QueryRecord,
    /// Column definitions kept for the result set.
    pub columns: &'a [ColumnDef],
    column_count: u64,
    payload: &'a [u8],
    len: u64,
    binary: bool,
}

impl<'a> RowView<'a> {
    /// Whether the row uses the binary protocol (`COM_STMT_EXECUTE`).
    pub fn is_binary(&self) -> bool {
        self.binary
    }

    /// Length of the row on the wire.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the row has no payload at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the row was longer than the kept bytes: the last values may be missing.
    pub fn is_truncated(&self) -> bool {
        (self.payload.len() as u64) < self.len
    }

    /// The row's values in column order. Stops early at a value that is cut
    /// off or malformed, and (binary rows) after the kept column definitions.
    pub fn values(&self) -> Values<'a> {
        let mut r = Reader::new(self.payload);
        let mut null_bitmap: &[u8] = &[];
        if self.binary {
            r.skip(1);
            let n = usize::try_from(self.column_count.saturating_add(9) / 8).unwrap_or(usize::MAX);
            null_bitmap = r.bytes(n).unwrap_or_default();
            if null_bitmap.len() != n {
                r = Reader::new(&[]);
            }
        }
        Values {
            r,
            columns: self.columns,
            null_bitmap,
            index: 0,
            binary: self.binary,
        }
    }
}

/// Iterator over the values of a [`RowView`].
#[derive(Debug, Clone)]
pub struct Values<'a> {
    r: Reader<'a>,
    columns: &'a [ColumnDef],
    null_bitmap: &'a [u8],
    index: usize,
    binary: bool,
}

impl<'a> Iterator for Values<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        if self.binary {
            let column = self.columns.get(self.index)?;
            let bit = self.index + 2;
            self.index += 1;
            let null = self
                .null_bitmap
                .get(bit / 8)
                .is_some_and(|b| b & (1 << (bit % 8)) != 0);
            if null {
                return Some(Value::Null);
            }
            let value =
                wire::binary_value(&mut self.r, column.column_type, column.flags & 0x20 != 0);
            if value.is_none() {
                self.r = Reader::new(&[]);
            }
            value
        } else {
            if self.r.is_empty() {
                return None;
            }
            self.index += 1;
            if self.r.rest().first() == Some(&0xfb) {
                self.r.skip(1);
                return Some(Value::Null);
            }
            match self.r.lenenc_bytes() {
                Some(b) => Some(Value::Bytes(b)),
                None => {
                    self.r = Reader::new(&[]);
                    None
                }
            }
        }
    }
}

/// Something the session understood, handed to the [`Observer`].
#[derive(Debug)]
pub enum Event<'a> {
    /// The server's initial handshake.
    ServerGreeting(&'a ServerGreeting),
    /// The client's handshake response.
    ClientLogin(&'a ClientLogin),
    /// The client sent an `SSLRequest`: the rest of the connection is TLS and
    /// the session stops decoding.
    TlsRequested,
    /// The compressed protocol starts: the session stops decoding.
    CompressionStarted,
    /// The server asks for another authentication plugin.
    AuthSwitch {
        /// Plugin name (empty for the pre-4.1 switch).
        plugin: &'a str,
        /// Length of the plugin data.
        data_len: u64,
    },
    /// The server sent plugin-specific authentication data.
    AuthMoreData(AuthMoreData),
    /// The client sent authentication data (never kept), by length.
    AuthData {
        /// Length of the data.
        len: u64,
    },
    /// Authentication succeeded.
    AuthOk,
    /// Authentication failed.
    AuthFailed(&'a ServerError),
    /// The client sent a command.
    Command(Command<'a>),
    /// The column definitions of a result set are complete.
    Columns {
        /// The command being answered.
        record: &'a QueryRecord,
        /// The column definitions kept.
        columns: &'a [ColumnDef],
    },
    /// A row of a result set.
    Row(RowView<'a>),
    /// The server asked the client to upload a local file.
    LocalInfile {
        /// File name requested (raw bytes).
        filename: &'a [u8],
    },
    /// A command's response is complete.
    Query(&'a QueryRecord),
    /// A packet that has no meaning here (unknown command, a server packet
    /// with no command in flight).
    Unknown {
        /// Who sent it.
        direction: Direction,
        /// First payload byte.
        first_byte: Option<u8>,
        /// Payload length.
        len: u64,
    },
    /// A packet could not be decoded; decoding goes on with the next one.
    Malformed {
        /// Who sent it.
        direction: Direction,
        /// What was wrong.
        error: &'a MysqlError,
    },
    /// The session failed and ignores the rest of its input.
    Failed(&'a MysqlError),
}

/// Receives what a [`Session`] understands. Closures `FnMut(Event<'_>)` are observers.
pub trait Observer {
    /// Called for each event, in stream order.
    fn event(&mut self, event: Event<'_>);
}

impl<F: FnMut(Event<'_>)> Observer for F {
    fn event(&mut self, event: Event<'_>) {
        self(event)
    }
}

impl Observer for () {
    fn event(&mut self, _event: Event<'_>) {}
}

/// What answer a command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Nothing,
    Generic,
    ResultSet { binary: bool },
    Fetch,
    Prepare,
    FieldList,
    Raw,
    Auth,
}

/// Where the response to the command at the front of the queue stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resp {
    /// First packet of a result (OK, ERR, LOCAL INFILE or a column count).
    First,
    /// Column definitions.
    Columns,
    /// The EOF after column definitions (without `CLIENT_DEPRECATE_EOF`).
    ColumnsEof,
    /// Rows until a terminator.
    Rows,
    /// Parameter definitions of a prepared statement.
    PrepParams,
    /// The EOF after parameter definitions.
    PrepParamsEof,
    /// Column definitions of a prepared statement.
    PrepColumns,
    /// The EOF after a prepared statement's column definitions.
    PrepColumnsEof,
    /// `COM_FIELD_LIST` column definitions until EOF.
    FieldList,
}

#[derive(Debug)]
struct InFlight {
    record: QueryRecord,
    expect: Expect,
    state: Resp,
    columns: Vec<ColumnDef>,
    /// Columns of a prepared statement, for results whose metadata is skipped.
    shared_columns: Option<Arc<[ColumnDef]>>,
    column_count: u64,
    columns_seen: u64,
    /// Rows of the current result set.
    result_rows: u64,
    params_left: u16,
    /// Database this command makes current when it succeeds.
    new_database: Option<Arc<str>>,
    /// User (and database) a `COM_CHANGE_USER` switches to.
    new_user: Option<(Arc<str>, Option<Arc<str>>)>,
}

impl InFlight {
    fn row_columns(&self) -> &[ColumnDef] {
        if self.columns.is_empty() {
            self.shared_columns.as_deref().unwrap_or_default()
        } else {
            &self.columns
        }
    }
}

#[derive(Debug)]
struct Statement {
    sql: Option<Arc<str>>,
    sql_len: u64,
    sql_truncated: bool,
    columns: Arc<[ColumnDef]>,
}

/// Prepared statements by id, bounded: the oldest is forgotten first.
#[derive(Debug, Default)]
struct Statements {
    map: HashMap<u32, Statement>,
    order: VecDeque<u32>,
    /// Approximate bytes held by the statements in `map`.
    bytes: usize,
}

impl Statement {
    /// Approximate heap bytes held by the statement.
    fn weight(&self) -> usize {
        let columns: usize = self
            .columns
            .iter()
            .map(|c| {
                std::mem::size_of::<ColumnDef>()
                    + c.schema.len()
                    + c.table.len()
                    + c.org_table.len()
                    + c.name.len()
                    + c.org_name.len()
            })
            .sum();
        64 + self.sql.as_deref().map_or(0, str::len) + columns
    }
}

impl Statements {
    fn insert(&mut self, id: u32, stmt: Statement, max: usize, max_bytes: usize) {
        self.remove(id);
        let weight = stmt.weight();
        if max == 0 || weight > max_bytes {
            return;
        }
        while self.map.len() >= max || self.bytes + weight > max_bytes {
            match self.order.pop_front() {
                Some(old) => self.remove(old),
                None => break,
            }
        }
        self.bytes += weight;
        self.map.insert(id, stmt);
        self.order.push_back(id);
        if self.order.len() > max.saturating_mul(2).saturating_add(16) {
            let map = &self.map;
            let mut seen = std::collections::HashSet::new();
            // Keep the last occurrence of each live id, in order.
            let mut kept: Vec<u32> = self
                .order
                .iter()
                .rev()
                .filter(|id| map.contains_key(id) && seen.insert(**id))
                .copied()
                .collect();
            kept.reverse();
            self.order = kept.into();
        }
    }

    fn remove(&mut self, id: u32) {
        if let Some(old) = self.map.remove(&id) {
            self.bytes = self.bytes.saturating_sub(old.weight());
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

/// Session state apart from the framers, so that a packet borrowed from a
/// framer can be handled while the state changes.
#[derive(Debug)]
struct State {
    config: Config,
    phase: Phase,
    greeting: Option<ServerGreeting>,
    login: Option<ClientLogin>,
    /// Negotiated capabilities.
    caps: u32,
    /// Negotiated MariaDB extended capabilities.
    mariadb_caps: u32,
    /// The compressed protocol starts after authentication.
    compress_after_auth: bool,
    user: Option<Arc<str>>,
    database: Option<Arc<str>>,
    attributes: Arc<[(String, String)]>,
    statements: Statements,
    last_prepared: Option<u32>,
    in_flight: VecDeque<InFlight>,
    /// The client is uploading a `LOCAL INFILE`.
    infile_upload: bool,
}

/// A MySQL / MariaDB connection as seen by the sidecar: feed it both
/// directions, in forwarding order, and it reports what it understands.
#[derive(Debug)]
pub struct Session {
    client: Framer,
    server: Framer,
    st: State,
}

impl Default for Session {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl Session {
    /// A session for a new connection (before the server greeting).
    pub fn new(config: Config) -> Self {
        Self {
            // Connection-phase packets are small but must be whole: a floor
            // on the caps keeps them so, whatever the configuration.
            client: Framer::new(config.max_query_bytes.saturating_add(1).max(MIN_PACKET_CAP)),
            server: Framer::new(config.max_server_packet_bytes.max(MIN_PACKET_CAP)),
            st: State {
                config,
                phase: Phase::Handshake,
                greeting: None,
                login: None,
                caps: 0,
                mariadb_caps: 0,
                compress_after_auth: false,
                user: None,
                database: None,
                attributes: Arc::from(Vec::new()),
                statements: Statements::default(),
                last_prepared: None,
                in_flight: VecDeque::new(),
                infile_upload: false,
            },
        }
    }

    /// Decodes bytes sent by the client. Returns an error only when the
    /// session fails (now or earlier); after that, forward bytes untouched.
    pub fn feed_client<O: Observer + ?Sized>(
        &mut self,
        mut bytes: &[u8],
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        self.feed(Direction::Client, &mut bytes, obs)
    }

    /// Decodes bytes sent by the server. Returns an error only when the
    /// session fails (now or earlier); after that, forward bytes untouched.
    pub fn feed_server<O: Observer + ?Sized>(
        &mut self,
        mut bytes: &[u8],
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        self.feed(Direction::Server, &mut bytes, obs)
    }

    fn feed<O: Observer + ?Sized>(
        &mut self,
        direction: Direction,
        bytes: &mut &[u8],
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        let framer = match direction {
            Direction::Client => &mut self.client,
            Direction::Server => &mut self.server,
        };
        while self.st.phase.decodes() {
            let Some(pkt) = framer.next(bytes) else {
                break;
            };
            let result = match direction {
                Direction::Client => self.st.client_packet(pkt, obs),
                Direction::Server => self.st.server_packet(pkt, obs),
            };
            if let Err(error) = result {
                self.st.phase = Phase::Failed;
                obs.event(Event::Failed(&error));
                return Err(error);
            }
        }
        if self.st.phase == Phase::Failed {
            return Err(MysqlError::Failed);
        }
        Ok(())
    }

    /// Where the connection stands.
    pub fn phase(&self) -> Phase {
        self.st.phase
    }

    /// The server greeting, once seen.
    pub fn greeting(&self) -> Option<&ServerGreeting> {
        self.st.greeting.as_ref()
    }

    /// The client's handshake response, once seen.
    pub fn login(&self) -> Option<&ClientLogin> {
        self.st.login.as_ref()
    }

    /// Negotiated capability flags.
    pub fn capabilities(&self) -> u32 {
        self.st.caps
    }

    /// Current database user (changes with `COM_CHANGE_USER`).
    pub fn user(&self) -> Option<&str> {
        self.st.user.as_deref()
    }

    /// Current default database.
    pub fn database(&self) -> Option<&str> {
        self.st.database.as_deref()
    }

    /// Connection attributes.
    pub fn attributes(&self) -> &[(String, String)] {
        &self.st.attributes
    }

    /// The SQL of a tracked prepared statement.
    pub fn statement_sql(&self, id: u32) -> Option<&str> {
        self.st.statements.map.get(&id)?.sql.as_deref()
    }

    /// Number of prepared statements tracked.
    pub fn statement_count(&self) -> usize {
        self.st.statements.map.len()
    }

    /// Whether the client's stream sits between packets (nothing partial
    /// buffered): the next client byte starts a packet.
    pub fn client_idle(&self) -> bool {
        self.client.is_idle()
    }

    /// Commands waiting for (the rest of) their response.
    pub fn in_flight(&self) -> usize {
        self.st.in_flight.len()
    }
}

fn malformed(packet: &'static str, reason: &'static str) -> MysqlError {
    MysqlError::Malformed { packet, reason }
}

fn arc_text(bytes: &[u8], max: usize) -> Arc<str> {
    Arc::from(text(bytes, max))
}

impl State {
    fn deprecate_eof(&self) -> bool {
        self.caps & cap::DEPRECATE_EOF != 0
    }

    fn server_error(&self, payload: &[u8]) -> ServerError {
        match wire::parse_err(payload) {
            Ok(e) => ServerError {
                code: e.code,
                sql_state: e
                    .sql_state
                    .map(|s| String::from_utf8_lossy(&s).into_owned()),
                message: text(e.message, self.config.max_error_message_bytes),
            },
            Err(_) => ServerError {
                code: 0,
                sql_state: None,
                message: String::new(),
            },
        }
    }

    fn column(&self, raw: &wire::RawColumn<'_>) -> ColumnDef {
        let max = self.config.max_name_bytes;
        ColumnDef {
            schema: text(raw.schema, max),
            table: text(raw.table, max),
            org_table: text(raw.org_table, max),
            name: text(raw.name, max),
            org_name: text(raw.org_name, max),
            charset: raw.charset,
            length: raw.length,
            column_type: raw.column_type,
            flags: raw.flags,
            decimals: raw.decimals,
        }
    }

    // ---- client direction ----

    fn client_packet<O: Observer + ?Sized>(
        &mut self,
        pkt: Packet<'_>,
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        match self.phase {
            Phase::Handshake => self.client_login(pkt, obs),
            Phase::Auth => {
                obs.event(Event::AuthData { len: pkt.len });
                Ok(())
            }
            Phase::Command if self.infile_upload => {
                if pkt.len == 0 {
                    self.infile_upload = false;
                }
                if let Some(f) = self.in_flight.front_mut() {
                    let n = f.record.local_infile_bytes.get_or_insert(0);
                    *n = n.saturating_add(pkt.len);
                }
                Ok(())
            }
            Phase::Command => self.client_command(pkt, obs),
            _ => Ok(()),
        }
    }

    fn client_login<O: Observer + ?Sized>(
        &mut self,
        pkt: Packet<'_>,
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        const P: &str = "handshake response";
        let mut r = Reader::new(pkt.payload);
        let caps = r.u32().ok_or(MysqlError::Truncated { packet: P })?;
        if caps & cap::PROTOCOL_41 == 0 {
            return Err(malformed(P, "pre-4.1 handshake response"));
        }
        let max_packet = r.u32().ok_or(MysqlError::Truncated { packet: P })?;
        let charset = r.u8().ok_or(MysqlError::Truncated { packet: P })?;
        r.skip(19).ok_or(MysqlError::Truncated { packet: P })?;
        let mariadb_caps = r.u32().ok_or(MysqlError::Truncated { packet: P })?;
        let server_caps = self.greeting.as_ref().map_or(u32::MAX, |g| g.capabilities);
        let server_ext = self
            .greeting
            .as_ref()
            .map_or(u32::MAX, |g| g.mariadb_capabilities);
        self.caps = caps & server_caps;
        self.mariadb_caps = if caps & cap::LONG_PASSWORD == 0 {
            mariadb_caps & server_ext
        } else {
            0
        };
        if r.is_empty() && caps & cap::SSL != 0 {
            self.phase = Phase::Tls;
            obs.event(Event::TlsRequested);
            return Ok(());
        }
        let cfg = &self.config;
        let user = arc_text(r.nul_bytes(), cfg.max_name_bytes);
        let auth_response_len = if caps & cap::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            r.lenenc_bytes()
                .ok_or(MysqlError::Truncated { packet: P })?
                .len()
        } else if caps & cap::SECURE_CONNECTION != 0 {
            let n = r.u8().ok_or(MysqlError::Truncated { packet: P })?;
            r.bytes(usize::from(n))
                .ok_or(MysqlError::Truncated { packet: P })?
                .len()
        } else {
            r.nul_bytes().len()
        };
        let database = (caps & cap::CONNECT_WITH_DB != 0)
            .then(|| r.nul_bytes())
            .filter(|d| !d.is_empty())
            .map(|d| arc_text(d, cfg.max_name_bytes));
        let auth_plugin = (caps & cap::PLUGIN_AUTH != 0)
            .then(|| r.nul_bytes())
            .filter(|p| !p.is_empty())
            .map(|p| text(p, cfg.max_name_bytes));
        let (attributes, attributes_truncated) = if caps & cap::CONNECT_ATTRS != 0 && !r.is_empty()
        {
            self.attributes_from(&mut r)
        } else {
            (Vec::new(), false)
        };
        let login = ClientLogin {
            capabilities: caps,
            mariadb_capabilities: mariadb_caps,
            max_packet,
            charset,
            user: user.clone(),
            auth_response_len,
            database: database.clone(),
            auth_plugin,
            attributes: Arc::from(attributes),
            attributes_truncated,
        };
        self.user = Some(user);
        self.database = database;
        self.attributes = login.attributes.clone();
        self.compress_after_auth = self.caps & (cap::COMPRESS | cap::ZSTD_COMPRESSION) != 0;
        self.phase = Phase::Auth;
        obs.event(Event::ClientLogin(self.login.insert(login)));
        Ok(())
    }

    /// Connection attributes: a length-encoded block of key/value pairs.
    fn attributes_from(&self, r: &mut Reader<'_>) -> (Vec<(String, String)>, bool) {
        let cfg = &self.config;
        let mut out = Vec::new();
        let mut truncated = false;
        let block = match r.lenenc() {
            Some(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX).min(r.rest().len());
                r.bytes(n).unwrap_or_default()
            }
            None => return (out, true),
        };
        let mut a = Reader::new(block);
        while !a.is_empty() {
            let (Some(k), Some(v)) = (a.lenenc_bytes(), a.lenenc_bytes()) else {
                truncated = true;
                break;
            };
            if out.len() >= cfg.max_attributes {
                truncated = true;
                break;
            }
            if k.len() > cfg.max_name_bytes || v.len() > cfg.max_attribute_value_bytes {
                truncated = true;
            }
            out.push((
                text(k, cfg.max_name_bytes),
                text(v, cfg.max_attribute_value_bytes),
            ));
        }
        (out, truncated)
    }

    fn client_command<O: Observer + ?Sized>(
        &mut self,
        pkt: Packet<'_>,
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        let Some((&code, body)) = pkt.payload.split_first() else {
            obs.event(Event::Unknown {
                direction: Direction::Client,
                first_byte: None,
                len: pkt.len,
            });
            return Ok(());
        };
        let kind = CommandKind::from_code(code);
        let body_len = pkt.len.saturating_sub(1);
        let mut record = QueryRecord::new(kind, self);
        let mut new_database = None;
        let mut new_user = None;
        let mut shared_columns = None;
        let max_sql = self.config.max_query_bytes;
        match kind {
            CommandKind::Query | CommandKind::StmtPrepare => {
                let sql = if kind == CommandKind::Query && self.caps & cap::QUERY_ATTRIBUTES != 0 {
                    match skip_query_attributes(body) {
                        Ok(sql) => sql,
                        Err(error) => {
                            obs.event(Event::Malformed {
                                direction: Direction::Client,
                                error: &error,
                            });
                            body
                        }
                    }
                } else {
                    body
                };
                let prefix = (body.len() - sql.len()) as u64;
                record.sql_len = body_len.saturating_sub(prefix);
                record.sql_truncated = record.sql_len > max_sql as u64;
                record.sql = Some(arc_text(sql, max_sql));
                if kind == CommandKind::Query
                    && let Some(db) = use_statement(sql)
                {
                    new_database = Some(arc_text(db, self.config.max_name_bytes));
                }
            }
            CommandKind::InitDb => {
                new_database = Some(arc_text(body, self.config.max_name_bytes));
            }
            CommandKind::StmtExecute
            | CommandKind::StmtBulkExecute
            | CommandKind::StmtFetch
            | CommandKind::StmtReset
            | CommandKind::StmtClose
            | CommandKind::StmtSendLongData => match Reader::new(body).u32() {
                Some(mut id) => {
                    if id == u32::MAX
                        && matches!(
                            kind,
                            CommandKind::StmtExecute | CommandKind::StmtBulkExecute
                        )
                        && let Some(last) = self.last_prepared
                    {
                        id = last;
                    }
                    record.statement_id = Some(id);
                    if let Some(stmt) = self.statements.map.get(&id) {
                        record.sql = stmt.sql.clone();
                        record.sql_len = stmt.sql_len;
                        record.sql_truncated = stmt.sql_truncated;
                        if !stmt.columns.is_empty() {
                            shared_columns = Some(stmt.columns.clone());
                        }
                    }
                }
                None => {
                    let error = MysqlError::Truncated {
                        packet: "statement command",
                    };
                    obs.event(Event::Malformed {
                        direction: Direction::Client,
                        error: &error,
                    });
                }
            },
            CommandKind::ChangeUser => {
                let mut r = Reader::new(body);
                let user = arc_text(r.nul_bytes(), self.config.max_name_bytes);
                if self.caps & cap::SECURE_CONNECTION != 0 {
                    let n = r.u8().unwrap_or(0);
                    r.skip(usize::from(n));
                } else {
                    r.nul_bytes();
                }
                let db = r.nul_bytes();
                let db = (!db.is_empty()).then(|| arc_text(db, self.config.max_name_bytes));
                if r.skip(2).is_some() {
                    if self.caps & cap::PLUGIN_AUTH != 0 {
                        r.nul_bytes();
                    }
                    if self.caps & cap::CONNECT_ATTRS != 0 && !r.is_empty() {
                        let (attrs, _) = self.attributes_from(&mut r);
                        self.attributes = Arc::from(attrs);
                    }
                }
                new_user = Some((user, db));
            }
            CommandKind::Unknown(code) => {
                obs.event(Event::Unknown {
                    direction: Direction::Client,
                    first_byte: Some(code),
                    len: pkt.len,
                });
            }
            _ => {}
        }
        let statement_id = record.statement_id;
        let expect = kind.expects();
        if kind == CommandKind::StmtClose
            && let Some(id) = statement_id
        {
            self.statements.remove(id);
        }
        if expect == Expect::Nothing {
            obs.event(Event::Command(Command {
                kind,
                sql: record.sql.as_deref(),
                statement_id,
                len: pkt.len,
            }));
            return Ok(());
        }
        if self.in_flight.len() >= self.config.max_in_flight {
            return Err(MysqlError::TooManyInFlight(self.config.max_in_flight));
        }
        if expect == Expect::Auth {
            self.phase = Phase::Auth;
        }
        self.in_flight.push_back(InFlight {
            record,
            expect,
            state: Resp::First,
            columns: Vec::new(),
            shared_columns,
            column_count: 0,
            columns_seen: 0,
            result_rows: 0,
            params_left: 0,
            new_database,
            new_user,
        });
        if let Some(f) = self.in_flight.back() {
            obs.event(Event::Command(Command {
                kind,
                sql: f.record.sql.as_deref(),
                statement_id,
                len: pkt.len,
            }));
        }
        Ok(())
    }

    // ---- server direction ----

    fn server_packet<O: Observer + ?Sized>(
        &mut self,
        pkt: Packet<'_>,
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        match self.phase {
            Phase::Handshake => self.server_greeting(pkt, obs),
            Phase::Auth => {
                self.server_auth(pkt, obs);
                Ok(())
            }
            Phase::Command => {
                self.server_response(pkt, obs);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn server_greeting<O: Observer + ?Sized>(
        &mut self,
        pkt: Packet<'_>,
        obs: &mut O,
    ) -> Result<(), MysqlError> {
        const P: &str = "initial handshake";
        let first = pkt.payload.first().copied();
        if self.greeting.is_some() {
            obs.event(Event::Unknown {
                direction: Direction::Server,
                first_byte: first,
                len: pkt.len,
            });
            return Ok(());
        }
        if first == Some(0xff) {
            let error = self.server_error(pkt.payload);
            self.phase = Phase::Closed;
            obs.event(Event::AuthFailed(&error));
            return Ok(());
        }
        let mut r = Reader::new(pkt.payload);
        let protocol_version = r.u8().ok_or(MysqlError::Truncated { packet: P })?;
        if protocol_version != 10 {
            return Err(MysqlError::UnsupportedProtocolVersion(protocol_version));
        }
        let server_version = text(r.nul_bytes(), self.config.max_name_bytes);
        let connection_id = r.u32().ok_or(MysqlError::Truncated { packet: P })?;
        r.skip(9).ok_or(MysqlError::Truncated { packet: P })?;
        let mut capabilities = u32::from(r.u16().ok_or(MysqlError::Truncated { packet: P })?);
        let mut g = ServerGreeting {
            protocol_version,
            server_version,
            connection_id,
            capabilities,
            mariadb_capabilities: 0,
            charset: 0,
            status: 0,
            auth_plugin: String::new(),
        };
        if let (Some(charset), Some(status), Some(hi), Some(auth_len)) =
            (r.u8(), r.u16(), r.u16(), r.u8())
        {
            capabilities |= u32::from(hi) << 16;
            g.capabilities = capabilities;
            g.charset = charset;
            g.status = status;
            r.skip(6).ok_or(MysqlError::Truncated { packet: P })?;
            let ext = r.u32().ok_or(MysqlError::Truncated { packet: P })?;
            if capabilities & cap::LONG_PASSWORD == 0 {
                g.mariadb_capabilities = ext;
            }
            if capabilities & cap::SECURE_CONNECTION != 0 {
                let n = usize::from(auth_len).saturating_sub(8).max(13);
                r.skip(n.min(r.rest().len()));
            }
            if capabilities & cap::PLUGIN_AUTH != 0 {
                g.auth_plugin = text(r.nul_bytes(), self.config.max_name_bytes);
            }
        }
        obs.event(Event::ServerGreeting(self.greeting.insert(g)));
        Ok(())
    }

    fn server_auth<O: Observer + ?Sized>(&mut self, pkt: Packet<'_>, obs: &mut O) {
        let first = pkt.payload.first().copied();
        match first {
            Some(0x00) => {
                let change = self
                    .in_flight
                    .front()
                    .is_some_and(|f| f.expect == Expect::Auth);
                if change {
                    if let Ok(ok) = wire::parse_ok(pkt.payload, self.caps)
                        && let Some(f) = self.in_flight.front_mut()
                    {
                        f.record.warnings += u32::from(ok.warnings);
                    }
                    self.phase = Phase::Command;
                    self.statements.clear();
                    obs.event(Event::AuthOk);
                    self.finish(obs);
                    return;
                }
                if let Ok(ok) = wire::parse_ok(pkt.payload, self.caps)
                    && let Some(schema) = ok.schema
                {
                    self.database = Some(arc_text(schema, self.config.max_name_bytes));
                }
                obs.event(Event::AuthOk);
                if self.compress_after_auth {
                    self.phase = Phase::Compressed;
                    obs.event(Event::CompressionStarted);
                } else {
                    self.phase = Phase::Command;
                }
            }
            Some(0xff) => {
                let error = self.server_error(pkt.payload);
                obs.event(Event::AuthFailed(&error));
                if self
                    .in_flight
                    .front()
                    .is_some_and(|f| f.expect == Expect::Auth)
                {
                    self.phase = Phase::Command;
                    if let Some(f) = self.in_flight.front_mut() {
                        f.new_user = None;
                        f.record.error = Some(error);
                    }
                    self.finish(obs);
                } else {
                    self.phase = Phase::Closed;
                }
            }
            Some(0xfe) => {
                let mut r = Reader::new(pkt.payload.get(1..).unwrap_or_default());
                let plugin = String::from_utf8_lossy(r.nul_bytes());
                let plugin = plugin.get(..self.config.max_name_bytes).unwrap_or(&plugin);
                let data_len = r.rest().len() as u64;
                obs.event(Event::AuthSwitch { plugin, data_len });
            }
            Some(0x01) => {
                let data = pkt.payload.get(1..).unwrap_or_default();
                let more = match data {
                    [3] => AuthMoreData::FastAuthSuccess,
                    [4] => AuthMoreData::FullAuthRequired,
                    _ => AuthMoreData::Other {
                        len: pkt.len.saturating_sub(1),
                    },
                };
                obs.event(Event::AuthMoreData(more));
            }
            _ => obs.event(Event::Unknown {
                direction: Direction::Server,
                first_byte: first,
                len: pkt.len,
            }),
        }
    }

    /// Completes the command at the front: applies its effects and reports it.
    fn finish<O: Observer + ?Sized>(&mut self, obs: &mut O) {
        let Some(mut f) = self.in_flight.pop_front() else {
            return;
        };
        if f.record.error.is_none() {
            if let Some(db) = f.new_database.take() {
                self.database = Some(db);
            }
            if let Some((user, db)) = f.new_user.take() {
                self.user = Some(user);
                self.database = db;
            }
            match f.record.command {
                CommandKind::ResetConnection => {
                    self.statements.clear();
                }
                CommandKind::StmtPrepare => {
                    if let Some(id) = f.record.statement_id {
                        let columns = f
                            .record
                            .results
                            .first_mut()
                            .map(|r| std::mem::take(&mut r.columns))
                            .unwrap_or_default();
                        f.record.results.clear();
                        self.statements.insert(
                            id,
                            Statement {
                                sql: f.record.sql.clone(),
                                sql_len: f.record.sql_len,
                                sql_truncated: f.record.sql_truncated,
                                columns: Arc::from(columns),
                            },
                            self.config.max_statements,
                            self.config.max_statement_bytes,
                        );
                        self.last_prepared = Some(id);
                    }
                }
                _ => {}
            }
        }
        obs.event(Event::Query(&f.record));
    }

    /// Ends the current result set: keeps its summary.
    fn end_result(&mut self) {
        let max = self.config.max_result_sets;
        if let Some(f) = self.in_flight.front_mut() {
            f.record.result_sets = f.record.result_sets.saturating_add(1);
            if f.record.results.len() < max {
                let columns = std::mem::take(&mut f.columns);
                f.record.results.push(ResultSummary {
                    columns,
                    column_count: f.column_count,
                    rows: f.result_rows,
                });
            } else {
                f.columns.clear();
            }
            f.column_count = 0;
            f.columns_seen = 0;
            f.result_rows = 0;
        }
    }

    fn server_response<O: Observer + ?Sized>(&mut self, pkt: Packet<'_>, obs: &mut O) {
        let first = pkt.payload.first().copied();
        let deprecate_eof = self.deprecate_eof();
        let Some(f) = self.in_flight.front_mut() else {
            obs.event(Event::Unknown {
                direction: Direction::Server,
                first_byte: first,
                len: pkt.len,
            });
            return;
        };
        // The hot path: a row of a result set.
        if f.state == Resp::Rows {
            let terminator = first == Some(0xfe) && pkt.len < MAX_PAYLOAD as u64;
            if !terminator && first != Some(0xff) {
                f.record.rows += 1;
                f.result_rows += 1;
                let binary = matches!(f.expect, Expect::ResultSet { binary: true } | Expect::Fetch);
                let columns = f.row_columns();
                let column_count = if f.column_count > 0 {
                    f.column_count
                } else {
                    columns.len() as u64
                };
                obs.event(Event::Row(RowView {
                    record: &f.record,
                    columns,
                    column_count,
                    payload: pkt.payload,
                    len: pkt.len,
                    binary,
                }));
                return;
            }
        }
        match (f.state, first) {
            (_, Some(0xff)) => {
                let error = self.server_error(pkt.payload);
                if error.code == 0xffff && self.mariadb_caps & cap::MARIADB_PROGRESS != 0 {
                    // A MariaDB progress report, not an error.
                    return;
                }
                if let Some(f) = self.in_flight.front_mut() {
                    f.record.error = Some(error);
                }
                if matches!(
                    f_state(self),
                    Some(Resp::Rows | Resp::ColumnsEof | Resp::Columns)
                ) {
                    self.end_result();
                }
                self.finish(obs);
            }
            (Resp::First, _) => self.first_packet(pkt, obs),
            (Resp::Columns | Resp::PrepParams | Resp::PrepColumns | Resp::FieldList, _) => {
                self.definition(pkt, obs)
            }
            (Resp::ColumnsEof, Some(0xfe)) if pkt.len < 9 => {
                let eof = wire::parse_eof(pkt.payload);
                if let Some(f) = self.in_flight.front_mut() {
                    f.record.warnings += u32::from(eof.warnings);
                    f.state = Resp::Rows;
                }
                if eof.status & status::CURSOR_EXISTS != 0 {
                    self.end_result();
                    self.finish(obs);
                }
            }
            (Resp::ColumnsEof, _) => {
                // No EOF after the column definitions (metadata skipped): a row.
                if let Some(f) = self.in_flight.front_mut() {
                    f.state = Resp::Rows;
                }
                self.server_response(pkt, obs);
            }
            (Resp::PrepParamsEof | Resp::PrepColumnsEof, _) => {
                let next = match f.state {
                    Resp::PrepParamsEof if f.columns_seen < f.column_count => Resp::PrepColumns,
                    _ => Resp::First,
                };
                if first != Some(0xfe) {
                    obs.event(Event::Malformed {
                        direction: Direction::Server,
                        error: &malformed("prepare response", "missing eof"),
                    });
                }
                f.state = next;
                if next == Resp::First {
                    self.end_prepare(obs);
                }
            }
            (Resp::Rows, _) => {
                // The terminator of a result set.
                let (warnings, st, ok) = if deprecate_eof || pkt.len >= 9 {
                    match wire::parse_ok(pkt.payload, self.caps) {
                        Ok(ok) => (
                            ok.warnings,
                            ok.status,
                            Some((ok.affected_rows, ok.last_insert_id)),
                        ),
                        Err(_) => (0, 0, None),
                    }
                } else {
                    let eof = wire::parse_eof(pkt.payload);
                    (eof.warnings, eof.status, None)
                };
                if let Some(f) = self.in_flight.front_mut() {
                    f.record.warnings += u32::from(warnings);
                    if let Some((affected, _)) = ok {
                        f.record.affected_rows = f.record.affected_rows.saturating_add(affected);
                    }
                }
                self.end_result();
                self.after_result(st, obs);
            }
        }
    }

    /// After an OK or result-set terminator: another result, or the end.
    fn after_result<O: Observer + ?Sized>(&mut self, server_status: u16, obs: &mut O) {
        let more = server_status & status::MORE_RESULTS_EXISTS != 0;
        if more && let Some(f) = self.in_flight.front_mut() {
            f.state = Resp::First;
            return;
        }
        self.finish(obs);
    }

    fn first_packet<O: Observer + ?Sized>(&mut self, pkt: Packet<'_>, obs: &mut O) {
        let first = pkt.payload.first().copied();
        let Some(f) = self.in_flight.front_mut() else {
            return;
        };
        let expect = f.expect;
        match (expect, first) {
            (Expect::Raw, _) | (Expect::Auth, _) => self.finish(obs),
            (Expect::Prepare, Some(0x00)) => match wire::parse_prepare_ok(pkt.payload) {
                Ok(p) => {
                    f.record.statement_id = Some(p.statement_id);
                    f.record.params = p.params;
                    f.record.warnings += u32::from(p.warnings);
                    f.column_count = u64::from(p.columns);
                    f.params_left = p.params;
                    f.columns_seen = 0;
                    f.state = if p.params > 0 {
                        Resp::PrepParams
                    } else if p.columns > 0 {
                        Resp::PrepColumns
                    } else {
                        Resp::First
                    };
                    if f.state == Resp::First {
                        self.end_prepare(obs);
                    }
                }
                Err(error) => {
                    obs.event(Event::Malformed {
                        direction: Direction::Server,
                        error: &error,
                    });
                    self.finish(obs);
                }
            },
            (Expect::Fetch, _) if first != Some(0xfe) => {
                f.state = Resp::Rows;
                self.server_response(pkt, obs);
            }
            (_, Some(0x00)) => self.ok_packet(pkt, obs),
            (_, Some(0xfe)) if pkt.len < MAX_PAYLOAD as u64 => {
                // EOF (or OK under DEPRECATE_EOF) as a whole answer: COM_DEBUG,
                // COM_FIELD_LIST of nothing, a fetch past the end.
                let st = if self.deprecate_eof() && pkt.len >= 7 {
                    wire::parse_ok(pkt.payload, self.caps).map_or(0, |ok| ok.status)
                } else {
                    wire::parse_eof(pkt.payload).status
                };
                self.after_result(st & !status::MORE_RESULTS_EXISTS, obs);
            }
            (Expect::ResultSet { .. }, Some(0xfb)) => {
                if let Some(f) = self.in_flight.front_mut() {
                    f.record.local_infile_bytes = Some(0);
                }
                self.infile_upload = true;
                obs.event(Event::LocalInfile {
                    filename: pkt.payload.get(1..).unwrap_or_default(),
                });
            }
            (Expect::FieldList, _) => {
                f.state = Resp::FieldList;
                self.definition(pkt, obs);
            }
            (Expect::ResultSet { .. } | Expect::Generic, _) => {
                let mut r = Reader::new(pkt.payload);
                match r.lenenc() {
                    Some(n) if n > 0 => {
                        // MariaDB cache metadata / MySQL optional metadata: one more byte.
                        let metadata = r.u8().is_none_or(|b| b != 0);
                        f.column_count = n;
                        f.columns_seen = 0;
                        f.columns.clear();
                        if metadata {
                            f.shared_columns = None;
                            f.state = Resp::Columns;
                        } else {
                            f.state = if self.caps & cap::DEPRECATE_EOF != 0 {
                                Resp::Rows
                            } else {
                                Resp::ColumnsEof
                            };
                        }
                    }
                    _ => {
                        obs.event(Event::Unknown {
                            direction: Direction::Server,
                            first_byte: first,
                            len: pkt.len,
                        });
                    }
                }
            }
            _ => obs.event(Event::Unknown {
                direction: Direction::Server,
                first_byte: first,
                len: pkt.len,
            }),
        }
    }

    fn ok_packet<O: Observer + ?Sized>(&mut self, pkt: Packet<'_>, obs: &mut O) {
        match wire::parse_ok(pkt.payload, self.caps) {
            Ok(ok) => {
                let max = self.config.max_name_bytes;
                if let Some(schema) = ok.schema {
                    self.database = Some(arc_text(schema, max));
                }
                let max_results = self.config.max_result_sets;
                if let Some(f) = self.in_flight.front_mut() {
                    f.record.affected_rows =
                        f.record.affected_rows.saturating_add(ok.affected_rows);
                    if ok.last_insert_id != 0 {
                        f.record.last_insert_id = ok.last_insert_id;
                    }
                    f.record.warnings += u32::from(ok.warnings);
                    f.record.result_sets = f.record.result_sets.saturating_add(1);
                    if f.record.results.len() < max_results {
                        f.record.results.push(ResultSummary::default());
                    }
                }
                self.after_result(ok.status, obs);
            }
            Err(error) => {
                obs.event(Event::Malformed {
                    direction: Direction::Server,
                    error: &error,
                });
                self.finish(obs);
            }
        }
    }

    /// A column or parameter definition packet.
    fn definition<O: Observer + ?Sized>(&mut self, pkt: Packet<'_>, obs: &mut O) {
        let extended = self.mariadb_caps & cap::MARIADB_EXTENDED_METADATA != 0;
        let deprecate_eof = self.deprecate_eof();
        let max_columns = self.config.max_columns;
        let state = f_state(self);
        if state == Some(Resp::FieldList)
            && pkt.payload.first() == Some(&0xfe)
            && pkt.len < MAX_PAYLOAD as u64
        {
            self.end_result();
            self.finish(obs);
            return;
        }
        if state == Some(Resp::PrepParams) {
            let Some(f) = self.in_flight.front_mut() else {
                return;
            };
            f.params_left = f.params_left.saturating_sub(1);
            if f.params_left == 0 {
                f.state = if !deprecate_eof {
                    Resp::PrepParamsEof
                } else if f.column_count > 0 {
                    Resp::PrepColumns
                } else {
                    Resp::First
                };
                if f.state == Resp::First {
                    self.end_prepare(obs);
                }
            }
            return;
        }
        let column = match wire::parse_column(pkt.payload, extended) {
            Ok(raw) => Some(self.column(&raw)),
            Err(error) => {
                obs.event(Event::Malformed {
                    direction: Direction::Server,
                    error: &error,
                });
                None
            }
        };
        let Some(f) = self.in_flight.front_mut() else {
            return;
        };
        if let Some(c) = column
            && f.columns.len() < max_columns
        {
            f.columns.push(c);
        }
        f.columns_seen += 1;
        if f.state == Resp::FieldList || f.columns_seen < f.column_count {
            return;
        }
        match f.state {
            Resp::Columns => {
                f.state = if deprecate_eof {
                    Resp::Rows
                } else {
                    Resp::ColumnsEof
                };
                obs.event(Event::Columns {
                    record: &f.record,
                    columns: &f.columns,
                });
            }
            Resp::PrepColumns => {
                if deprecate_eof {
                    f.state = Resp::First;
                    self.end_prepare(obs);
                } else {
                    f.state = Resp::PrepColumnsEof;
                }
            }
            _ => {}
        }
    }

    /// The prepare response is complete.
    fn end_prepare<O: Observer + ?Sized>(&mut self, obs: &mut O) {
        self.end_result();
        self.finish(obs);
    }
}

fn f_state(st: &State) -> Option<Resp> {
    st.in_flight.front().map(|f| f.state)
}

/// The SQL text of a `COM_QUERY` body that starts with query attributes
/// (`CLIENT_QUERY_ATTRIBUTES`).
fn skip_query_attributes(body: &[u8]) -> Result<&[u8], MysqlError> {
    const P: &str = "query attributes";
    let t = MysqlError::Truncated { packet: P };
    let mut r = Reader::new(body);
    let count = r.lenenc().ok_or(t.clone())?;
    let _sets = r.lenenc().ok_or(t.clone())?;
    if count == 0 {
        return Ok(r.rest());
    }
    if count > 4096 {
        return Err(malformed(P, "too many parameters"));
    }
    let n = count as usize;
    let bitmap = r.bytes(n.div_ceil(8)).ok_or(t.clone())?;
    if r.u8().ok_or(t.clone())? != 1 {
        return Err(malformed(P, "parameter types not sent"));
    }
    let types_start = r;
    for _ in 0..n {
        r.skip(2).ok_or(t.clone())?;
        r.lenenc_bytes().ok_or(t.clone())?;
    }
    let mut types = types_start;
    for i in 0..n {
        let ty = types.u8().ok_or(t.clone())?;
        let flag = types.u8().ok_or(t.clone())?;
        types.lenenc_bytes().ok_or(t.clone())?;
        let null = bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
        if !null {
            wire::binary_value(&mut r, ty, flag & 0x80 != 0).ok_or(t.clone())?;
        }
    }
    Ok(r.rest())
}

/// The database named by a simple `USE db` statement.
fn use_statement(sql: &[u8]) -> Option<&[u8]> {
    let s = sql.trim_ascii();
    let head = s.get(..4)?;
    if !head.eq_ignore_ascii_case(b"use ") && !head.eq_ignore_ascii_case(b"use\t") {
        return None;
    }
    let mut name = s.get(4..)?.trim_ascii();
    if let Some(n) = name.strip_suffix(b";") {
        name = n.trim_ascii();
    }
    if let Some(inner) = name.strip_prefix(b"`").and_then(|n| n.strip_suffix(b"`")) {
        return (!inner.is_empty() && !inner.contains(&b'`')).then_some(inner);
    }
    let simple = !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$');
    simple.then_some(name)
}
