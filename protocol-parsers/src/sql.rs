//! SQL access analysis: what a statement reads and writes.
//!
//! Data flows in two steps. First a tokenizer-level normalizer
//! ([`fingerprint`]) turns the raw text into its *shape* (literals replaced by
//! `?`, comments dropped, keywords lowercased) and a stable 64-bit hash of it.
//! That pass is cheap and never fails. Then, only when the [`Analyzer`]'s
//! cache has no analysis for that shape, the text is parsed with `sqlparser`
//! and the syntax tree is walked to find the statement kind, the tables and
//! columns read and written, and the use of `*`. Since the analysis does not
//! depend on literal values, every later query of the same shape costs one
//! normalization pass and a hash lookup.
//!
//! Text that `sqlparser` cannot parse, or that is too large or too deeply
//! nested to hand it safely, still gets a fingerprint and a statement kind
//! from its leading keyword, with [`Analysis::parsed`] set to `false`.
//!
//! Name normalization follows each server's rules: PostgreSQL folds unquoted
//! identifiers to lower case and keeps quoted ones as written; MySQL keeps
//! table and schema names as written (they are case-sensitive with the
//! default `lower_case_table_names=0` on Linux) and compares column names
//! without regard to case, so columns are reported in lower case.

use std::fmt;
use std::sync::Arc;

mod fingerprint;
mod walk;

#[cfg(test)]
mod tests;

use fingerprint::{Shape, hash64, normalize};

/// Texts longer than this are fingerprinted but not parsed.
pub const MAX_PARSE_BYTES: usize = 1 << 20;
/// Texts with deeper parenthesis nesting are fingerprinted but not parsed.
pub const MAX_PARSE_DEPTH: u32 = 64;
/// Statements with more operator tokens than this are not parsed: a long
/// chain of binary operators becomes a deep syntax tree, whose recursive
/// traversal and destruction could exhaust the stack.
pub const MAX_PARSE_OPERATORS: u32 = 1_000;

/// The SQL dialect of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MySQL and MariaDB.
    MySql,
}

impl Dialect {
    fn seed(self) -> u64 {
        match self {
            Dialect::Postgres => 0x7067_7371_6c00_0001,
            Dialect::MySql => 0x6d79_7371_6c00_0002,
        }
    }
}

/// What a statement does, in broad classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatementKind {
    /// `SELECT`, `VALUES`, `TABLE`, and `WITH ... SELECT`.
    Select,
    /// `INSERT` (and MySQL `REPLACE`).
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// `MERGE`.
    Merge,
    /// Schema changes: `CREATE`, `ALTER`, `DROP`, `TRUNCATE`, `RENAME`, `COMMENT`.
    Ddl,
    /// PostgreSQL `COPY`.
    Copy,
    /// `BEGIN`, `START TRANSACTION`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE`.
    Transaction,
    /// Anything else (`SET`, `SHOW`, `EXPLAIN`, `GRANT`, `LISTEN`, ...).
    Other,
}

impl StatementKind {
    /// A short lowercase name, stable for metrics and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Update => "update",
            StatementKind::Delete => "delete",
            StatementKind::Merge => "merge",
            StatementKind::Ddl => "ddl",
            StatementKind::Copy => "copy",
            StatementKind::Transaction => "transaction",
            StatementKind::Other => "other",
        }
    }
}

impl fmt::Display for StatementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A table name, normalized per dialect (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// The schema (PostgreSQL) or database (MySQL) when the SQL names one.
    pub schema: Option<String>,
    /// The table name.
    pub name: String,
}

impl TableName {
    /// A table without schema.
    pub fn new(name: impl Into<String>) -> Self {
        TableName {
            schema: None,
            name: name.into(),
        }
    }

