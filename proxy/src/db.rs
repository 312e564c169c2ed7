//! PostgreSQL and MySQL sessions: forwarded unchanged, decoded on the side.
//!
//! A database connection reaches this module from the outbound listener
//! (its original destination port is a configured database port, or its
//! first bytes are a PostgreSQL startup packet) or from a database listener
//! of its own (`databases[].listen`). Every byte is forwarded as it arrives,
//! unchanged; the decoders ([`custody_protocols`]) only look at a copy. The
//! one opt-in exception (`databases[].annotate`, `annotate.rs`) appends a
//! sqlcommenter comment naming the chain to simple-protocol statements.
//!
//! Each statement becomes a hop: attributed to its chain
//! (`attribution.rs`), analysed (statement kind, tables, columns), its result
//! rows sampled and classified, the database user and database recorded.
//! The data classes found join the chain's taint in this pod
//! ([`crate::taint`]), so the chain's next HTTP call is checked with them.
//!
//! What cannot be inspected is still recorded, never silently: a session
//! that switched to TLS is one hop `encrypted, not inspected`; a session a
//! decoder failed on keeps flowing untouched and its connection hop says
//! `unparsed`. A decoder error never closes a connection.

mod annotate;
mod attribution;
mod mysql;
mod pg;
mod relay;
mod tls;

pub use tls::{Ends, Terminator};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use custody_context::api::{SCHEMA_VERSION, v1};
use custody_context::hop::HopEvent;
use custody_context::policy::{Decision, Verdict};
use custody_context::traceparent::SpanId;
use custody_context::verify::VerifiedToken;
use custody_protocols::classify::{Classifier, ClassifierConfig, PreparedColumns, Report};
use custody_protocols::sql::{Analysis, Analyzer, AnalyzerConfig, Dialect};
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::config::{ClassificationConfig, DatabaseConfig, DatabaseProtocol, DatabaseTls};
use crate::inflight::Stitch;
use crate::metrics::{DbConnectionLabels, DbQueryLabels};
use crate::proxy::Shared;

pub(crate) use attribution::Carrier;

/// The SQL analyzer and the classifier, shared by every session.
pub struct Engines {
    analyzer: Analyzer,
    classifier: Classifier,
    taint_min_confidence: f32,
    /// TLS ends of the databases configured to terminate, by their files
    /// and server name (databases configured alike share one).
    terminators: std::collections::HashMap<TerminatorKey, Arc<Terminator>>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

/// What makes two terminating databases' TLS the same: certificate, key,
/// upstream CA and upstream server name.
type TerminatorKey = (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    Option<String>,
);

fn terminator_key(tls: &DatabaseTls) -> Option<TerminatorKey> {
    match tls {
        DatabaseTls::Terminate {
            cert_file,
            key_file,
            upstream_ca_file,
            upstream_server_name,
            ..
        } => Some((
            cert_file.clone(),
            key_file.clone(),
            upstream_ca_file.clone(),
            upstream_server_name.clone(),
        )),
        DatabaseTls::Passthrough => None,
    }
}

impl Engines {
    /// The TLS ends of a database configured to terminate.
    fn terminator(&self, tls: &DatabaseTls) -> Option<&Arc<Terminator>> {
        self.terminators.get(&terminator_key(tls)?)
    }

    /// The TLS files of every terminating database, re-read on change,
    /// with their `reload_interval_ms`, for [`crate::reload::Reloader::watch`].
    pub(crate) fn tls_reloaders(
        &self,
        config: &crate::config::Config,
    ) -> Vec<(Arc<crate::reload::Reloader<Ends>>, u64)> {
        let mut all: Vec<(Arc<crate::reload::Reloader<Ends>>, u64)> = Vec::new();
        for database in &config.databases {
            if let DatabaseTls::Terminate {
                reload_interval_ms, ..
            } = &database.tls
                && let Some(terminator) = self.terminator(&database.tls)
                && !all
                    .iter()
                    .any(|(r, _)| Arc::ptr_eq(r, terminator.reloader()))
            {
                all.push((Arc::clone(terminator.reloader()), *reload_interval_ms));
            }
        }
        all
    }

    /// Builds them from the configuration.
    pub fn new(config: &crate::config::Config) -> Result<Self, String> {
        let mut terminators = std::collections::HashMap::new();
        for (i, database) in config.databases.iter().enumerate() {
            let Some(key) = terminator_key(&database.tls) else {
                continue;
            };
            if terminators.contains_key(&key) {
                // Configured like an earlier database: its files are
                // watched (and labelled) there.
                continue;
            }
            let terminator = Terminator::load(
                &key.0,
                &key.1,
                &key.2,
                key.3.as_deref(),
                &format!("databases[{i}].tls"),
            )?;
            terminators.insert(key, Arc::new(terminator));
        }
        let mut engines = Engines::classifying(&config.classification)?;
        engines.terminators = terminators;
        Ok(engines)
    }

