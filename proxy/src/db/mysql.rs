//! The MySQL side: the session of [`custody_protocols::mysql`].

use custody_protocols::classify::Classifier;
use custody_protocols::mysql::{CommandKind, Config, Event, Phase, QueryRecord, Session, Value};

use super::annotate::{Annotator, Wire};
use super::relay::Inspect;
use super::{Carrier, Conn, End, Inspection, Sampler, Statement};

/// Inspects one MySQL session.
pub(crate) struct Inspector<'c> {
    conn: Conn,
    classifier: &'c Classifier,
    session: Session,
    sampler: Sampler,
    carrier: Option<Carrier>,
    failed: bool,
    /// With `annotate`: `None` until the command phase starts at a packet
    /// boundary, then the annotator.
    annotator: Option<Annotator>,
}

impl std::fmt::Debug for Inspector<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("mysql::Inspector")
            .field("queries", &self.conn.queries)
            .field("phase", &self.session.phase())
            .finish_non_exhaustive()
    }
}

/// Whether a command runs SQL that touches data (prepares, pings and the
/// like are not hops of their own).
fn runs_sql(kind: CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::Query
            | CommandKind::StmtExecute
            | CommandKind::StmtBulkExecute
            | CommandKind::StmtFetch
    )
}

/// What the observer collects while the session decodes a chunk.
#[derive(Default)]
struct Collected {
    sent: bool,
    done: Vec<Statement>,
}

fn statement_of(
    record: &QueryRecord,
    columns: Vec<String>,
    report: Option<custody_protocols::classify::Report>,
) -> Statement {
    Statement {
        sql: record.sql.clone(),
        index: 0,
        command: None,
        rows_returned: record.rows,
        rows_affected: record.affected_rows,
        error_code: record.error.as_ref().map(|e| e.code.to_string()),
        columns,
        report,
        user: record.user.as_deref().map(str::to_owned),
        database: record.database.as_deref().map(str::to_owned),
    }
}

impl<'c> Inspector<'c> {
    pub(crate) fn new(conn: Conn, classifier: &'c Classifier) -> Self {
        let sampler = Sampler::new(&conn.shared.config.classification);
        Inspector {
            conn,
            classifier,
            session: Session::new(Config::default()),
            sampler,
            carrier: None,
            failed: false,
            annotator: None,
        }
    }

    /// Ends the session: the connection and how it went.
    pub(crate) fn finish(self) -> (Conn, End) {
        let inspection = match self.session.phase() {
            Phase::Tls => Inspection::Encrypted,
            Phase::Failed | Phase::Compressed => Inspection::Unparsed,
            _ if self.failed => Inspection::Unparsed,
            _ => Inspection::Decoded,
        };
        let end = End {
            inspection,
            user: self.session.user().map(str::to_owned),
            database: self.session.database().map(str::to_owned),
        };
        (self.conn, end)
    }

    fn feed(&mut self, data: &[u8], client: bool) {
        if self.failed
            || !matches!(
                self.session.phase(),
                Phase::Handshake | Phase::Auth | Phase::Command
            )
        {
            return;
        }
        let mut collected = Collected::default();
        let sampler = &mut self.sampler;
        let classifier = self.classifier;
        let mut observer = |event: Event<'_>| match event {
            Event::Command(command) => collected.sent |= runs_sql(command.kind),
            Event::Row(row) if sampler.wants() => {
                sampler.push_row(row.values().map(|v| match v {
                    Value::Bytes(b) => Some(b),
                    _ => None,
                }));
            }
            Event::Query(record) => {
                let names: Vec<String> = record.column_names().map(str::to_owned).collect();
                let report = sampler.classify(classifier, &names, record.rows);
                if runs_sql(record.command) {
                    collected.done.push(statement_of(record, names, report));
                }
            }
            _ => {}
        };
        let result = if client {
            self.session.feed_client(data, &mut observer)
        } else {
            self.session.feed_server(data, &mut observer)
        };
        if collected.sent {
            self.conn.statement_sent();
        }
        if !collected.done.is_empty() {
            let carrier = self.carrier();
            for statement in collected.done {
                self.conn.statement_done(statement, &carrier);
            }
        }
        if result.is_err() {
            self.failed = true;
            tracing::info!(
                message = "mysql session no longer decoded; forwarding untouched",
                side = if client { "client" } else { "server" },
                dest = %self.conn.dest
            );
            self.conn
                .shared
                .metrics
                .db_decode_errors
                .get_or_create(&crate::metrics::DbDecodeLabels {
                    system: "mysql",
                    side: if client { "client" } else { "server" },
                })
                .inc();
        }
    }

    fn carrier(&mut self) -> Carrier {
        self.carrier
            .get_or_insert_with(|| Carrier::from_attributes(self.session.attributes()))
            .clone()
    }
}

impl Inspector<'_> {
    /// Starts annotating once the command phase begins and the next client
    /// byte starts a packet; checked before the chunk is decoded.
    fn annotation_ready(&mut self) -> bool {
        if self.annotator.is_none()
            && self.conn.annotate
            && !self.failed
            && self.session.phase() == Phase::Command
            && self.session.client_idle()
        {
            self.annotator = Some(Annotator::new(Wire::Mysql));
        }
        self.annotator.is_some()
    }

    /// A whole `COM_QUERY` packet, annotated, or `None` to forward it as is.
    fn annotate_query(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        use custody_protocols::mysql::capabilities::QUERY_ATTRIBUTES;
        if self.failed
            || self.session.phase() != Phase::Command
            || self.session.capabilities() & QUERY_ATTRIBUTES != 0
        {
            // MySQL 8 query attributes come before the SQL: left alone.
            return None;
        }
        let seq = *packet.get(3)?;
        let sql = std::str::from_utf8(packet.get(5..)?).ok()?;
        let carrier = self.carrier();
        let annotated = self.conn.annotated(sql, &carrier)?;
        let len = annotated.len() + 1;
        if len >= custody_protocols::mysql::MAX_PAYLOAD {
            return None;
        }
        let [a, b, c, _] = u32::try_from(len).ok()?.to_le_bytes();
        let mut out = Vec::with_capacity(len + 4);
        out.extend_from_slice(&[a, b, c, seq, custody_protocols::mysql::commands::QUERY]);
        out.extend_from_slice(annotated.as_bytes());
        Some(out)
    }
}

impl Inspect for Inspector<'_> {
    fn client_bytes(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let annotating = self.annotation_ready();
        // The decoder reads what the client sent, before any annotation.
        self.feed(data, true);
        if !annotating {
            return false;
        }
        let Some(mut annotator) = self.annotator.take() else {
            return false;
        };
        annotator.process(data, out, &mut |packet| self.annotate_query(packet));
        self.annotator = Some(annotator);
        true
    }

    fn client_end(&mut self, out: &mut Vec<u8>) {
        if let Some(annotator) = self.annotator.as_mut() {
            annotator.flush(out);
        }
    }

    fn server_bytes(&mut self, data: &[u8]) {
        self.feed(data, false);
    }
}
