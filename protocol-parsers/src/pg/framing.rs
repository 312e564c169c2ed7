//! Cutting a byte stream into frames, incrementally and without copying.

use super::{DecodeError, Limits, MAX_STARTUP_LEN};

/// Request code of `SSLRequest`.
pub(crate) const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of `GSSENCRequest`.
pub(crate) const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of `CancelRequest`.
pub(crate) const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Major protocol version 3, as the high half of a startup code.
pub(crate) const PROTOCOL_3: u32 = 3;

/// What kind of frame this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// An untagged startup-phase packet from the client (`StartupMessage`,
    /// `SSLRequest`, `GSSENCRequest`, `CancelRequest`); the body starts with
    /// the 4-byte request code.
    Startup,
    /// A regular message with its one-byte tag.
    Typed(u8),
    /// The server's single-byte answer to `SSLRequest` (`S` or `N`) or to
    /// `GSSENCRequest` (`G` or `N`).
    EncryptionResponse(u8),
}

impl FrameKind {
    /// The tag byte (`0` for a startup packet).
    pub fn tag(self) -> u8 {
        match self {
            FrameKind::Startup => 0,
            FrameKind::Typed(t) | FrameKind::EncryptionResponse(t) => t,
        }
    }
}

/// One message's boundaries in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What kind of frame.
    pub kind: FrameKind,
    /// Length of the body: the length field minus 4 (0 for an encryption response).
    pub len: u32,
    /// The body, or `None` when it is longer than [`Limits::max_buffered_len`]
    /// and was skipped.
    pub body: Option<&'a [u8]>,
}

/// Which encryption the client asked for before startup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncryptionKind {
    /// `SSLRequest`: the server answers `S` or `N`.
    Ssl,
    /// `GSSENCRequest`: the server answers `G` or `N`.
    Gss,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Untagged packets (client side, before `StartupMessage`).
    Startup,
    /// Tagged messages.
    Typed,
    /// The next byte may be a one-byte answer to an encryption request.
    EncryptionAnswer(EncryptionKind),
    /// The stream is encrypted (or otherwise not ours to read): ignore it.
    Passthrough,
}

#[derive(Clone, Copy, Debug)]
struct InProgress {
    kind: FrameKind,
    len: u32,
    remaining: u32,
    skip: bool,
}

/// The direction-independent framing state machine.
#[derive(Debug)]
struct Framer {
    limits: Limits,
    mode: Mode,
    header: [u8; 5],
    header_len: u8,
    current: Option<InProgress>,
    buf: Vec<u8>,
    failed: bool,
    /// Set when a startup packet asked for encryption; cleared by `take_encryption_request`.
    encryption_request: Option<EncryptionKind>,
}

/// Keep at most this much buffer capacity between messages.
const RETAINED_CAPACITY: usize = 64 * 1024;

impl Framer {
    fn new(limits: Limits, mode: Mode) -> Self {
        Self {
            limits,
            mode,
            header: [0; 5],
            header_len: 0,
            current: None,
            buf: Vec::new(),
            failed: false,
            encryption_request: None,
        }
    }

    fn fail(&mut self, e: DecodeError) -> Result<(), DecodeError> {
        self.failed = true;
        self.current = None;
        self.buf = Vec::new();
        Err(e)
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.current.is_none()
    }