    fn classifying(config: &ClassificationConfig) -> Result<Self, String> {
        let classifier = Classifier::new(&ClassifierConfig {
            max_rows: config.sample_rows,
            max_bytes: config.sample_bytes,
            min_confidence: config.min_confidence,
            custom: Vec::new(),
        })
        .map_err(|e| format!("classification.{e}"))?;
        let analyzer =
            Analyzer::new(&AnalyzerConfig::default()).map_err(|e| format!("sql analyzer: {e}"))?;
        Ok(Engines {
            analyzer,
            classifier,
            taint_min_confidence: config.taint_min_confidence,
            terminators: std::collections::HashMap::new(),
        })
    }
}

/// Whether the first 8 bytes of a connection are a PostgreSQL startup
/// packet: `StartupMessage` v3, `SSLRequest`, `GSSENCRequest` or
/// `CancelRequest`, with a plausible length.
pub fn looks_like_postgres(head: &[u8; 8]) -> bool {
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    match code {
        80_877_103 | 80_877_104 => len == 8,
        80_877_102 => len == 16,
        0x0003_0000 => (8..=10_000).contains(&len),
        _ => false,
    }
}

/// What the session learned that every hop of it shares.
#[derive(Debug)]
pub(crate) struct Conn {
    pub shared: Arc<Shared>,
    pub protocol: DatabaseProtocol,
    pub src: Option<SocketAddr>,
    pub dest: SocketAddr,
    pub egress: Option<(Decision, v1::Destination)>,
    /// Statements completed.
    pub queries: u64,
    /// When the latest statement was sent and the request in flight then.
    sent: Option<(Instant, Option<Stitch>)>,
    /// `plaintext`, `tls_terminated` or `tls_passthrough`.
    transport: &'static str,
    /// The analyses of this session's statements, by text: a statement
    /// prepared once and executed many times is analysed once.
    analyses: std::collections::HashMap<Arc<str>, Arc<Analysis>>,
    /// Whether simple-protocol statements of attributed chains get a
    /// sqlcommenter comment (`databases[].annotate`).
    annotate: bool,
    /// How the connection to the server is secured: mesh mTLS when the
    /// destination is a mesh peer.
    transport_security: v1::TransportSecurity,
    /// The SPIFFE ID the mesh peer proved.
    peer_identity: Option<String>,
    /// Why mesh mTLS to the peer failed, if it did.
    transport_error: &'static str,
}

/// Statement texts whose analysis a session remembers.
const SESSION_ANALYSES: usize = 256;

/// One statement, complete, in protocol-neutral form.
#[derive(Debug, Default)]
pub(crate) struct Statement {
    pub sql: Option<Arc<str>>,
    /// The statement's position in a multi-statement query string.
    pub index: usize,
    /// The command the server reported (`SELECT`, `INSERT`, ...).
    pub command: Option<String>,
    pub rows_returned: u64,
    pub rows_affected: u64,
    pub error_code: Option<String>,
    /// Result column names.
    pub columns: Vec<String>,
    pub report: Option<Report>,
    pub user: Option<String>,
    pub database: Option<String>,
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn initiator(claims: &custody_context::token::TxnClaims) -> v1::Initiator {
    v1::Initiator {
        subject: claims.sub.clone(),
        kind: v1::InitiatorKind::from(claims.custody.ini) as i32,
        actors: claims.actors().into_iter().map(str::to_owned).collect(),
        scope: claims.scope.clone(),
    }
}

impl Conn {
    fn dialect(&self) -> Dialect {
        match self.protocol {
            DatabaseProtocol::Postgres => Dialect::Postgres,
            DatabaseProtocol::Mysql => Dialect::MySql,
        }
    }

    fn protocol_v1(&self) -> v1::Protocol {
        match self.protocol {
            DatabaseProtocol::Postgres => v1::Protocol::Postgres,
            DatabaseProtocol::Mysql => v1::Protocol::Mysql,
        }
    }

    fn analysis(&mut self, sql: &Arc<str>) -> Arc<Analysis> {
        if let Some(found) = self.analyses.get(sql) {
            return Arc::clone(found);
        }
        let analysis = self.shared.db.analyzer.analyze(sql, self.dialect());
        if self.analyses.len() >= SESSION_ANALYSES {
            self.analyses.clear();
        }
        self.analyses.insert(Arc::clone(sql), Arc::clone(&analysis));
        analysis
    }