    /// A schema-qualified table.
    pub fn qualified(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: Some(schema.into()),
            name: name.into(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A column named by the SQL, with its table when the SQL makes it
/// unambiguous (a qualifier, or a single table in scope).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnRef {
    /// The table the column belongs to, when known.
    pub table: Option<TableName>,
    /// The column name.
    pub name: String,
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.table {
            Some(t) => write!(f, "{t}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What one statement reads and writes. Lists are sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementAnalysis {
    /// The statement kind.
    pub kind: StatementKind,
    /// Tables read, including those of subqueries and CTE bodies (CTE names
    /// themselves are not tables).
    pub tables_read: Vec<TableName>,
    /// Tables written (the target of DML, `COPY FROM`, or DDL).
    pub tables_written: Vec<TableName>,
    /// Columns read.
    pub columns_read: Vec<ColumnRef>,
    /// Columns written (`INSERT` column lists, `SET` targets, `COPY` columns).
    pub columns_written: Vec<ColumnRef>,
    /// A `*` or `t.*` appeared in a select list or `RETURNING`.
    pub wildcard: bool,
    /// The tables a `*` expands over: the named table of `t.*`, every table
    /// in scope for a bare `*`.
    pub wildcard_tables: Vec<TableName>,
}

impl StatementAnalysis {
    fn of_kind(kind: StatementKind) -> Self {
        StatementAnalysis {
            kind,
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            columns_read: Vec::new(),
            columns_written: Vec::new(),
            wildcard: false,
            wildcard_tables: Vec::new(),
        }
    }
}

/// Why a text was not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unparsed {
    /// Longer than [`MAX_PARSE_BYTES`].
    TooLong,
    /// Parentheses nested deeper than [`MAX_PARSE_DEPTH`].
    TooDeep,
    /// A statement with more than [`MAX_PARSE_OPERATORS`] operators.
    TooComplex,
    /// More statements than the analysis describes.
    TooManyStatements,
    /// `sqlparser` rejected the text.
    Syntax,
}

/// The analysis of one query text (one or more statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// The dialect used.
    pub dialect: Dialect,
    /// The 64-bit fingerprint of the normalized text.
    pub fingerprint: u64,
    /// The normalized text: literals as `?`, no comments, canonical spacing.
    pub normalized: String,
    /// `false` when the text was not parsed; then each statement carries
    /// only its kind from the leading keyword.
    pub parsed: bool,
    /// Why the text was not parsed, when it was not.
    pub unparsed: Option<Unparsed>,
    /// One entry per statement, in order.
    pub statements: Vec<StatementAnalysis>,
}

/// The fingerprint of a query text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Stable 64-bit hash of the dialect and the normalized text.
    pub hash: u64,
    /// The normalized text.
    pub normalized: String,
}

/// Computes the fingerprint of `sql` without parsing it.
pub fn fingerprint(sql: &str, dialect: Dialect) -> Fingerprint {
    let mut normalized = String::new();
    normalize(sql, dialect, &mut normalized);
    Fingerprint {
        hash: hash64(dialect.seed(), normalized.as_bytes()),
        normalized,
    }
}

/// Analyzes `sql` without a cache.
pub fn analyze(sql: &str, dialect: Dialect) -> Analysis {
    let mut normalized = String::new();
    let shape = normalize(sql, dialect, &mut normalized);
    let hash = hash64(dialect.seed(), normalized.as_bytes());
    analyze_shaped(sql, dialect, hash, normalized, &shape)
}

fn analyze_shaped(
    sql: &str,
    dialect: Dialect,
    fingerprint: u64,
    normalized: String,
    shape: &Shape,
) -> Analysis {
    let refusal = if sql.len() > MAX_PARSE_BYTES {
        Some(Unparsed::TooLong)
    } else if shape.max_depth > MAX_PARSE_DEPTH {
        Some(Unparsed::TooDeep)
    } else if shape
        .statements
        .iter()
        .any(|s| s.operators > MAX_PARSE_OPERATORS)
    {
        Some(Unparsed::TooComplex)
    } else if shape.dropped_statements > 0 {
        Some(Unparsed::TooManyStatements)
    } else {
        None
    };
    let parsed = match refusal {
        Some(_) => None,
        None => walk::parse_and_walk(sql, dialect, shape),
    };
    match parsed {
        Some(statements) => Analysis {
            dialect,
            fingerprint,
            normalized,
            parsed: true,
            unparsed: None,
            statements,
        },
        None => Analysis {
            dialect,
            fingerprint,
            normalized,
            parsed: false,
            unparsed: Some(refusal.unwrap_or(Unparsed::Syntax)),
            statements: shape
                .statements
                .iter()
                .map(|s| StatementAnalysis::of_kind(s.kind))
                .collect(),
        },
    }
}

/// Configuration of an [`Analyzer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalyzerConfig {
    /// Expected number of distinct query shapes kept (sizes the cache).
    /// Zero disables the cache.
    pub cache_entries: usize,
    /// Upper bound of the cache's memory, in estimated bytes.
    pub cache_bytes: u64,
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig {
            cache_entries: 10_000,
            cache_bytes: 32 << 20,
        }
    }
}