    /// Checks a complete startup packet before it is emitted and updates the mode.
    fn after_startup(&mut self, body: &[u8]) -> Result<(), DecodeError> {
        let code = match body {
            [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => return Err(DecodeError::StartupLength { len: 4 }),
        };
        match code {
            SSL_REQUEST_CODE => self.encryption_request = Some(EncryptionKind::Ssl),
            GSSENC_REQUEST_CODE => self.encryption_request = Some(EncryptionKind::Gss),
            CANCEL_REQUEST_CODE => {}
            c if c >> 16 == PROTOCOL_3 => self.mode = Mode::Typed,
            c => return Err(DecodeError::UnsupportedRequest { code: c }),
        }
        Ok(())
    }

    /// Reads a header; returns `(kind, body_len)`.
    fn parse_header(&self, h: &[u8]) -> Result<(FrameKind, u32), DecodeError> {
        match self.mode {
            Mode::Startup => {
                let len = i32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                match u32::try_from(len) {
                    Ok(l) if (8..=MAX_STARTUP_LEN).contains(&l) => Ok((FrameKind::Startup, l - 4)),
                    _ => Err(DecodeError::StartupLength { len }),
                }
            }
            _ => {
                let tag = h[0];
                let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                if len < 4 {
                    return Err(DecodeError::LengthTooShort {
                        tag: char::from(tag),
                        len,
                    });
                }
                let len = len.unsigned_abs();
                if len > self.limits.max_message_len {
                    return Err(DecodeError::LengthTooLong {
                        tag: char::from(tag),
                        len,
                        max: self.limits.max_message_len,
                    });
                }
                Ok((FrameKind::Typed(tag), len - 4))
            }
        }
    }

    fn header_size(&self) -> usize {
        if self.mode == Mode::Startup { 4 } else { 5 }
    }

    fn emit_owned<F: FnMut(Frame<'_>)>(
        &mut self,
        cur: InProgress,
        f: &mut F,
    ) -> Result<(), DecodeError> {
        let mut body = std::mem::take(&mut self.buf);
        if cur.kind == FrameKind::Startup
            && let Err(e) = self.after_startup(&body)
        {
            return self.fail(e);
        }
        f(Frame {
            kind: cur.kind,
            len: cur.len,
            body: Some(&body),
        });
        body.clear();
        if body.capacity() > RETAINED_CAPACITY {
            body = Vec::new();
        }
        self.buf = body;
        Ok(())
    }

    #[inline]
    fn feed<F: FnMut(Frame<'_>)>(&mut self, data: &[u8], f: &mut F) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let mut pos = 0usize;
        // Finish a message begun in an earlier chunk.
        if let Some(mut cur) = self.current.take() {
            let take = data.len().min(cur.remaining as usize);
            if !cur.skip {
                self.buf.extend_from_slice(&data[..take]);
            }
            pos = take;
            cur.remaining -= take as u32;
            if cur.remaining > 0 {
                self.current = Some(cur);
                return Ok(());
            }
            if !cur.skip {
                self.emit_owned(cur, f)?;
            }
        }
        loop {
            let rest = &data[pos..];
            match self.mode {
                Mode::Passthrough => return Ok(()),
                Mode::EncryptionAnswer(kind) => {
                    let Some(&b) = rest.first() else {
                        return Ok(());
                    };
                    let accepted = match (kind, b) {
                        (EncryptionKind::Ssl, b'S') | (EncryptionKind::Gss, b'G') => true,
                        (_, b'N') => false,
                        _ => {
                            // Not an answer (an old server's ErrorResponse): a regular message.
                            self.mode = Mode::Typed;
                            continue;
                        }
                    };
                    pos += 1;
                    self.mode = if accepted {
                        Mode::Passthrough
                    } else {
                        Mode::Typed
                    };
                    f(Frame {
                        kind: FrameKind::EncryptionResponse(b),
                        len: 0,
                        body: Some(&[]),
                    });
                    continue;
                }
                Mode::Startup | Mode::Typed => {}
            }
            let hsize = self.header_size();
            let (kind, body_len) = if self.header_len == 0 && rest.len() >= hsize {
                pos += hsize;
                match self.parse_header(rest) {
                    Ok(h) => h,
                    Err(e) => return self.fail(e),
                }
            } else {
                let have = usize::from(self.header_len);
                let need = hsize - have;
                let take = need.min(rest.len());
                self.header[have..have + take].copy_from_slice(&rest[..take]);
                pos += take;
                self.header_len += take as u8;
                if take < need {
                    return Ok(());
                }
                self.header_len = 0;
                let header = self.header;
                match self.parse_header(&header[..hsize]) {
                    Ok(h) => h,
                    Err(e) => return self.fail(e),
                }
            };
            let rest = &data[pos..];
            if body_len > self.limits.max_buffered_len && kind != FrameKind::Startup {
                f(Frame {
                    kind,
                    len: body_len,
                    body: None,
                });
                let take = rest.len().min(body_len as usize);
                pos += take;
                if take < body_len as usize {
                    self.current = Some(InProgress {
                        kind,
                        len: body_len,
                        remaining: body_len - take as u32,
                        skip: true,
                    });
                    return Ok(());
                }
                continue;
            }
            let n = body_len as usize;
            if rest.len() >= n {
                let body = &rest[..n];
                pos += n;
                if kind == FrameKind::Startup
                    && let Err(e) = self.after_startup(body)
                {
                    return self.fail(e);
                }
                f(Frame {
                    kind,
                    len: body_len,
                    body: Some(body),
                });
            } else {
                self.buf.extend_from_slice(rest);
                self.current = Some(InProgress {
                    kind,
                    len: body_len,
                    remaining: body_len - rest.len() as u32,
                    skip: false,
                });
                return Ok(());
            }
        }
    }
}

/// Decodes the client-to-server stream: startup-phase packets, then tagged messages.
#[derive(Debug)]
pub struct FrontendDecoder {
    framer: Framer,
}

impl Default for FrontendDecoder {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl FrontendDecoder {
    /// A decoder at the start of a connection.
    pub fn new(limits: Limits) -> Self {
        Self {
            framer: Framer::new(limits, Mode::Startup),
        }
    }

