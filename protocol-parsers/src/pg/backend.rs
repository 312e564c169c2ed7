//! Server-to-client messages.

use std::fmt;

use super::reader::Reader;
use super::{Frame, FrameKind, MessageError, Oids, Text};

/// A message sent by the server, borrowing its frame's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    /// The one-byte answer to `SSLRequest` / `GSSENCRequest`.
    EncryptionResponse {
        /// Whether the server agreed (`S` or `G`) rather than refused (`N`).
        accepted: bool,
    },
    /// An `Authentication*` message.
    Authentication(Authentication<'a>),
    /// `BackendKeyData`: the process id (the cancel secret is not kept).
    BackendKeyData {
        /// The backend process id.
        process_id: i32,
    },
    /// `ParameterStatus`: a run-time parameter's current value.
    ParameterStatus {
        /// Parameter name.
        name: Text<'a>,
        /// Its value.
        value: Text<'a>,
    },
    /// `ReadyForQuery` with the transaction status.
    ReadyForQuery {
        /// The transaction status.
        status: TransactionStatus,
    },
    /// `RowDescription`: the columns of the rows that follow.
    RowDescription(RowDescription<'a>),
    /// `DataRow`: one result row.
    DataRow(DataRow<'a>),
    /// `CommandComplete` with its command tag.
    CommandComplete(CommandComplete<'a>),
    /// `EmptyQueryResponse`: the query string was empty.
    EmptyQueryResponse,
    /// `ErrorResponse`.
    ErrorResponse(ErrorFields<'a>),
    /// `NoticeResponse`.
    NoticeResponse(ErrorFields<'a>),
    /// `ParseComplete`.
    ParseComplete,
    /// `BindComplete`.
    BindComplete,
    /// `CloseComplete`.
    CloseComplete,
    /// `NoData`: the described statement or portal returns no rows.
    NoData,
    /// `ParameterDescription`: the parameter types of a described statement.
    ParameterDescription(Oids<'a>),
    /// `PortalSuspended`: an `Execute` row limit was reached.
    PortalSuspended,
    /// `CopyInResponse`: the server waits for `COPY ... FROM STDIN` data.
    CopyInResponse(CopyResponse<'a>),
    /// `CopyOutResponse`: `COPY ... TO STDOUT` data follows.
    CopyOutResponse(CopyResponse<'a>),
    /// `CopyBothResponse` (replication).
    CopyBothResponse(CopyResponse<'a>),
    /// `CopyData` sent by the server.
    CopyData {
        /// The data.
        data: &'a [u8],
    },
    /// `CopyDone`.
    CopyDone,
    /// `NotificationResponse` (`LISTEN`/`NOTIFY`).
    NotificationResponse {
        /// The notifying backend's process id.
        process_id: i32,
        /// The channel.
        channel: Text<'a>,
        /// The payload.
        payload: Text<'a>,
    },
    /// `NegotiateProtocolVersion`.
    NegotiateProtocolVersion {
        /// Newest minor protocol version the server supports.
        newest_minor: i32,
        /// How many protocol options it did not recognize.
        unrecognized: u32,
    },
    /// `FunctionCallResponse`.
    FunctionCallResponse {
        /// The result; `None` is NULL.
        value: Option<&'a [u8]>,
    },
    /// A message too long to materialize; only its tag and length are known.
    Oversized {
        /// The tag.
        tag: u8,
        /// Body length.
        len: u32,
    },
    /// A message with a tag this decoder does not know.
    Unknown {
        /// The tag.
        tag: u8,
        /// Body length.
        len: u32,
    },
    /// A message whose body does not match its tag's layout.
    Malformed {
        /// The tag.
        tag: u8,
        /// Body length.
        len: u32,
        /// What is wrong.
        error: MessageError,
    },
}

impl<'a> BackendMessage<'a> {
    /// Parses a frame from a [`BackendDecoder`](super::BackendDecoder). Never
    /// fails: bad bodies become [`BackendMessage::Malformed`].
    #[inline]
    pub fn parse(frame: &Frame<'a>) -> BackendMessage<'a> {
        let tag = frame.kind.tag();
        let Some(body) = frame.body else {
            return BackendMessage::Oversized {
                tag,
                len: frame.len,
            };
        };
        match frame.kind {
            FrameKind::EncryptionResponse(b) => BackendMessage::EncryptionResponse {
                accepted: b != b'N',
            },
            FrameKind::Typed(b'D') => match DataRow::new(body) {
                Some(row) => BackendMessage::DataRow(row),
                None => BackendMessage::Malformed {
                    tag,
                    len: frame.len,
                    error: MessageError::Truncated {
                        tag: 'D',
                        field: "column count",
                    },
                },
            },
            FrameKind::Typed(t) => {
                parse_typed(t, body).unwrap_or_else(|error| BackendMessage::Malformed {
                    tag,
                    len: frame.len,
                    error,
                })
            }
            FrameKind::Startup => BackendMessage::Unknown {
                tag: 0,
                len: frame.len,
            },
        }
    }

    /// The tag byte of this message (`0` for an encryption response).
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::EncryptionResponse { .. } => 0,
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::ReadyForQuery { .. } => b'Z',
            BackendMessage::RowDescription(_) => b'T',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::CommandComplete(_) => b'C',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::ParseComplete => b'1',
            BackendMessage::BindComplete => b'2',
            BackendMessage::CloseComplete => b'3',
            BackendMessage::NoData => b'n',
            BackendMessage::ParameterDescription(_) => b't',
            BackendMessage::PortalSuspended => b's',
            BackendMessage::CopyInResponse(_) => b'G',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::CopyData { .. } => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::NotificationResponse { .. } => b'A',
            BackendMessage::NegotiateProtocolVersion { .. } => b'v',
            BackendMessage::FunctionCallResponse { .. } => b'V',
            BackendMessage::Oversized { tag, .. }
            | BackendMessage::Unknown { tag, .. }
            | BackendMessage::Malformed { tag, .. } => *tag,
        }
    }
}

fn parse_typed(tag: u8, body: &[u8]) -> Result<BackendMessage<'_>, MessageError> {
    let mut r = Reader::new(tag, body);
    let msg = match tag {
        b'R' => BackendMessage::Authentication(parse_auth(&mut r)?),
        b'K' => {
            let process_id = r.i32("process id")?;
            if r.is_empty() {
                return Err(r.truncated("secret key"));
            }
            // The secret key (4 bytes; up to 256 from protocol 3.2) is not kept.
            return Ok(BackendMessage::BackendKeyData { process_id });
        }
        b'S' => BackendMessage::ParameterStatus {
            name: r.cstr("name")?,
            value: r.cstr("value")?,
        },
        b'Z' => BackendMessage::ReadyForQuery {
            status: TransactionStatus::from_byte(r.u8("status")?),
        },
        b'T' => {
            let count = r.count("field count")?;
            let fields = r.remaining();
            let mut it = FieldIter {
                r: Reader::new(b'T', fields),
                left: count,
            };
            for f in &mut it {
                f?;
            }
            it.r.finish()?;
            return Ok(BackendMessage::RowDescription(RowDescription {
                count,
                fields,
            }));
        }
        b'C' => BackendMessage::CommandComplete(CommandComplete {
            tag: r.cstr("command tag")?,
        }),
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' | b'N' => {
            let fields = ErrorFields::parse(tag, body)?;
            return Ok(if tag == b'E' {
                BackendMessage::ErrorResponse(fields)
            } else {
                BackendMessage::NoticeResponse(fields)
            });
        }
        b'1' => BackendMessage::ParseComplete,
        b'2' => BackendMessage::BindComplete,
        b'3' => BackendMessage::CloseComplete,
        b'n' => BackendMessage::NoData,
        b't' => {
            let n = r.count("parameter count")?;
            BackendMessage::ParameterDescription(Oids(
                r.bytes(usize::from(n) * 4, "parameter types")?,
            ))
        }
        b's' => BackendMessage::PortalSuspended,
        b'G' | b'H' | b'W' => {
            let format = r.u8("format")?;
            let n = r.count("column count")?;
            let formats = r.bytes(usize::from(n) * 2, "column formats")?;
            let c = CopyResponse {
                format,
                columns: n,
                formats,
            };
            match tag {
                b'G' => BackendMessage::CopyInResponse(c),
                b'H' => BackendMessage::CopyOutResponse(c),
                _ => BackendMessage::CopyBothResponse(c),
            }
        }
        b'd' => return Ok(BackendMessage::CopyData { data: body }),
        b'c' => BackendMessage::CopyDone,
        b'A' => BackendMessage::NotificationResponse {
            process_id: r.i32("process id")?,
            channel: r.cstr("channel")?,
            payload: r.cstr("payload")?,
        },
        b'v' => {
            let newest_minor = r.i32("newest minor version")?;
            let n = r.i32("option count")?;
            let unrecognized =
                u32::try_from(n).map_err(|_| r.invalid("option count", i64::from(n)))?;
            for _ in 0..unrecognized {
                r.cstr("option name")?;
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        b'V' => BackendMessage::FunctionCallResponse {
            value: r.value("result")?,
        },
        t => {
            return Ok(BackendMessage::Unknown {
                tag: t,
                len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            });
        }
    };
    r.finish()?;
    Ok(msg)
}

fn parse_auth<'a>(r: &mut Reader<'a>) -> Result<Authentication<'a>, MessageError> {
    let code = r.i32("authentication code")?;
    let a = match code {
        0 => Authentication::Ok,
        2 => Authentication::KerberosV5,
        3 => Authentication::CleartextPassword,
        5 => {
            r.bytes(4, "salt")?;
            Authentication::Md5Password
        }
        7 => Authentication::Gss,
        8 => {
            r.bytes(r.remaining().len(), "data")?;
            Authentication::GssContinue
        }
        9 => Authentication::Sspi,
        10 => {
            let list = r.remaining();
            let mut it = SaslMechanisms {
                r: Reader::new(b'R', list),
            };
            for m in &mut it {
                m?;
            }
            it.r.finish()?;
            *r = it.r;
            Authentication::Sasl(SaslMechanisms {
                r: Reader::new(b'R', list),
            })
        }
        11 => {
            r.bytes(r.remaining().len(), "data")?;
            Authentication::SaslContinue
        }
        12 => {
            r.bytes(r.remaining().len(), "data")?;
            Authentication::SaslFinal
        }
        c => {
            r.bytes(r.remaining().len(), "data")?;
            Authentication::Other(c)
        }
    };
    Ok(a)
}

/// An `Authentication*` request or result. Exchange payloads (salts, SASL
/// challenges) are not exposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// `AuthenticationOk`.
    Ok,
    /// `AuthenticationKerberosV5` (obsolete).
    KerberosV5,
    /// `AuthenticationCleartextPassword`.
    CleartextPassword,
    /// `AuthenticationMD5Password`.
    Md5Password,
    /// `AuthenticationGSS`.
    Gss,
    /// `AuthenticationGSSContinue`.
    GssContinue,
    /// `AuthenticationSSPI`.
    Sspi,
    /// `AuthenticationSASL` with the mechanisms the server offers.
    Sasl(SaslMechanisms<'a>),
    /// `AuthenticationSASLContinue`.
    SaslContinue,
    /// `AuthenticationSASLFinal`.
    SaslFinal,
    /// Another authentication code.
    Other(i32),
}

/// The mechanism names of `AuthenticationSASL`.
#[derive(Clone, Copy)]
pub struct SaslMechanisms<'a> {
    r: Reader<'a>,
}

impl PartialEq for SaslMechanisms<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.r.remaining() == other.r.remaining()
    }
}

impl Eq for SaslMechanisms<'_> {}

impl fmt::Debug for SaslMechanisms<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.filter_map(Result::ok)).finish()
    }
}

