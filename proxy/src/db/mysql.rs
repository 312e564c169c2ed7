//! The MySQL side: the session of [`custody_protocols::mysql`].

use custody_protocols::classify::Classifier;
use custody_protocols::mysql::{CommandKind, Config, Event, Phase, QueryRecord, Session, Value};

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

impl Inspect for Inspector<'_> {
    fn client_bytes(&mut self, data: &[u8]) {
        self.feed(data, true);
    }

    fn server_bytes(&mut self, data: &[u8]) {
        self.feed(data, false);
    }
}