    /// The statement `sql` with a sqlcommenter comment naming its chain
    /// appended, or `None` when it is not attributed to a chain or already
    /// has a comment. Attribution is the one the statement's hop will get:
    /// the same carrier and the request in flight recorded when it was sent.
    pub(crate) fn annotated(&self, sql: &str, carrier: &Carrier) -> Option<String> {
        let dialect = self.dialect();
        if custody_protocols::sqlcommenter::has_comment(sql, dialect) {
            return None;
        }
        let stitch = self.sent.as_ref().and_then(|(_, stitch)| stitch.as_ref());
        let attributed = attribution::attribute(&self.shared, Some(sql), dialect, carrier, stitch);
        let token = attributed.token?;
        let chain = token.claims.txn.to_string();
        let span = attributed.parent_span.unwrap_or_else(SpanId::random);
        let traceparent = format!("00-{chain}-{span}-01");
        let annotated = custody_protocols::sqlcommenter::annotate(
            sql,
            dialect,
            &[("custody_chain", &chain), ("traceparent", &traceparent)],
        );
        self.shared
            .metrics
            .db_annotated
            .get_or_create(&crate::metrics::DbSystemLabels {
                system: self.protocol.system(),
            })
            .inc();
        Some(annotated)
    }

    /// The client sent a statement: remember when, and which inbound
    /// request was in flight at that moment.
    pub(crate) fn statement_sent(&mut self) {
        self.sent = Some((Instant::now(), self.shared.inflight.stitch()));
    }