impl<'a> Iterator for SaslMechanisms<'a> {
    type Item = Result<Text<'a>, MessageError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.r.cstr("mechanism") {
            Ok(m) if m.is_empty() => None,
            Ok(m) => Some(Ok(m)),
            Err(e) => {
                self.r = Reader::new(b'R', &[]);
                Some(Err(e))
            }
        }
    }
}

/// `ReadyForQuery`'s transaction status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
    /// Any other byte.
    Other(u8),
}

impl TransactionStatus {
    fn from_byte(b: u8) -> Self {
        match b {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InTransaction,
            b'E' => TransactionStatus::Failed,
            o => TransactionStatus::Other(o),
        }
    }
}

/// A `RowDescription` (validated when parsed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RowDescription<'a> {
    count: u16,
    fields: &'a [u8],
}

impl<'a> RowDescription<'a> {
    /// How many columns.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether there are no columns.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The column descriptions.
    pub fn fields(&self) -> FieldIter<'a> {
        FieldIter {
            r: Reader::new(b'T', self.fields),
            left: self.count,
        }
    }
}

impl fmt::Debug for RowDescription<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.fields().filter_map(Result::ok))
            .finish()
    }
}

/// One column of a `RowDescription`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    /// Column name (or alias).
    pub name: Text<'a>,
    /// OID of the source table, 0 if the column is not a plain table column.
    pub table_oid: u32,
    /// Attribute number of the column in that table, 0 if none.
    pub column_attr: i16,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// The type's size (`pg_type.typlen`), negative for variable width.
    pub type_size: i16,
    /// The type modifier (`pg_attribute.atttypmod`).
    pub type_modifier: i32,
    /// Format code: 0 text, 1 binary.
    pub format: i16,
}

