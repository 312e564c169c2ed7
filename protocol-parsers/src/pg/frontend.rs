//! Client-to-server messages.

use std::fmt;

use super::framing::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3, SSL_REQUEST_CODE};
use super::reader::Reader;
use super::{Frame, FrameKind, MessageError, Text};

/// A message sent by the client, borrowing its frame's body.
///
/// Secrets (passwords, SASL payloads, cancel keys) are never exposed and never
/// printed by `Debug`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    /// `SSLRequest`: the client asks to switch to TLS.
    SslRequest,
    /// `GSSENCRequest`: the client asks for GSSAPI encryption.
    GssEncRequest,
    /// `CancelRequest` for the given backend process (the secret key is not kept).
    CancelRequest {
        /// The backend process id to cancel.
        process_id: i32,
    },
    /// `StartupMessage`: protocol version and connection parameters.
    Startup(StartupMessage<'a>),
    /// `Query`: a simple-protocol query string (possibly several statements).
    Query {
        /// The SQL text.
        sql: Text<'a>,
    },
    /// `Parse`: prepare a statement.
    Parse {
        /// The statement name (empty for the unnamed statement).
        statement: Text<'a>,
        /// The SQL text.
        sql: Text<'a>,
        /// The parameter type OIDs the client specified (0 = unspecified).
        param_types: Oids<'a>,
    },
    /// `Bind`: bind parameters to a statement, creating a portal.
    Bind(Bind<'a>),
    /// `Describe` a statement or a portal.
    Describe {
        /// Statement or portal.
        target: CloseTarget,
        /// Its name (empty for the unnamed one).
        name: Text<'a>,
    },
    /// `Execute` a portal.
    Execute {
        /// The portal name (empty for the unnamed portal).
        portal: Text<'a>,
        /// Row limit, 0 for no limit.
        max_rows: i32,
    },
    /// `Sync`: end of an extended-protocol batch.
    Sync,
    /// `Flush`: ask the server to send what it has.
    Flush,
    /// `Close` a statement or a portal.
    Close {
        /// Statement or portal.
        target: CloseTarget,
        /// Its name (empty for the unnamed one).
        name: Text<'a>,
    },
    /// `CopyData` sent to the server (`COPY ... FROM STDIN`).
    CopyData {
        /// The data.
        data: &'a [u8],
    },
    /// `CopyDone`.
    CopyDone,
    /// `CopyFail` with the client's reason.
    CopyFail {
        /// The reason.
        message: Text<'a>,
    },
    /// A `p` message: `PasswordMessage`, `SASLInitialResponse`, `SASLResponse`
    /// or `GSSResponse`; which one depends on the authentication exchange.
    AuthResponse(AuthResponse<'a>),
    /// `FunctionCall` (legacy fast-path function call).
    FunctionCall {
        /// OID of the function.
        function_oid: u32,
    },
    /// `Terminate`.
    Terminate,
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
        /// The tag (`0` for a startup packet).
        tag: u8,
        /// Body length.
        len: u32,
        /// What is wrong.
        error: MessageError,
    },
}

/// Whether `Describe` or `Close` targets a prepared statement or a portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseTarget {
    /// `S`: a prepared statement.
    Statement,
    /// `P`: a portal.
    Portal,
}

impl<'a> FrontendMessage<'a> {
    /// Parses a frame from a [`FrontendDecoder`](super::FrontendDecoder). Never fails:
    /// bad bodies become [`FrontendMessage::Malformed`].
    pub fn parse(frame: &Frame<'a>) -> FrontendMessage<'a> {
        let tag = frame.kind.tag();
        let Some(body) = frame.body else {
            return FrontendMessage::Oversized {
                tag,
                len: frame.len,
            };
        };
        let parsed = match frame.kind {
            FrameKind::Startup => parse_startup(body),
            FrameKind::Typed(t) => parse_typed(t, body),
            FrameKind::EncryptionResponse(t) => Ok(FrontendMessage::Unknown { tag: t, len: 0 }),
        };
        parsed.unwrap_or_else(|error| FrontendMessage::Malformed {
            tag,
            len: frame.len,
            error,
        })
    }

    /// The tag byte of this message (`0` for startup-phase packets).
    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::SslRequest
            | FrontendMessage::GssEncRequest
            | FrontendMessage::CancelRequest { .. }
            | FrontendMessage::Startup(_) => 0,
            FrontendMessage::Query { .. } => b'Q',
            FrontendMessage::Parse { .. } => b'P',
            FrontendMessage::Bind(_) => b'B',
            FrontendMessage::Describe { .. } => b'D',
            FrontendMessage::Execute { .. } => b'E',
            FrontendMessage::Sync => b'S',
            FrontendMessage::Flush => b'H',
            FrontendMessage::Close { .. } => b'C',
            FrontendMessage::CopyData { .. } => b'd',
            FrontendMessage::CopyDone => b'c',
            FrontendMessage::CopyFail { .. } => b'f',
            FrontendMessage::AuthResponse(_) => b'p',
            FrontendMessage::FunctionCall { .. } => b'F',
            FrontendMessage::Terminate => b'X',
            FrontendMessage::Oversized { tag, .. }
            | FrontendMessage::Unknown { tag, .. }
            | FrontendMessage::Malformed { tag, .. } => *tag,
        }
    }
}