    /// A statement completed: attribute it, record its hop, taint its chain.
    pub(crate) fn statement_done(&mut self, mut statement: Statement, carrier: &Carrier) {
        self.queries += 1;
        let shared = Arc::clone(&self.shared);
        let engines = &shared.db;
        let (sent_at, stitch) = match &self.sent {
            Some((at, stitch)) => (*at, stitch.as_ref()),
            None => (Instant::now(), None),
        };
        let duration = sent_at.elapsed();
        let attributed = attribution::attribute(
            &shared,
            statement.sql.as_deref(),
            self.dialect(),
            carrier,
            stitch,
        );
        let analysis = statement.sql.as_ref().map(|sql| self.analysis(sql));
        let analysed = analysis.as_ref().and_then(|a| {
            a.statements
                .get(statement.index)
                .or_else(|| a.statements.first())
        });
        let kind = analysed.map_or_else(
            || {
                statement
                    .command
                    .as_deref()
                    .map_or("other", command_kind)
                    .to_owned()
            },
            |s| s.kind.as_str().to_owned(),
        );
        let mut columns: Vec<String> = analysed
            .map(|s| {
                s.columns_read
                    .iter()
                    .chain(&s.columns_written)
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if columns.is_empty() {
            columns.clone_from(&statement.columns);
        }
        let tables_read: Vec<String> = analysed
            .map(|s| s.tables_read.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let tables_written: Vec<String> = analysed
            .map(|s| s.tables_written.iter().map(ToString::to_string).collect())
            .unwrap_or_default();

        let mut report = statement.report.take();
        if report.is_none() && statement.rows_returned > 0 {
            // Rows without values to sample (`COPY ... TO STDOUT`): the
            // column names the SQL reads are the evidence.
            let names: Vec<&str> = analysed
                .map(|s| s.columns_read.iter().map(|c| c.name.as_str()).collect())
                .unwrap_or_default();
            if !names.is_empty() {
                report = Some(engines.classifier.start(&names).finish());
            }
        }
        let data: Vec<v1::DataTouch> = report
            .as_ref()
            .map(|report| {
                report
                    .findings
                    .iter()
                    .map(|f| v1::DataTouch {
                        class: f.class.as_str().to_owned(),
                        count: estimated_count(f.count, report, statement.rows_returned),
                        confidence: f.confidence,
                    })
                    .collect()
            })
            .unwrap_or_default();
        for touch in &data {
            shared
                .metrics
                .data_classes
                .get_or_create(&crate::metrics::ClassLabels {
                    class: touch.class.clone(),
                })
                .inc();
        }

        let claims = attributed
            .token
            .as_deref()
            .map(|t: &VerifiedToken| &t.claims);
        let mut taint: std::collections::BTreeSet<String> =
            claims.map(|c| c.custody.taint.clone()).unwrap_or_default();
        if let Some(c) = claims {
            taint.extend(shared.taint.missing_from(c.txn, &c.custody.taint));
            let tainting: Vec<&str> = data
                .iter()
                .filter(|d| d.confidence >= engines.taint_min_confidence)
                .map(|d| d.class.as_str())
                .collect();
            shared.taint.add(c.txn, tainting.iter().copied());
            taint.extend(tainting.into_iter().map(str::to_owned));
        }
        let mut workloads = claims.map(|c| c.req_wl.clone()).unwrap_or_default();
        if workloads.last() != Some(&shared.workload_uri) {
            workloads.push(shared.workload_uri.clone());
        }

        let outcome_label = if statement.error_code.is_some() {
            "error"
        } else {
            "ok"
        };
        shared
            .metrics
            .db_queries
            .get_or_create(&DbQueryLabels {
                system: self.protocol.system(),
                kind: static_kind(&kind),
                outcome: outcome_label,
            })
            .inc();
        let operation = match tables_read.first().or(tables_written.first()) {
            Some(table) => format!("{} {table}", kind.to_ascii_uppercase()),
            None => kind.to_ascii_uppercase(),
        };
        let start_unix_nanos =
            unix_nanos().saturating_sub(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        let hop = HopEvent {
            schema_version: SCHEMA_VERSION,
            event_id: custody_context::traceparent::random_event_id(),
            chain_id: claims.map(|c| c.txn.to_string()).unwrap_or_default(),
            span_id: SpanId::random().to_string(),
            parent_span_id: attributed
                .parent_span
                .map(|s| s.to_string())
                .unwrap_or_default(),
            workload: Some((&shared.workload).into()),
            direction: v1::Direction::Outbound as i32,
            protocol: self.protocol_v1() as i32,
            operation,
            initiator: claims.map(initiator),
            workloads,
            attribution: Some((&attributed.attribution).into()),
            context_outcome: attributed.outcome as i32,
            refusal_reason: attributed.refusal_reason.to_owned(),
            start_unix_nanos,
            duration_nanos: u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
            egress: self.egress_v1(),
            data,
            database: Some(v1::DatabaseAccess {
                system: self.protocol.system().to_owned(),
                database: statement.database.unwrap_or_default(),
                user: statement.user.unwrap_or_default(),
                statement_kind: kind,
                fingerprint: analysis
                    .as_ref()
                    .map(|a| format!("{:016x}", a.fingerprint))
                    .unwrap_or_default(),
                tables_read,
                tables_written,
                columns,
                rows_returned: statement.rows_returned,
                rows_affected: statement.rows_affected,
                error_code: statement.error_code.unwrap_or_default(),
                parsed: analysis.as_ref().is_some_and(|a| a.parsed),
                transport: self.transport.to_owned(),
            }),
            connection: crate::proxy::tcp_five_tuple(self.src, Some(self.dest)),
            transport_security: self.transport_security as i32,
            peer_identity: self.peer_identity.clone().unwrap_or_default(),
            transport_error: self.transport_error.to_owned(),
            taint: taint.into_iter().collect(),
            key_id: attributed
                .token
                .as_ref()
                .map(|t| t.kid.clone())
                .unwrap_or_default(),
            ..HopEvent::default()
        };
        shared.hops.emit(hop);
    }

    fn egress_v1(&self) -> Option<v1::EgressDecision> {
        self.egress.as_ref().map(|(d, dest)| v1::EgressDecision {
            destination: Some(dest.clone()),
            verdict: v1::Verdict::from(d.verdict) as i32,
            policy: d.policy.clone().unwrap_or_default(),
            rule: d.rule.clone().unwrap_or_default(),
        })
    }

    /// The connection's own hop, for what statements cannot say: it was
    /// blocked, encrypted, not decodable, or never ran a statement.
    fn connection_done(&self, facts: ConnectionFacts) {
        let shared = &self.shared;
        shared
            .metrics
            .db_connections
            .get_or_create(&DbConnectionLabels {
                system: self.protocol.system(),
                inspection: facts.inspection.as_str(),
            })
            .inc();
        if facts.inspection == Inspection::Decoded && self.queries > 0 {
            return;
        }
        let claims = facts.stitch.as_ref().map(|s| &s.request.token.claims);
        let hop = HopEvent {
            schema_version: SCHEMA_VERSION,
            event_id: custody_context::traceparent::random_event_id(),
            chain_id: claims.map(|c| c.txn.to_string()).unwrap_or_default(),
            span_id: SpanId::random().to_string(),
            parent_span_id: facts
                .stitch
                .as_ref()
                .map(|s| s.request.span.parent_id.to_string())
                .unwrap_or_default(),
            workload: Some((&shared.workload).into()),
            direction: v1::Direction::Outbound as i32,
            protocol: self.protocol_v1() as i32,
            operation: facts.inspection.operation(),
            initiator: claims.map(initiator),
            workloads: claims.map(|c| c.req_wl.clone()).unwrap_or_default(),
            attribution: Some(match &facts.stitch {
                Some(s) => (&custody_context::token::HopAttribution::stitched(s.confidence)).into(),
                None => v1::Attribution {
                    method: v1::AttributionMethod::PeerOnly as i32,
                    confidence: 1.0,
                },
            }),
            context_outcome: if facts.stitch.is_some() {
                v1::ContextOutcome::Stitched
            } else {
                v1::ContextOutcome::Missing
            } as i32,
            bytes_in: facts.bytes_up,
            bytes_out: facts.bytes_down,
            start_unix_nanos: facts.start_unix_nanos,
            duration_nanos: u64::try_from(facts.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            egress: self.egress_v1(),
            database: Some(v1::DatabaseAccess {
                system: self.protocol.system().to_owned(),
                database: facts.database.unwrap_or_default(),
                user: facts.user.unwrap_or_default(),
                statement_kind: String::new(),
                parsed: false,
                transport: match facts.inspection {
                    Inspection::Encrypted => "tls_passthrough",
                    // The client asked for TLS and no session followed.
                    Inspection::TlsFailed(_) => "",
                    _ => self.transport,
                }
                .to_owned(),
                ..v1::DatabaseAccess::default()
            }),
            connection: crate::proxy::tcp_five_tuple(self.src, Some(self.dest)),
            transport_security: self.transport_security as i32,
            peer_identity: self.peer_identity.clone().unwrap_or_default(),
            transport_error: self.transport_error.to_owned(),
            taint: claims
                .map(|c| c.custody.taint.iter().cloned().collect())
                .unwrap_or_default(),
            ..HopEvent::default()
        };
        shared.hops.emit(hop);
    }
}

/// Rows holding a class: the sampled hits scaled to the rows returned; a
/// finding from column names alone counts every row.
fn estimated_count(hits: u64, report: &Report, rows: u64) -> u64 {
    if hits == 0 || report.rows_sampled == 0 {
        return rows.max(1);
    }
    let scaled = u128::from(hits) * u128::from(rows.max(report.rows_sampled))
        / u128::from(report.rows_sampled);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// The statement kind of a command tag, when the SQL is unknown.
fn command_kind(command: &str) -> &'static str {
    match command.split(' ').next().unwrap_or_default() {
        "SELECT" | "FETCH" | "SHOW" => "select",
        "INSERT" => "insert",
        "UPDATE" => "update",
        "DELETE" => "delete",
        "MERGE" => "merge",
        "COPY" => "copy",
        "CREATE" | "ALTER" | "DROP" | "TRUNCATE" => "ddl",
        "BEGIN" | "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "START" => "transaction",
        _ => "other",
    }
}

/// A bounded label value for a statement kind.
fn static_kind(kind: &str) -> &'static str {
    match kind {
        "select" => "select",
        "insert" => "insert",
        "update" => "update",
        "delete" => "delete",
        "merge" => "merge",
        "ddl" => "ddl",
        "copy" => "copy",
        "transaction" => "transaction",
        _ => "other",
    }
}

/// Result rows kept for classification until the statement completes and
/// its column names are certain (a prepared statement's rows arrive without
/// a `RowDescription`). Bounded by the classification budget.
#[derive(Debug)]
pub(crate) struct Sampler {
    max_rows: usize,
    max_bytes: usize,
    bytes: Vec<u8>,
    /// Per value: its range in `bytes`, `None` for NULL or not kept.
    cells: Vec<Option<(usize, usize)>>,
    /// Where each row's values end in `cells`.
    rows: Vec<usize>,
    /// Column names read by the classifier, by name list.
    prepared: std::collections::HashMap<Vec<String>, PreparedColumns>,
}

impl Sampler {
    pub(crate) fn new(config: &ClassificationConfig) -> Self {
        Sampler {
            max_rows: usize::try_from(config.sample_rows).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(config.sample_bytes).unwrap_or(usize::MAX),
            bytes: Vec::new(),
            cells: Vec::new(),
            rows: Vec::new(),
            prepared: std::collections::HashMap::new(),
        }
    }

    /// Whether another row would be kept.
    pub(crate) fn wants(&self) -> bool {
        self.rows.len() < self.max_rows && self.bytes.len() < self.max_bytes
    }

    /// Keeps one row's values.
    pub(crate) fn push_row<'a>(&mut self, values: impl Iterator<Item = Option<&'a [u8]>>) {
        for value in values {
            let cell = value.map(|v| {
                let start = self.bytes.len();
                let room = self.max_bytes.saturating_sub(start);
                self.bytes.extend_from_slice(&v[..v.len().min(room)]);
                (start, self.bytes.len())
            });
            self.cells.push(cell);
        }
        self.rows.push(self.cells.len());
    }

    /// Classifies the kept rows under these column names and forgets them.
    /// `None` when there is nothing to classify.
    pub(crate) fn classify(
        &mut self,
        classifier: &Classifier,
        names: &[String],
        rows_returned: u64,
    ) -> Option<Report> {
        let report = if rows_returned == 0 || (self.rows.is_empty() && names.is_empty()) {
            None
        } else {
            let mut width = names.len();
            let mut start = 0;
            for &end in &self.rows {
                width = width.max(end - start);
                start = end;
            }
            let prepared = if width > names.len() {
                let mut padded = names.to_vec();
                padded.resize(width, String::new());
                classifier.prepare(&padded)
            } else {
                self.prepared(classifier, names)
            };
            let mut acc = classifier.start_prepared(&prepared);
            let mut row: Vec<Option<&[u8]>> = Vec::with_capacity(width);
            let mut start = 0;
            for &end in &self.rows {
                row.clear();
                row.extend(
                    self.cells[start..end]
                        .iter()
                        .map(|c| c.map(|(a, b)| &self.bytes[a..b])),
                );
                acc.observe_row(&row);
                start = end;
            }
            Some(acc.finish())
        };
        self.bytes.clear();
        self.cells.clear();
        self.rows.clear();
        report
    }

    /// The column names read once per session: a statement executed many
    /// times comes back with the same columns.
    fn prepared(&mut self, classifier: &Classifier, names: &[String]) -> PreparedColumns {
        if let Some(found) = self.prepared.get(names) {
            return found.clone();
        }
        let prepared = classifier.prepare(names);
        if self.prepared.len() >= SESSION_ANALYSES {
            self.prepared.clear();
        }
        self.prepared.insert(names.to_vec(), prepared.clone());
        prepared
    }
}

/// How far a session could be inspected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inspection {
    /// Decoded to the end.
    Decoded,
    /// The session switched to TLS, passed through end to end.
    Encrypted,
    /// A decoder gave up; the rest was forwarded untouched.
    Unparsed,
    /// Egress policy refused the destination; nothing was forwarded.
    Blocked,
    /// TLS termination failed (the reason label); the connection was closed.
    TlsFailed(&'static str),
}

impl Inspection {
    fn as_str(self) -> &'static str {
        match self {
            Inspection::Decoded => "decoded",
            Inspection::Encrypted => "encrypted",
            Inspection::Unparsed => "unparsed",
            Inspection::Blocked => "blocked",
            Inspection::TlsFailed(_) => "tls_failed",
        }
    }

    fn operation(self) -> String {
        match self {
            Inspection::Decoded => "connection".to_owned(),
            Inspection::Encrypted => "encrypted, not inspected".to_owned(),
            Inspection::Unparsed => "unparsed".to_owned(),
            Inspection::Blocked => "connection blocked".to_owned(),
            Inspection::TlsFailed(reason) => format!("tls termination failed: {reason}"),
        }
    }
}

/// The connection-level facts of a finished session.
#[derive(Debug)]
pub(crate) struct ConnectionFacts {
    pub inspection: Inspection,
    pub user: Option<String>,
    pub database: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub started: Instant,
    pub start_unix_nanos: u64,
    pub stitch: Option<Stitch>,
}

/// Serves one database connection to `dest`: egress check, then relay with
/// inspection until both sides are done.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    database: &DatabaseConfig,
    client: Stream,
    dest: SocketAddr,
    egress: Option<(Decision, v1::Destination)>,
    stitch: Option<Stitch>,
) {
    let started = Instant::now();
    let start_unix_nanos = unix_nanos();
    let src = client
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
    let blocked = egress
        .as_ref()
        .is_some_and(|(d, _)| d.verdict == Verdict::Block);
    let mut conn = Conn {
        shared: Arc::clone(&shared),
        protocol: database.protocol,
        src,
        dest,
        egress,
        queries: 0,
        sent: None,
        transport: "plaintext",
        analyses: std::collections::HashMap::new(),
        annotate: database.annotate,
        transport_security: v1::TransportSecurity::Plaintext,
        peer_identity: None,
        transport_error: "",
    };
    let facts = |inspection, user, database, (bytes_up, bytes_down), stitch| ConnectionFacts {
        inspection,
        user,
        database,
        bytes_up,
        bytes_down,
        started,
        start_unix_nanos,
        stitch,
    };
    if blocked {
        tracing::info!(message = "database connection blocked by egress policy", %dest);
        conn.connection_done(facts(Inspection::Blocked, None, None, (0, 0), stitch));
        return;
    }
    let upstream: tls::TcpStream = match crate::tcp::mesh_peer_of(&shared, dest, None) {
        // A mesh peer: the session goes over mesh mTLS to its sidecar, the
        // decoders here still see it in plaintext.
        Some((mesh, expected)) => match mesh.connect_tcp(dest, expected, &shared.metrics).await {
            Ok((upstream, id)) => {
                conn.peer_identity = id;
                conn.transport_security = v1::TransportSecurity::MeshMtls;
                Box::new(upstream)
            }
            Err(label) => {
                tracing::info!(
                    message = "database session to a mesh peer refused: mesh mTLS failed",
                    %dest,
                    reason = label
                );
                conn.transport_error = label;
                conn.connection_done(facts(Inspection::Decoded, None, None, (0, 0), stitch));
                return;
            }
        },
        None => match tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(dest),
        )
        .await
        {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                Box::new(upstream)
            }
            Ok(Err(error)) => {
                tracing::info!(message = "database unreachable", %dest, %error);
                conn.connection_done(facts(Inspection::Decoded, None, None, (0, 0), stitch));
                return;
            }
            Err(_) => {
                tracing::info!(message = "database connect timed out", %dest);
                conn.connection_done(facts(Inspection::Decoded, None, None, (0, 0), stitch));
                return;
            }
        },
    };
    let engines = &shared.db;
    let metrics = &shared.metrics;
    let (conn, end, bytes) = match database.protocol {
        DatabaseProtocol::Postgres => {
            let terminator = engines.terminator(&database.tls);
            let mut client = client;
            let mut head = [0u8; 8];
            let mut asks_tls = false;
            if terminator.is_some() {
                // A PostgreSQL client sends at least these 8 bytes first; one
                // that sends fewer and waits is not served.
                match tokio::time::timeout(STARTUP_WAIT, client.try_peek(&mut head)).await {
                    Ok(Ok(true)) => asks_tls = head == tls::SSL_REQUEST,
                    Ok(_) | Err(_) => {
                        conn.connection_done(facts(
                            Inspection::Unparsed,
                            None,
                            None,
                            (0, 0),
                            stitch,
                        ));
                        return;
                    }
                }
            }
            match terminator {
                Some(terminator) if asks_tls => {
                    use tokio::io::AsyncReadExt as _;
                    if client.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let limit = database.tls.handshake_timeout();
                    match tls::negotiate(terminator, client, upstream, dest, limit).await {
                        Ok(tls::Negotiated::Tls(client, upstream)) => {
                            let mut conn = conn;
                            conn.transport = "tls_terminated";
                            postgres_session(conn, &engines.classifier, client, upstream, metrics)
                                .await
                        }
                        Ok(tls::Negotiated::Plain(client, upstream)) => {
                            postgres_session(conn, &engines.classifier, client, upstream, metrics)
                                .await
                        }
                        Err(failure) => {
                            let reason = tls_failed(&conn, &failure, limit);
                            let end =
                                facts(Inspection::TlsFailed(reason), None, None, (8, 0), stitch);
                            conn.connection_done(end);
                            return;
                        }
                    }
                }
                _ => postgres_session(conn, &engines.classifier, client, upstream, metrics).await,
            }
        }
        DatabaseProtocol::Mysql => {
            let terminator = engines.terminator(&database.tls);
            match terminator {
                Some(terminator) => {
                    let limit = database.tls.handshake_timeout();
                    match tls::negotiate_mysql(terminator, client, upstream, dest, limit).await {
                        Ok(tls::MysqlStart {
                            greeting,
                            client_first,
                            negotiated: tls::Negotiated::Tls(client, upstream),
                        }) => {
                            let mut conn = conn;
                            conn.transport = "tls_terminated";
                            // The `SSLRequest` is not shown to the decoder:
                            // the session it follows is the one inside TLS.
                            let start = MysqlPrelude {
                                greeting: &greeting,
                                client_first: &[],
                                forwarded: client_first.len(),
                            };
                            mysql_session(
                                conn,
                                &engines.classifier,
                                client,
                                upstream,
                                metrics,
                                start,
                            )
                            .await
                        }
                        Ok(tls::MysqlStart {
                            greeting,
                            client_first,
                            negotiated: tls::Negotiated::Plain(client, upstream),
                        }) => {
                            let start = MysqlPrelude {
                                greeting: &greeting,
                                client_first: &client_first,
                                forwarded: client_first.len(),
                            };
                            mysql_session(
                                conn,
                                &engines.classifier,
                                client,
                                upstream,
                                metrics,
                                start,
                            )
                            .await
                        }
                        Err(failure) => {
                            let reason = tls_failed(&conn, &failure, limit);
                            let end =
                                facts(Inspection::TlsFailed(reason), None, None, (0, 0), stitch);
                            conn.connection_done(end);
                            return;
                        }
                    }
                }
                None => {
                    let start = MysqlPrelude {
                        greeting: &[],
                        client_first: &[],
                        forwarded: 0,
                    };
                    mysql_session(conn, &engines.classifier, client, upstream, metrics, start).await
                }
            }
        }
    };
    conn.connection_done(facts(end.inspection, end.user, end.database, bytes, stitch));
}

/// How long a session may take to send its first 8 bytes when TLS may be
/// terminated.
const STARTUP_WAIT: Duration = Duration::from_secs(30);

/// Relays and inspects one PostgreSQL session over any pair of streams.
async fn postgres_session<C, S>(
    conn: Conn,
    classifier: &Classifier,
    client: C,
    server: S,
    metrics: &crate::metrics::Metrics,
) -> (Conn, End, (u64, u64))
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
{
    let inspector = pg::Inspector::new(conn, classifier);
    let (inspector, bytes) = relay::run(client, server, inspector, metrics, "postgresql").await;
    let (conn, end) = inspector.finish();
    (conn, end, bytes)
}

/// Logs and counts a failed TLS negotiation; returns its reason label. The
/// client's connection and the server's were dropped with the negotiation:
/// both are closed.
fn tls_failed(conn: &Conn, failure: &tls::Failure, limit: Duration) -> &'static str {
    let reason = failure.reason();
    let system = conn.protocol.system();
    tracing::warn!(
        message = "database TLS termination failed; connection closed",
        system,
        dest = %conn.dest,
        src = ?conn.src,
        reason,
        timeout_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        error = %failure,
    );
    conn.shared
        .metrics
        .db_tls_failures
        .get_or_create(&crate::metrics::DbTlsFailureLabels { system, reason })
        .inc();
    reason
}