    /// Feeds the next chunk of client bytes; calls `on_frame` for each frame
    /// completed by it, in order.
    ///
    /// After an error the decoder is failed: every later call returns
    /// [`DecodeError::Failed`] and emits nothing.
    pub fn feed<F: FnMut(Frame<'_>)>(
        &mut self,
        data: &[u8],
        mut on_frame: F,
    ) -> Result<(), DecodeError> {
        self.framer.feed(data, &mut on_frame)
    }

    /// If the last startup packet was an `SSLRequest` or `GSSENCRequest`,
    /// returns its kind once (so the caller can tell the [`BackendDecoder`]).
    pub fn take_encryption_request(&mut self) -> Option<EncryptionKind> {
        self.framer.encryption_request.take()
    }

    /// The server accepted encryption: the rest of the client stream is TLS or
    /// GSSAPI and is ignored.
    pub fn encryption_accepted(&mut self) {
        self.framer.mode = Mode::Passthrough;
        self.framer.current = None;
        self.framer.header_len = 0;
    }

    /// Whether the decoder is still in the startup phase (before `StartupMessage`).
    pub fn in_startup(&self) -> bool {
        self.framer.mode == Mode::Startup
    }

    /// Whether the decoder ignores the stream because it is encrypted.
    pub fn is_passthrough(&self) -> bool {
        self.framer.mode == Mode::Passthrough
    }

    /// Whether a framing error stopped the decoder.
    pub fn is_failed(&self) -> bool {
        self.framer.failed
    }

    /// Whether the decoder sits between two messages (nothing partial buffered).
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }
}

/// Decodes the server-to-client stream: tagged messages, plus the one-byte
/// answer to an encryption request when told to expect it.
#[derive(Debug)]
pub struct BackendDecoder {
    framer: Framer,
}

impl Default for BackendDecoder {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl BackendDecoder {
    /// A decoder at the start of a connection.
    pub fn new(limits: Limits) -> Self {
        Self {
            framer: Framer::new(limits, Mode::Typed),
        }
    }

    /// Feeds the next chunk of server bytes; calls `on_frame` for each frame
    /// completed by it, in order.
    ///
    /// After an error the decoder is failed: every later call returns
    /// [`DecodeError::Failed`] and emits nothing.
    pub fn feed<F: FnMut(Frame<'_>)>(
        &mut self,
        data: &[u8],
        mut on_frame: F,
    ) -> Result<(), DecodeError> {
        self.framer.feed(data, &mut on_frame)
    }

    /// The client sent an `SSLRequest` or `GSSENCRequest`: the next server byte
    /// is a one-byte answer. On `S`/`G` the decoder then ignores the
    /// (encrypted) rest of the stream; on `N` it continues with messages.
    ///
    /// Returns false (and changes nothing) when the decoder is in the middle
    /// of a message, failed or already ignoring the stream.
    pub fn expect_encryption_response(&mut self, kind: EncryptionKind) -> bool {
        if self.framer.failed || !self.framer.at_boundary() || self.framer.mode != Mode::Typed {
            return false;
        }
        self.framer.mode = Mode::EncryptionAnswer(kind);
        true
    }

    /// Whether the decoder ignores the stream because it is encrypted.
    pub fn is_passthrough(&self) -> bool {
        self.framer.mode == Mode::Passthrough
    }

    /// Whether a framing error stopped the decoder.
    pub fn is_failed(&self) -> bool {
        self.framer.failed
    }

    /// Whether the decoder sits between two messages (nothing partial buffered).
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }
}