fn parse_startup(body: &[u8]) -> Result<FrontendMessage<'_>, MessageError> {
    let mut r = Reader::new(0, body);
    let code = r.u32("request code")?;
    match code {
        SSL_REQUEST_CODE => {
            r.finish()?;
            Ok(FrontendMessage::SslRequest)
        }
        GSSENC_REQUEST_CODE => {
            r.finish()?;
            Ok(FrontendMessage::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => {
            let process_id = r.i32("process id")?;
            // The secret key (4 bytes; longer from protocol 3.2) is not kept.
            if r.is_empty() {
                return Err(r.truncated("secret key"));
            }
            Ok(FrontendMessage::CancelRequest { process_id })
        }
        c if c >> 16 == PROTOCOL_3 => {
            let params = r.remaining();
            // Validate: NUL-terminated name/value pairs ending with an empty name.
            let mut it = StartupParams { r, done: false };
            for p in &mut it {
                p?;
            }
            Ok(FrontendMessage::Startup(StartupMessage {
                major: (c >> 16) as u16,
                minor: (c & 0xffff) as u16,
                params,
            }))
        }
        c => Err(r.invalid("request code", i64::from(c))),
    }
}

fn parse_typed(tag: u8, body: &[u8]) -> Result<FrontendMessage<'_>, MessageError> {
    let mut r = Reader::new(tag, body);
    let msg = match tag {
        b'Q' => FrontendMessage::Query {
            sql: r.cstr("query")?,
        },
        b'P' => {
            let statement = r.cstr("statement name")?;
            let sql = r.cstr("query")?;
            let n = r.count("parameter type count")?;
            let oids = r.bytes(usize::from(n) * 4, "parameter types")?;
            FrontendMessage::Parse {
                statement,
                sql,
                param_types: Oids(oids),
            }
        }
        b'B' => FrontendMessage::Bind(parse_bind(&mut r)?),
        b'D' | b'C' => {
            let target = match r.u8("target")? {
                b'S' => CloseTarget::Statement,
                b'P' => CloseTarget::Portal,
                other => return Err(r.invalid("target", i64::from(other))),
            };
            let name = r.cstr("name")?;
            if tag == b'D' {
                FrontendMessage::Describe { target, name }
            } else {
                FrontendMessage::Close { target, name }
            }
        }
        b'E' => FrontendMessage::Execute {
            portal: r.cstr("portal name")?,
            max_rows: r.i32("max rows")?,
        },
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'X' => FrontendMessage::Terminate,
        b'c' => FrontendMessage::CopyDone,
        b'd' => {
            return Ok(FrontendMessage::CopyData { data: body });
        }
        b'f' => FrontendMessage::CopyFail {
            message: r.cstr("message")?,
        },
        b'p' => {
            return Ok(FrontendMessage::AuthResponse(AuthResponse { body }));
        }
        b'F' => {
            let function_oid = r.u32("function oid")?;
            // Argument formats, arguments and result format are not inspected.
            return Ok(FrontendMessage::FunctionCall { function_oid });
        }
        t => {
            return Ok(FrontendMessage::Unknown {
                tag: t,
                len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            });
        }
    };
    r.finish()?;
    Ok(msg)
}

fn parse_bind<'a>(r: &mut Reader<'a>) -> Result<Bind<'a>, MessageError> {
    let portal = r.cstr("portal name")?;
    let statement = r.cstr("statement name")?;
    let nf = r.count("parameter format count")?;
    let param_formats = FormatCodes(r.bytes(usize::from(nf) * 2, "parameter formats")?);
    let params_start = r.remaining();
    let np = r.count("parameter count")?;
    for _ in 0..np {
        r.value("parameter value")?;
    }
    let consumed = params_start.len() - r.remaining().len();
    let params = BindValues {
        count: np,
        body: params_start.get(2..consumed).unwrap_or_default(),
    };
    let nr = r.count("result format count")?;
    let result_formats = FormatCodes(r.bytes(usize::from(nr) * 2, "result formats")?);
    Ok(Bind {
        portal,
        statement,
        param_formats,
        params,
        result_formats,
    })
}

