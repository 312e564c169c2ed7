//! The PostgreSQL side: the decoders and the session of
//! [`custody_protocols::pg`], wired so the inspector can read the session
//! between messages.

use custody_protocols::classify::{Classifier, Report};
use custody_protocols::pg::{
    BackendDecoder, BackendMessage, FrontendDecoder, FrontendMessage, Limits, QueryEvent,
    QuerySource, Session, SessionLimits,
};

use super::annotate::{Annotator, Wire};
use super::relay::Inspect;
use super::{Carrier, Conn, End, Inspection, Sampler, Statement};

/// A completed statement with its result column names and classification.
type Completed = (QueryEvent, Vec<String>, Option<Report>);

/// Inspects one PostgreSQL session.
pub(crate) struct Inspector<'c> {
    conn: Conn,
    classifier: &'c Classifier,
    frontend: FrontendDecoder,
    backend: BackendDecoder,
    session: Session,
    sampler: Sampler,
    carrier: Option<Carrier>,
    encrypted: bool,
    failed: bool,
    /// With `annotate`: `None` until the client's stream reaches its first
    /// message boundary after startup, then the annotator.
    annotator: Option<Annotator>,
}

impl std::fmt::Debug for Inspector<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("pg::Inspector")
            .field("queries", &self.conn.queries)
            .field("encrypted", &self.encrypted)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<'c> Inspector<'c> {
    pub(crate) fn new(conn: Conn, classifier: &'c Classifier) -> Self {
        let sampler = Sampler::new(&conn.shared.config.classification);
        Inspector {
            conn,
            classifier,
            frontend: FrontendDecoder::new(Limits::default()),
            backend: BackendDecoder::new(Limits::default()),
            session: Session::new(SessionLimits::default()),
            sampler,
            carrier: None,
            encrypted: false,
            failed: false,
            annotator: None,
        }
    }

    /// Ends the session: the connection and how it went.
    pub(crate) fn finish(self) -> (Conn, End) {
        let inspection = if self.encrypted {
            Inspection::Encrypted
        } else if self.failed {
            Inspection::Unparsed
        } else {
            Inspection::Decoded
        };
        let end = End {
            inspection,
            user: self.session.user().map(str::to_owned),
            database: self.session.database().map(str::to_owned),
        };
        (self.conn, end)
    }

    fn decoder_failed(&mut self, side: &'static str) {
        if !self.failed {
            self.failed = true;
            tracing::info!(
                message = "postgresql session no longer decoded; forwarding untouched",
                side,
                dest = %self.conn.dest
            );
            self.conn
                .shared
                .metrics
                .db_decode_errors
                .get_or_create(&crate::metrics::DbDecodeLabels {
                    system: "postgresql",
                    side,
                })
                .inc();
        }
    }

    fn carrier(&mut self) -> Carrier {
        if self.carrier.is_none() && self.session.authenticated() {
            self.carrier = Some(
                self.session
                    .application_name()
                    .map(Carrier::from_application_name)
                    .unwrap_or_default(),
            );
        }
        self.carrier.clone().unwrap_or_default()
    }

    fn completed(&mut self, (event, columns, report): Completed) {
        let index = match event.source {
            QuerySource::Simple { index } => usize::try_from(index).unwrap_or(usize::MAX),
            _ => 0,
        };
        let statement = Statement {
            rows_affected: event.rows_affected().unwrap_or(0),
            sql: event.sql.clone(),
            index,
            command: event.command.as_deref().map(str::to_owned),
            rows_returned: event.rows_returned,
            error_code: event.error.as_ref().map(|e| e.sqlstate.to_string()),
            columns,
            report,
            user: self.session.user().map(str::to_owned),
            database: self.session.database().map(str::to_owned),
        };
        let carrier = self.carrier();
        self.conn.statement_done(statement, &carrier);
    }
}

