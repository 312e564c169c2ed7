//! MySQL / MariaDB client/server protocol decoding.
//!
//! Data flow: the sidecar hands every chunk it forwards to a [`Session`],
//! client bytes to [`Session::feed_client`] and server bytes to
//! [`Session::feed_server`], in the order it forwards them. The session
//! never changes or holds back bytes: it only looks at them.
//!
//! Inside, each direction has a [`Framer`] that cuts the byte stream into
//! logical packets (3-byte length, 1-byte sequence id; a payload of exactly
//! `0xFFFFFF` bytes continues in the next packet). A packet that lies whole
//! inside the chunk being fed is handed on as a borrowed slice of that chunk;
//! only a packet split across chunks is copied, and only up to a cap: beyond
//! it the bytes are counted, not kept. The shared [`Session`] state then
//! interprets the packets: connection phase (handshake v10,
//! `HandshakeResponse41`, `SSLRequest`, auth switch and more-data exchanges),
//! then commands and their responses (OK, ERR, EOF with or without
//! `CLIENT_DEPRECATE_EOF`, text and binary result sets, multi-results,
//! prepared statements, `LOCAL INFILE`).
//!
//! What the session understands reaches the caller as [`Event`]s passed to an
//! [`Observer`]: rows are borrowed views ([`RowView`]) whose values are only
//! decoded when the observer asks for them, so counting rows allocates
//! nothing. Each command that gets an answer ends with a [`QueryRecord`]
//! (SQL, database, user, connection attributes, columns, row counts, error).
//!
//! Invariants: no panic and no allocation driven by wire lengths beyond the
//! caps of [`Config`]; malformed packets are reported as
//! [`Event::Malformed`] and decoding goes on; unknown packets are reported
//! as [`Event::Unknown`]. Only a loss of framing-level understanding (a
//! connection-phase packet that cannot be decoded, too many commands in
//! flight) fails the session: from then on it ignores its input and the
//! caller forwards bytes untouched.

mod framing;
mod session;
mod wire;

#[cfg(test)]
mod tests;

pub use framing::{Framer, MAX_PAYLOAD, Packet};
pub use session::{
    AuthMoreData, ClientLogin, ColumnDef, Command, CommandKind, Config, Direction, Event, Observer,
    Phase, QueryRecord, ResultSummary, RowView, ServerError, ServerGreeting, Session, Value,
    Values,
};

/// Capability flags (`CLIENT_*`) of the handshake.
pub mod capabilities {
    /// `CLIENT_LONG_PASSWORD`; MariaDB servers clear it and call it `CLIENT_MYSQL`.
    pub const LONG_PASSWORD: u32 = 1;
    /// The client may name a database in the handshake response.
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    /// The zlib-compressed protocol is used after the handshake.
    pub const COMPRESS: u32 = 1 << 5;
    /// `LOAD DATA LOCAL INFILE` is allowed.
    pub const LOCAL_FILES: u32 = 1 << 7;
    /// The 4.1 protocol (SQL state in ERR, warnings and status in EOF).
    pub const PROTOCOL_41: u32 = 1 << 9;
    /// The client switches to TLS after an `SSLRequest`.
    pub const SSL: u32 = 1 << 11;
    /// Auth response prefixed by a 1-byte length.
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    /// Several statements per `COM_QUERY`.
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    /// Several result sets per command.
    pub const MULTI_RESULTS: u32 = 1 << 17;
    /// Several result sets per `COM_STMT_EXECUTE`.
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    /// Authentication plugins are named in the handshake.
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    /// Connection attributes follow the handshake response.
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    /// Auth response prefixed by a length-encoded integer.
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    /// OK packets carry session state changes.
    pub const SESSION_TRACK: u32 = 1 << 23;
    /// OK (header `0xFE`) replaces EOF packets in result sets.
    pub const DEPRECATE_EOF: u32 = 1 << 24;
    /// MySQL 8: the result set metadata may be omitted.
    pub const OPTIONAL_RESULTSET_METADATA: u32 = 1 << 25;
    /// MySQL 8: zstd compression.
    pub const ZSTD_COMPRESSION: u32 = 1 << 26;
    /// MySQL 8: query attributes in `COM_QUERY` and `COM_STMT_EXECUTE`.
    pub const QUERY_ATTRIBUTES: u32 = 1 << 27;

    /// MariaDB extended capability: progress reports (ERR `0xFFFF`).
    pub const MARIADB_PROGRESS: u32 = 1;
    /// MariaDB extended capability: bulk operations (`COM_STMT_BULK_EXECUTE`).
    pub const MARIADB_STMT_BULK_OPERATIONS: u32 = 1 << 2;
    /// MariaDB extended capability: extended type information in column definitions.
    pub const MARIADB_EXTENDED_METADATA: u32 = 1 << 3;
    /// MariaDB extended capability: result set metadata may be skipped.
    pub const MARIADB_CACHE_METADATA: u32 = 1 << 4;
}