/// A `StartupMessage`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    /// Major protocol version (3).
    pub major: u16,
    /// Minor protocol version (0; 2 from PostgreSQL 18).
    pub minor: u16,
    params: &'a [u8],
}

impl<'a> StartupMessage<'a> {
    /// The name/value parameters, in order.
    pub fn params(&self) -> StartupParams<'a> {
        StartupParams {
            r: Reader::new(0, self.params),
            done: false,
        }
    }

    /// The value of one parameter.
    pub fn param(&self, name: &str) -> Option<Text<'a>> {
        self.params()
            .filter_map(Result::ok)
            .find(|(n, _)| n.as_bytes() == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The `user` parameter.
    pub fn user(&self) -> Option<Text<'a>> {
        self.param("user")
    }

    /// The `database` parameter (PostgreSQL defaults it to the user name).
    pub fn database(&self) -> Option<Text<'a>> {
        self.param("database")
    }

    /// The `application_name` parameter.
    pub fn application_name(&self) -> Option<Text<'a>> {
        self.param("application_name")
    }
}

impl fmt::Debug for StartupMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartupMessage")
            .field("major", &self.major)
            .field("minor", &self.minor)
            .field(
                "params",
                &self.params().filter_map(Result::ok).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Iterator over a `StartupMessage`'s parameters.
#[derive(Clone, Debug)]
pub struct StartupParams<'a> {
    r: Reader<'a>,
    done: bool,
}

impl<'a> Iterator for StartupParams<'a> {
    type Item = Result<(Text<'a>, Text<'a>), MessageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let res = (|| {
            let name = self.r.cstr("parameter name")?;
            if name.is_empty() {
                self.r.finish()?;
                return Ok(None);
            }
            let value = self.r.cstr("parameter value")?;
            Ok(Some((name, value)))
        })();
        match res {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// A `Bind` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    /// The destination portal (empty for the unnamed portal).
    pub portal: Text<'a>,
    /// The source statement (empty for the unnamed statement).
    pub statement: Text<'a>,
    /// Parameter format codes (0 text, 1 binary).
    pub param_formats: FormatCodes<'a>,
    /// The parameter values (a borrowed view, never copied).
    pub params: BindValues<'a>,
    /// Result column format codes.
    pub result_formats: FormatCodes<'a>,
}

/// A list of 16-bit format codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatCodes<'a>(&'a [u8]);

impl FormatCodes<'_> {
    /// How many codes.
    pub fn len(&self) -> usize {
        self.0.len() / 2
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The codes.
    pub fn iter(&self) -> impl Iterator<Item = i16> + '_ {
        self.0
            .chunks_exact(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
    }
}

/// A list of type OIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oids<'a>(pub(crate) &'a [u8]);

impl Oids<'_> {
    /// How many OIDs.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The OIDs.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// The parameter values of a `Bind`, borrowed (validated when parsed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BindValues<'a> {
    count: u16,
    body: &'a [u8],
}

impl<'a> BindValues<'a> {
    /// How many parameters.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The values; `None` is SQL NULL.
    pub fn iter(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        let mut r = Reader::new(b'B', self.body);
        (0..self.count).map_while(move |_| r.value("parameter value").ok())
    }
}

impl fmt::Debug for BindValues<'_> {
    /// Prints lengths only: parameter values may carry personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|v| v.map(<[u8]>::len)))
            .finish()
    }
}

/// A `p` message from the client. Its content is a secret or part of an
/// authentication exchange: only the SASL mechanism name is readable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AuthResponse<'a> {
    body: &'a [u8],
}

impl<'a> AuthResponse<'a> {
    /// Body length.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Reads the message as a `SASLInitialResponse` and returns the chosen
    /// mechanism (e.g. `SCRAM-SHA-256`). Only meaningful right after the
    /// server asked for SASL authentication.
    pub fn sasl_mechanism(&self) -> Result<Text<'a>, MessageError> {
        let mut r = Reader::new(b'p', self.body);
        let mechanism = r.cstr("mechanism")?;
        r.value("initial response")?;
        r.finish()?;
        Ok(mechanism)
    }
}

impl fmt::Debug for AuthResponse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthResponse")
            .field("len", &self.body.len())
            .finish_non_exhaustive()
    }
}