impl Inspector<'_> {
    /// Starts annotating once the stream is made of typed messages and the
    /// next byte starts one; checked before the chunk is decoded.
    fn annotation_ready(&mut self) -> bool {
        if self.annotator.is_none()
            && self.conn.annotate
            && !self.failed
            && !self.encrypted
            && !self.frontend.in_startup()
            && !self.frontend.is_passthrough()
            && self.frontend.at_boundary()
        {
            self.annotator = Some(Annotator::new(Wire::Postgres));
        }
        self.annotator.is_some()
    }

    /// A whole `Query` message, annotated, or `None` to forward it as is.
    fn annotate_query(&mut self, message: &[u8]) -> Option<Vec<u8>> {
        if self.failed || self.encrypted {
            return None;
        }
        let sql = message.get(5..)?.strip_suffix(&[0])?;
        let sql = std::str::from_utf8(sql).ok()?;
        if sql.contains('\0') {
            return None;
        }
        let carrier = self.carrier();
        let annotated = self.conn.annotated(sql, &carrier)?;
        let len = u32::try_from(annotated.len() + 5).ok()?;
        let mut out = Vec::with_capacity(annotated.len() + 6);
        out.push(b'Q');
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(annotated.as_bytes());
        out.push(0);
        Some(out)
    }

    fn decode_client(&mut self, data: &[u8]) {
        if self.failed || self.encrypted {
            return;
        }
        let mut sent = false;
        let session = &mut self.session;
        let result = self.frontend.feed(data, |frame| {
            let msg = FrontendMessage::parse(&frame);
            session.on_frontend(&msg);
            sent |= matches!(
                msg,
                FrontendMessage::Query { .. }
                    | FrontendMessage::Execute { .. }
                    | FrontendMessage::FunctionCall { .. }
            );
        });
        if let Some(kind) = self.frontend.take_encryption_request() {
            self.backend.expect_encryption_response(kind);
        }
        if sent {
            self.conn.statement_sent();
        }
        if result.is_err() {
            self.decoder_failed("client");
        }
    }
}

impl Inspect for Inspector<'_> {
    fn client_bytes(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let annotating = self.annotation_ready();
        // The decoder reads what the client sent, before any annotation.
        self.decode_client(data);
        if !annotating {
            return false;
        }
        let Some(mut annotator) = self.annotator.take() else {
            return false;
        };
        annotator.process(data, out, &mut |message| self.annotate_query(message));
        self.annotator = Some(annotator);
        true
    }

    fn client_end(&mut self, out: &mut Vec<u8>) {
        if let Some(annotator) = self.annotator.as_mut() {
            annotator.flush(out);
        }
    }

    fn server_bytes(&mut self, data: &[u8]) {
        if self.failed || self.encrypted {
            return;
        }
        let mut accepted = false;
        let mut done: Vec<Completed> = Vec::new();
        let session = &mut self.session;
        let sampler = &mut self.sampler;
        let classifier = self.classifier;
        let result = self.backend.feed(data, |frame| {
            let msg = BackendMessage::parse(&frame);
            match &msg {
                BackendMessage::EncryptionResponse { accepted: true } => accepted = true,
                BackendMessage::DataRow(row) if sampler.wants() => {
                    sampler.push_row(row.values().map_while(Result::ok));
                }
                _ => {}
            }
            if let Some(event) = session.on_backend(&msg) {
                // The rows sampled so far are this statement's.
                let columns: Vec<String> = event
                    .columns
                    .as_deref()
                    .map(|c| c.iter().map(ToString::to_string).collect())
                    .unwrap_or_default();
                let report = sampler.classify(classifier, &columns, event.rows_returned);
                done.push((event, columns, report));
            }
        });
        if accepted {
            self.frontend.encryption_accepted();
            self.encrypted = true;
        }
        for event in done {
            self.completed(event);
        }
        if result.is_err() {
            self.decoder_failed("server");
        }
    }
}
