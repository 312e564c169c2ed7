//! PostgreSQL wire protocol (version 3): incremental decoding of both
//! directions, and a session tracker that turns the two message streams into
//! per-query records.
//!
//! # How data flows
//!
//! The sidecar forwards every byte unchanged and hands a copy of each chunk to
//! a decoder: [`FrontendDecoder`] for client-to-server bytes, [`BackendDecoder`]
//! for server-to-client bytes. A decoder cuts the stream into [`Frame`]s (a
//! tag, a length and a borrowed body) without copying: a frame that lies
//! entirely in the chunk borrows the chunk; only a frame split across chunks
//! is assembled in a small internal buffer, and only when it is no longer than
//! [`Limits::max_buffered_len`]. Longer frames (a 500 MB `DataRow`, a huge
//! `CopyData`) are skipped as they stream by and reported as oversized, so a
//! decoder never allocates more than that bound. Any split of the stream
//! yields the same frames as the whole stream.
//!
//! [`FrontendMessage::parse`] and [`BackendMessage::parse`] read a frame's body
//! into a borrowed message. Parsing is total: a malformed body becomes a
//! `Malformed` message carrying a [`MessageError`], an unknown tag an `Unknown`
//! message. Variable-length parts (row values, row descriptions, error fields,
//! `Bind` parameters) are read lazily through iterators, so a `DataRow` costs a
//! few instructions until someone looks at its values.
//!
//! [`Session`] consumes the parsed messages of both directions, in the order
//! each side produced them, tracks prepared statements and portals, pairs
//! responses with the requests they answer and emits a [`QueryEvent`] per
//! statement: its SQL, rows returned, the command tag with its row count, the
//! error SQLSTATE, the result columns. [`Connection`] wires the two decoders and
//! the session together, including the `SSLRequest`/`GSSENCRequest` handshake
//! in which the server answers with a single byte.
//!
//! # Failure
//!
//! A framing error (a length below 4, above [`Limits::max_message_len`], a
//! startup packet of a protocol other than 3) is a [`DecodeError`]. The decoder
//! then stays failed and ignores further input: the caller keeps forwarding
//! bytes untouched and stops inspecting them.

mod backend;
mod connection;
mod framing;
mod frontend;
mod reader;
mod session;
mod text;

#[cfg(test)]
mod tests;

pub use backend::{
    Authentication, BackendMessage, CommandComplete, CommandTag, CopyResponse, DataRow,
    DataRowValues, ErrorField, ErrorFields, FieldDescription, FieldIter, RowDescription,
    SaslMechanisms, TransactionStatus,
};
pub use connection::Connection;
pub use framing::{BackendDecoder, EncryptionKind, Frame, FrameKind, FrontendDecoder};
pub use frontend::{
    AuthResponse, Bind, BindValues, CloseTarget, FormatCodes, FrontendMessage, Oids,
    StartupMessage, StartupParams,
};
pub use session::{
    AuthMethod, QueryError, QueryEvent, QueryOutcome, QuerySource, Session, SessionLimits,
    SessionStats,
};
pub use text::Text;

/// The largest message PostgreSQL itself accepts: `MaxAllocSize` (1 GiB) minus one.
pub const DEFAULT_MAX_MESSAGE_LEN: u32 = (1 << 30) - 1;

/// Default for [`Limits::max_buffered_len`]: 4 MiB.
pub const DEFAULT_MAX_BUFFERED_LEN: u32 = 4 << 20;

/// The largest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: u32 = 10_000;

/// Size limits of a decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A message whose length field exceeds this is a framing error.
    pub max_message_len: u32,
    /// A message whose body is longer than this is not materialized: it is
    /// skipped as it streams by and reported as oversized (tag and length
    /// only). This bounds the decoder's own buffer.
    pub max_buffered_len: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_len: DEFAULT_MAX_MESSAGE_LEN,
            max_buffered_len: DEFAULT_MAX_BUFFERED_LEN,
        }
    }
}

/// A framing error: the byte stream is not (or no longer) PostgreSQL protocol 3.
///
/// After one, the decoder is failed for good and returns [`DecodeError::Failed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A message length field is below 4, the size of the length field itself.
    #[error("message {tag:?} has length {len}, below the minimum of 4")]
    LengthTooShort {
        /// The message tag (`'\0'` for an untagged startup-phase packet).
        tag: char,
        /// The length field as read (signed, as PostgreSQL reads it).
        len: i32,
    },
    /// A message length field exceeds [`Limits::max_message_len`].
    #[error("message {tag:?} has length {len}, above the maximum of {max}")]
    LengthTooLong {
        /// The message tag (`'\0'` for an untagged startup-phase packet).
        tag: char,
        /// The length field as read.
        len: u32,
        /// The configured maximum.
        max: u32,
    },
    /// A startup-phase packet is shorter than 8 or longer than 10,000 bytes.
    #[error("startup packet has length {len}, outside 8..=10000")]
    StartupLength {
        /// The length field as read (signed, as PostgreSQL reads it).
        len: i32,
    },
    /// A startup-phase packet carries a request code this decoder does not know
    /// (a protocol version other than 3.x, or garbage).
    #[error("startup packet has unsupported request code {code:#010x}")]
    UnsupportedRequest {
        /// The code as read.
        code: u32,
    },
    /// The decoder failed earlier and no longer decodes anything.
    #[error("decoder failed earlier")]
    Failed,
}

/// A message body that does not match its tag's layout.
///
/// The stream's framing is intact: decoding continues with the next message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The body ended before the named field was complete.
    #[error("message {tag:?} ends inside field {field}")]
    Truncated {
        /// The message tag.
        tag: char,
        /// The field being read.
        field: &'static str,
    },
    /// A string field has no terminating NUL byte.
    #[error("message {tag:?} has an unterminated string in field {field}")]
    Unterminated {
        /// The message tag.
        tag: char,
        /// The field being read.
        field: &'static str,
    },
    /// A count or length is negative (other than -1 for NULL) or too large.
    #[error("message {tag:?} has invalid value {value} in field {field}")]
    InvalidValue {
        /// The message tag.
        tag: char,
        /// The field being read.
        field: &'static str,
        /// The offending value.
        value: i64,
    },
    /// Bytes remain after the last field.
    #[error("message {tag:?} has {count} trailing bytes")]
    TrailingBytes {
        /// The message tag.
        tag: char,
        /// How many bytes remain.
        count: usize,
    },
}