/// What a terminating sidecar exchanged before the relay took over a MySQL
/// session.
struct MysqlPrelude<'a> {
    /// The server's greeting, already forwarded to the client.
    greeting: &'a [u8],
    /// Client bytes already forwarded that the decoder must see.
    client_first: &'a [u8],
    /// Client bytes already forwarded, shown to the decoder or not.
    forwarded: usize,
}

/// Relays and inspects one MySQL session over any pair of streams, after
/// what was already exchanged.
async fn mysql_session<C, S>(
    conn: Conn,
    classifier: &Classifier,
    client: C,
    server: S,
    metrics: &crate::metrics::Metrics,
    prelude: MysqlPrelude<'_>,
) -> (Conn, End, (u64, u64))
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
{
    use relay::Inspect as _;
    let mut inspector = mysql::Inspector::new(conn, classifier);
    inspector.server_bytes(prelude.greeting);
    if !prelude.client_first.is_empty() {
        let mut unused = Vec::new();
        let _ = inspector.client_bytes(prelude.client_first, &mut unused);
    }
    let before = (prelude.forwarded as u64, prelude.greeting.len() as u64);
    for (direction, bytes) in [("client", before.0), ("server", before.1)] {
        metrics
            .db_bytes
            .get_or_create(&crate::metrics::DbBytesLabels {
                system: "mysql",
                direction,
            })
            .inc_by(bytes);
    }
    let (inspector, (up, down)) = relay::run(client, server, inspector, metrics, "mysql").await;
    let (conn, end) = inspector.finish();
    (conn, end, (up + before.0, down + before.1))
}