/// Iterator over a `RowDescription`'s columns.
#[derive(Clone, Debug)]
pub struct FieldIter<'a> {
    r: Reader<'a>,
    left: u16,
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = Result<FieldDescription<'a>, MessageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = &mut self.r;
        let res = (|| {
            Ok(FieldDescription {
                name: r.cstr("field name")?,
                table_oid: r.u32("table oid")?,
                column_attr: r.i16("column attribute")?,
                type_oid: r.u32("type oid")?,
                type_size: r.i16("type size")?,
                type_modifier: r.i32("type modifier")?,
                format: r.i16("format")?,
            })
        })();
        if res.is_err() {
            self.left = 0;
        }
        Some(res)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(usize::from(self.left)))
    }
}

/// A `DataRow`: the column count is read eagerly, values lazily.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DataRow<'a> {
    count: u16,
    values: &'a [u8],
}

impl<'a> DataRow<'a> {
    #[inline]
    fn new(body: &'a [u8]) -> Option<Self> {
        match body {
            [a, b, values @ ..] => Some(Self {
                count: u16::from_be_bytes([*a, *b]),
                values,
            }),
            _ => None,
        }
    }

    /// The column count as sent.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The values, borrowed; `None` is NULL. A malformed row ends with an error.
    pub fn values(&self) -> DataRowValues<'a> {
        DataRowValues {
            r: Reader::new(b'D', self.values),
            left: self.count,
        }
    }

    /// The raw bytes after the column count.
    pub fn raw(&self) -> &'a [u8] {
        self.values
    }
}

