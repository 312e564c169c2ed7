//! Both decoders and the session of one connection, wired together.

use super::{
    BackendDecoder, BackendMessage, DecodeError, FrontendDecoder, FrontendMessage, Limits,
    QueryEvent, Session, SessionLimits,
};

/// One client connection as the sidecar sees it: the client-to-server and
/// server-to-client decoders plus the [`Session`].
///
/// It also handles the encryption handshake: when the client sends
/// `SSLRequest` or `GSSENCRequest`, the server decoder is told to expect the
/// one-byte answer; when the server accepts, both decoders stop reading (the
/// rest is TLS or GSSAPI).
///
/// ```
/// use custody_protocols::pg::{BackendMessage, Connection};
///
/// let mut conn = Connection::default();
/// let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
/// startup.extend_from_slice(b"user\0alice\0\0");
/// let len = (startup.len() as u32).to_be_bytes();
/// startup[..4].copy_from_slice(&len);
/// conn.client_data(&startup, |_| {}).unwrap();
/// conn.client_data(b"Q\0\0\0\x0dSELECT 1\0", |_| {}).unwrap();
/// let mut events = Vec::new();
/// // AuthenticationOk, ReadyForQuery, then the query's answer.
/// let server = b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05IC\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";
/// conn.server_data(server, |_msg: &BackendMessage<'_>, event| events.extend(event))
///     .unwrap();
/// assert_eq!(conn.session().user(), Some("alice"));
/// assert_eq!(events[0].sql.as_deref(), Some("SELECT 1"));
/// assert_eq!(events[0].tag_rows, Some(1));
/// ```
#[derive(Debug, Default)]
pub struct Connection {
    frontend: FrontendDecoder,
    backend: BackendDecoder,
    session: Session,
}

impl Connection {
    /// A connection with the given decoder and session limits.
    pub fn new(limits: Limits, session_limits: SessionLimits) -> Self {
        Self {
            frontend: FrontendDecoder::new(limits),
            backend: BackendDecoder::new(limits),
            session: Session::new(session_limits),
        }
    }

    /// Feeds client bytes; calls `on_message` with each message decoded.
    ///
    /// On error the client decoder is failed for good: keep forwarding bytes,
    /// stop inspecting them.
    pub fn client_data<F>(&mut self, data: &[u8], mut on_message: F) -> Result<(), DecodeError>
    where
        F: FnMut(&FrontendMessage<'_>),
    {
        let session = &mut self.session;
        let res = self.frontend.feed(data, |frame| {
            let msg = FrontendMessage::parse(&frame);
            session.on_frontend(&msg);
            on_message(&msg);
        });
        if let Some(kind) = self.frontend.take_encryption_request() {
            self.backend.expect_encryption_response(kind);
        }
        res
    }

    /// Feeds server bytes; calls `on_message` with each message decoded and
    /// the [`QueryEvent`] it completed, if any.
    ///
    /// On error the server decoder is failed for good: keep forwarding bytes,
    /// stop inspecting them.
    pub fn server_data<F>(&mut self, data: &[u8], mut on_message: F) -> Result<(), DecodeError>
    where
        F: FnMut(&BackendMessage<'_>, Option<QueryEvent>),
    {
        let session = &mut self.session;
        let mut accepted = false;
        let res = self.backend.feed(data, |frame| {
            let msg = BackendMessage::parse(&frame);
            if let BackendMessage::EncryptionResponse { accepted: true } = msg {
                accepted = true;
            }
            let event = session.on_backend(&msg);
            on_message(&msg, event);
        });
        if accepted {
            self.frontend.encryption_accepted();
        }
        res
    }

    /// The session state.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The client-to-server decoder.
    pub fn frontend(&self) -> &FrontendDecoder {
        &self.frontend
    }

    /// The server-to-client decoder.
    pub fn backend(&self) -> &BackendDecoder {
        &self.backend
    }

    /// Whether the connection is no longer inspected: a decoder failed, or
    /// the traffic is encrypted.
    pub fn is_opaque(&self) -> bool {
        self.frontend.is_failed()
            || self.backend.is_failed()
            || self.frontend.is_passthrough()
            || self.backend.is_passthrough()
    }
}