/// An invalid [`AnalyzerConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalyzerConfigError {
    /// `cache_entries` is above the supported maximum.
    #[error("cache_entries: {0} is above the maximum of 10000000")]
    TooManyEntries(usize),
    /// `cache_bytes` is zero while the cache is enabled.
    #[error("cache_bytes: must be positive when cache_entries is positive")]
    ZeroBytes,
}

#[derive(Clone)]
struct AnalysisWeighter;

impl quick_cache::Weighter<u64, Arc<Analysis>> for AnalysisWeighter {
    fn weight(&self, _key: &u64, val: &Arc<Analysis>) -> u64 {
        let mut w = 128 + val.normalized.len() as u64;
        for s in &val.statements {
            w += 96
                + 48 * (s.tables_read.len()
                    + s.tables_written.len()
                    + s.columns_read.len()
                    + s.columns_written.len()
                    + s.wildcard_tables.len()) as u64;
        }
        w
    }
}

type AnalysisCache = quick_cache::sync::Cache<u64, Arc<Analysis>, AnalysisWeighter>;

/// Analyzes queries with a bounded cache keyed by fingerprint. Shareable
/// between threads.
pub struct Analyzer {
    cache: Option<AnalysisCache>,
}

impl fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Analyzer")
            .field("cached", &self.len())
            .finish()
    }
}

impl Analyzer {
    /// Builds an analyzer after validating its configuration.
    pub fn new(config: &AnalyzerConfig) -> Result<Self, AnalyzerConfigError> {
        if config.cache_entries > 10_000_000 {
            return Err(AnalyzerConfigError::TooManyEntries(config.cache_entries));
        }
        if config.cache_entries == 0 {
            return Ok(Analyzer { cache: None });
        }
        if config.cache_bytes == 0 {
            return Err(AnalyzerConfigError::ZeroBytes);
        }
        Ok(Analyzer {
            cache: Some(quick_cache::sync::Cache::with_weighter(
                config.cache_entries,
                config.cache_bytes,
                AnalysisWeighter,
            )),
        })
    }

    /// Number of analyses in the cache.
    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Analyzes `sql`, from the cache when its shape was seen before.
    pub fn analyze(&self, sql: &str, dialect: Dialect) -> Arc<Analysis> {
        let mut normalized = String::new();
        let shape = normalize(sql, dialect, &mut normalized);
        let hash = hash64(dialect.seed(), normalized.as_bytes());
        let Some(cache) = &self.cache else {
            return Arc::new(analyze_shaped(sql, dialect, hash, normalized, &shape));
        };
        if let Some(hit) = cache.get(&hash)
            && hit.dialect == dialect
            && hit.normalized == normalized
        {
            return hit;
        }
        let analysis = Arc::new(analyze_shaped(sql, dialect, hash, normalized, &shape));
        cache.insert(hash, Arc::clone(&analysis));
        analysis
    }
}