impl fmt::Debug for DataRow<'_> {
    /// Prints value lengths only: values may carry personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.values().map(|v| v.map(|v| v.map(<[u8]>::len))))
            .finish()
    }
}

/// Iterator over a `DataRow`'s values.
#[derive(Clone, Debug)]
pub struct DataRowValues<'a> {
    r: Reader<'a>,
    left: u16,
}

impl<'a> Iterator for DataRowValues<'a> {
    type Item = Result<Option<&'a [u8]>, MessageError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let v = self.r.value("column value");
        if v.is_err() {
            self.left = 0;
        }
        Some(v)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(usize::from(self.left)))
    }
}

/// A `CommandComplete` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandComplete<'a> {
    /// The command tag as sent, e.g. `INSERT 0 2`, `SELECT 5`, `CREATE TABLE`.
    pub tag: Text<'a>,
}

impl<'a> CommandComplete<'a> {
    /// The tag split into command and row count.
    pub fn parsed(&self) -> CommandTag<'a> {
        CommandTag::parse(self.tag.to_str().unwrap_or(""))
    }
}

/// A command tag split into its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandTag<'a> {
    /// The command: `SELECT`, `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `COPY`,
    /// `FETCH`, `MOVE`, or the whole tag for commands without a count
    /// (`CREATE TABLE`, `BEGIN`, `DEALLOCATE ALL`).
    pub command: &'a str,
    /// The row count, for commands that report one.
    pub rows: Option<u64>,
    /// The OID field of `INSERT oid rows` (always 0 since PostgreSQL 12).
    pub oid: Option<u32>,
}