/// How a session ended, as an inspector saw it.
#[derive(Debug)]
pub(crate) struct End {
    pub inspection: Inspection,
    pub user: Option<String>,
    pub database: Option<String>,
}

/// A listener of its own for one database (`databases[].listen`).
pub struct DatabaseListener {
    shared: Arc<Shared>,
    index: usize,
}

impl std::fmt::Debug for DatabaseListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseListener")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl DatabaseListener {
    /// The listener of `databases[index]`.
    pub fn new(shared: Arc<Shared>, index: usize) -> Self {
        DatabaseListener { shared, index }
    }
}

#[async_trait]
impl ServerApp for DatabaseListener {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let database = self.shared.config.databases.get(self.index)?.clone();
        let dest = database.upstream?;
        let stitch = self.shared.inflight.stitch();
        let egress = crate::tcp::egress_decision(&self.shared, dest, None, stitch.as_ref());
        serve(
            Arc::clone(&self.shared),
            &database,
            stream,
            dest,
            Some(egress),
            stitch,
        )
        .await;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_startup_packets_are_recognised() {
        let startup = [0, 0, 0, 40, 0, 3, 0, 0];
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let cancel = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        assert!(looks_like_postgres(&startup));
        assert!(looks_like_postgres(&ssl));
        assert!(looks_like_postgres(&cancel));
        assert!(!looks_like_postgres(b"GET / HT"));
        assert!(!looks_like_postgres(&[0x16, 3, 1, 0, 0xf0, 1, 0, 0]));
        assert!(!looks_like_postgres(&[0, 0, 0, 4, 0, 3, 0, 0]));
    }

    #[test]
    fn sampled_counts_scale_to_the_rows_returned() {
        let report = Report {
            rows_sampled: 64,
            ..Report::default()
        };
        assert_eq!(estimated_count(32, &report, 100_000), 50_000);
        assert_eq!(estimated_count(0, &report, 10), 10);
        assert_eq!(estimated_count(3, &report, 3), 3);
    }
}