/// Command bytes (`COM_*`), the first payload byte of a client packet.
pub mod commands {
    /// `COM_SLEEP`.
    pub const SLEEP: u8 = 0x00;
    /// `COM_QUIT`.
    pub const QUIT: u8 = 0x01;
    /// `COM_INIT_DB`.
    pub const INIT_DB: u8 = 0x02;
    /// `COM_QUERY`.
    pub const QUERY: u8 = 0x03;
    /// `COM_FIELD_LIST`.
    pub const FIELD_LIST: u8 = 0x04;
    /// `COM_CREATE_DB`.
    pub const CREATE_DB: u8 = 0x05;
    /// `COM_DROP_DB`.
    pub const DROP_DB: u8 = 0x06;
    /// `COM_REFRESH`.
    pub const REFRESH: u8 = 0x07;
    /// `COM_SHUTDOWN`.
    pub const SHUTDOWN: u8 = 0x08;
    /// `COM_STATISTICS`.
    pub const STATISTICS: u8 = 0x09;
    /// `COM_PROCESS_INFO`.
    pub const PROCESS_INFO: u8 = 0x0a;
    /// `COM_PROCESS_KILL`.
    pub const PROCESS_KILL: u8 = 0x0c;
    /// `COM_DEBUG`.
    pub const DEBUG: u8 = 0x0d;
    /// `COM_PING`.
    pub const PING: u8 = 0x0e;
    /// `COM_CHANGE_USER`.
    pub const CHANGE_USER: u8 = 0x11;
    /// `COM_BINLOG_DUMP`.
    pub const BINLOG_DUMP: u8 = 0x12;
    /// `COM_REGISTER_SLAVE`.
    pub const REGISTER_SLAVE: u8 = 0x15;
    /// `COM_STMT_PREPARE`.
    pub const STMT_PREPARE: u8 = 0x16;
    /// `COM_STMT_EXECUTE`.
    pub const STMT_EXECUTE: u8 = 0x17;
    /// `COM_STMT_SEND_LONG_DATA`.
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    /// `COM_STMT_CLOSE`.
    pub const STMT_CLOSE: u8 = 0x19;
    /// `COM_STMT_RESET`.
    pub const STMT_RESET: u8 = 0x1a;
    /// `COM_SET_OPTION`.
    pub const SET_OPTION: u8 = 0x1b;
    /// `COM_STMT_FETCH`.
    pub const STMT_FETCH: u8 = 0x1c;
    /// `COM_RESET_CONNECTION`.
    pub const RESET_CONNECTION: u8 = 0x1f;
    /// MariaDB `COM_STMT_BULK_EXECUTE`.
    pub const STMT_BULK_EXECUTE: u8 = 0xfa;
}

/// Server status flags (`SERVER_*`) of OK and EOF packets.
pub mod status {
    /// A transaction is open.
    pub const IN_TRANS: u16 = 0x0001;
    /// Autocommit is on.
    pub const AUTOCOMMIT: u16 = 0x0002;
    /// Another result set follows.
    pub const MORE_RESULTS_EXISTS: u16 = 0x0008;
    /// A read-only cursor was opened by `COM_STMT_EXECUTE`.
    pub const CURSOR_EXISTS: u16 = 0x0040;
    /// The last row of a cursor was sent.
    pub const LAST_ROW_SENT: u16 = 0x0080;
    /// The OK packet carries session state changes.
    pub const SESSION_STATE_CHANGED: u16 = 0x4000;
}

/// Why the MySQL decoder gave up on a packet or on the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MysqlError {
    /// A packet ended before a field it must contain.
    #[error("truncated {packet} packet")]
    Truncated {
        /// The kind of packet.
        packet: &'static str,
    },
    /// A packet's content contradicts the protocol.
    #[error("malformed {packet} packet: {reason}")]
    Malformed {
        /// The kind of packet.
        packet: &'static str,
        /// What was wrong, as a fixed description.
        reason: &'static str,
    },
    /// The server greeting is not protocol version 10.
    #[error("unsupported protocol version {0}")]
    UnsupportedProtocolVersion(u8),
    /// More commands were sent ahead of their responses than the session tracks.
    #[error("more than {0} commands in flight")]
    TooManyInFlight(usize),
    /// The session failed earlier and ignores its input.
    #[error("session failed earlier")]
    Failed,
}