impl<'a> CommandTag<'a> {
    /// Splits a command tag.
    pub fn parse(tag: &'a str) -> Self {
        let whole = CommandTag {
            command: tag,
            rows: None,
            oid: None,
        };
        let mut parts = tag.split(' ');
        let Some(command) = parts.next() else {
            return whole;
        };
        let counted = matches!(
            command,
            "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE"
        );
        if !counted {
            return whole;
        }
        let a = parts.next();
        let b = parts.next();
        if parts.next().is_some() {
            return whole;
        }
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        match (command, a, b) {
            ("INSERT", Some(oid), Some(rows)) => match (num(oid), num(rows)) {
                (Some(oid), Some(rows)) => CommandTag {
                    command,
                    rows: Some(rows),
                    oid: u32::try_from(oid).ok(),
                },
                _ => whole,
            },
            (_, Some(rows), None) => match num(rows) {
                Some(rows) => CommandTag {
                    command,
                    rows: Some(rows),
                    oid: None,
                },
                None => whole,
            },
            _ => whole,
        }
    }
}

/// `CopyInResponse` / `CopyOutResponse` / `CopyBothResponse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyResponse<'a> {
    /// Overall format: 0 text, 1 binary.
    pub format: u8,
    /// Number of columns.
    pub columns: u16,
    formats: &'a [u8],
}

impl CopyResponse<'_> {
    /// Per-column format codes.
    pub fn column_formats(&self) -> impl Iterator<Item = i16> + '_ {
        self.formats
            .chunks_exact(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
    }
}

/// The fields of an `ErrorResponse` or `NoticeResponse` (validated when parsed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    body: &'a [u8],
}

/// One field of an `ErrorResponse` / `NoticeResponse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorField<'a> {
    /// The field code: `S` severity (localized), `V` severity, `C` SQLSTATE,
    /// `M` message, `D` detail, `H` hint, `P` position, ...
    pub code: u8,
    /// The value.
    pub value: Text<'a>,
}

impl<'a> ErrorFields<'a> {
    fn parse(tag: u8, body: &'a [u8]) -> Result<Self, MessageError> {
        let mut r = Reader::new(tag, body);
        loop {
            let code = r.u8("field code")?;
            if code == 0 {
                break;
            }
            r.cstr("field value")?;
        }
        r.finish()?;
        Ok(Self { body })
    }

    /// All fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = ErrorField<'a>> + 'a {
        let mut r = Reader::new(b'E', self.body);
        std::iter::from_fn(move || {
            let code = r.u8("field code").ok().filter(|&c| c != 0)?;
            let value = r.cstr("field value").ok()?;
            Some(ErrorField { code, value })
        })
    }

    /// The value of the field with this code.
    pub fn field(&self, code: u8) -> Option<Text<'a>> {
        self.iter().find(|f| f.code == code).map(|f| f.value)
    }

    /// The severity, not localized (`V`, since 9.6), else the localized one (`S`).
    pub fn severity(&self) -> Option<Text<'a>> {
        self.field(b'V').or_else(|| self.field(b'S'))
    }

    /// The SQLSTATE code (`C`).
    pub fn code(&self) -> Option<Text<'a>> {
        self.field(b'C')
    }

    /// The primary message (`M`).
    pub fn message(&self) -> Option<Text<'a>> {
        self.field(b'M')
    }
}

impl fmt::Debug for ErrorFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorFields")
            .field("severity", &self.severity())
            .field("code", &self.code())
            .field("message", &self.message())
            .finish()
    }
}
