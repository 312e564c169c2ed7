//! Data classification: which classes of sensitive data a result set holds.
//!
//! Evidence comes from two places. Column names (from `RowDescription`,
//! MySQL column definitions or the SQL) are normalized (`customerEmail`,
//! `customer_email` and `e_mail` all read as *email*) and matched against
//! per-class vocabularies. Row values are sampled within a per-query budget
//! (rows and bytes) and checked by validators: a single byte-class pass over
//! each value decides which validators can apply (only values with `@` go to
//! the email check, only digit-heavy ones to card, SSN and phone checks, and
//! so on), so most values cost one scan.
//!
//! Evidence is combined per class and column into a confidence in `[0, 1]`:
//! a name alone gives about 0.6, a validated value alone 0.4–0.95 depending
//! on how strong the validator is (a Luhn-checked card in a known issuer
//! range is strong; a formatted SSN or phone number is ambiguous without
//! context), both together 0.95 or more.
//!
//! Raw values are never kept: a [`Report`] holds classes, counts,
//! confidences and column names. [`salted_hash`] lets a caller that needs to
//! correlate values do so without storing them.
//!
//! Decisions worth knowing:
//! - A UUID is an identifier, not a secret, and a lowercase (or uppercase)
//!   hex digest is a hash, not a key: the high-entropy rule needs upper- and
//!   lowercase letters and digits, which neither has.
//! - A dotted quad such as `1.2.3.4` is reported as `network.ip` unless the
//!   column name says it is a version.
//! - A bare 9-digit number counts as an SSN, a bare digit string as a phone
//!   number and a date as a date of birth only when the column name says so.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

mod names;
mod values;

#[cfg(test)]
mod labelled;
#[cfg(test)]
mod tests;

pub use values::{iban_valid, luhn_valid};

/// A class of sensitive data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataClass {
    /// `pii.email`
    Email,
    /// `pii.phone`
    Phone,
    /// `pii.ssn` (US Social Security number)
    Ssn,
    /// `pii.name` (person names; column-name evidence only)
    Name,
    /// `pii.address`
    Address,
    /// `pii.dob` (date of birth)
    Dob,
    /// `financial.card` (payment card number)
    Card,
    /// `financial.iban`
    Iban,
    /// `secret.api_key` (API keys and other high-entropy tokens)
    ApiKey,
    /// `secret.jwt`
    Jwt,
    /// `secret.password_hash`
    PasswordHash,
    /// `network.ip`
    Ip,
    /// A class from configuration.
    Custom(Arc<str>),
}

/// The built-in classes, in a fixed order (their index is their bit).
const BUILTIN: [DataClass; 12] = [
    DataClass::Email,
    DataClass::Phone,
    DataClass::Ssn,
    DataClass::Name,
    DataClass::Address,
    DataClass::Dob,
    DataClass::Card,
    DataClass::Iban,
    DataClass::ApiKey,
    DataClass::Jwt,
    DataClass::PasswordHash,
    DataClass::Ip,
];

impl DataClass {
    /// The class name, such as `pii.email`.
    pub fn as_str(&self) -> &str {
        match self {
            DataClass::Email => "pii.email",
            DataClass::Phone => "pii.phone",
            DataClass::Ssn => "pii.ssn",
            DataClass::Name => "pii.name",
            DataClass::Address => "pii.address",
            DataClass::Dob => "pii.dob",
            DataClass::Card => "financial.card",
            DataClass::Iban => "financial.iban",
            DataClass::ApiKey => "secret.api_key",
            DataClass::Jwt => "secret.jwt",
            DataClass::PasswordHash => "secret.password_hash",
            DataClass::Ip => "network.ip",
            DataClass::Custom(name) => name,
        }
    }

    /// The built-in class with this name.
    pub fn builtin(name: &str) -> Option<DataClass> {
        BUILTIN.iter().find(|c| c.as_str() == name).cloned()
    }

    fn bit(&self) -> Option<u16> {
        let index = match self {
            DataClass::Email => 0,
            DataClass::Phone => 1,
            DataClass::Ssn => 2,
            DataClass::Name => 3,
            DataClass::Address => 4,
            DataClass::Dob => 5,
            DataClass::Card => 6,
            DataClass::Iban => 7,
            DataClass::ApiKey => 8,
            DataClass::Jwt => 9,
            DataClass::PasswordHash => 10,
            DataClass::Ip => 11,
            DataClass::Custom(_) => return None,
        };
        Some(1 << index)
    }
}

impl fmt::Display for DataClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of built-in classes, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ClassSet(pub(crate) u16);

impl ClassSet {
    pub(crate) fn add(&mut self, class: &DataClass) {
        if let Some(b) = class.bit() {
            self.0 |= b;
        }
    }

    pub(crate) fn has(self, class: &DataClass) -> bool {
        class.bit().is_some_and(|b| self.0 & b != 0)
    }

    fn iter(self) -> impl Iterator<Item = (usize, &'static DataClass)> {
        BUILTIN
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
    }
}

/// A checksum a custom class's values must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Validator {
    /// No checksum.
    #[default]
    None,
    /// The Luhn check digit (over the value's digits).
    Luhn,
    /// The ISO 7064 mod-97 check used by IBANs.
    Mod97,
}

impl Validator {
    /// Parses `none`, `luhn` or `mod97`.
    pub fn parse(s: &str) -> Option<Validator> {
        match s {
            "none" => Some(Validator::None),
            "luhn" => Some(Validator::Luhn),
            "mod97" => Some(Validator::Mod97),
            _ => None,
        }
    }
}

/// A class defined in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomClass {
    /// Its name, such as `pii.employee_id` (lowercase letters, digits, `.`,
    /// `_`, `-`).
    pub name: String,
    /// A regular expression matched against normalized column names
    /// (lowercase, `_` between words), if any.
    pub column_regex: Option<String>,
    /// A regular expression a whole value must match, if any.
    pub value_regex: Option<String>,
    /// A checksum values must also pass.
    pub validator: Validator,
}

/// Configuration of a [`Classifier`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierConfig {
    /// Rows sampled per query at most.
    pub max_rows: u64,
    /// Value bytes sampled per query at most.
    pub max_bytes: u64,
    /// Findings below this confidence are left out of reports.
    pub min_confidence: f32,
    /// Classes from configuration.
    pub custom: Vec<CustomClass>,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            max_rows: 64,
            max_bytes: 64 << 10,
            min_confidence: 0.3,
            custom: Vec::new(),
        }
    }
}

/// An invalid [`ClassifierConfig`]; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `max_rows` or `max_bytes` is out of range.
    #[error("{field}: {reason}")]
    Budget {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// `min_confidence` is not in `[0, 1]`.
    #[error("min_confidence: must be between 0 and 1")]
    MinConfidence,
    /// A custom class has an invalid or duplicate name.
    #[error("custom[{index}].name: {reason}")]
    Name {
        /// Position in `custom`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A custom class has neither a column nor a value pattern.
    #[error("custom[{index}]: needs column_regex or value_regex")]
    NoPattern {
        /// Position in `custom`.
        index: usize,
    },
    /// A regular expression does not compile.
    #[error("custom[{index}].{field}: {message}")]
    Regex {
        /// Position in `custom`.
        index: usize,
        /// `column_regex` or `value_regex`.
        field: &'static str,
        /// The compiler's message.
        message: String,
    },
    /// Too many custom classes.
    #[error("custom: at most {max} classes")]
    TooManyCustom {
        /// The maximum.
        max: usize,
    },
}

/// Upper bounds accepted for the budget and custom classes.
const MAX_ROWS_LIMIT: u64 = 1_000_000;
const MAX_BYTES_LIMIT: u64 = 256 << 20;
const MAX_CUSTOM: usize = 64;

struct CompiledCustom {
    class: DataClass,
    column: Option<regex::Regex>,
    value: Option<regex::bytes::Regex>,
    validator: Validator,
}

/// Classifies result sets. Build once from configuration, share between
/// sessions, and [`start`](Classifier::start) one accumulator per query.
pub struct Classifier {
    max_rows: u64,
    max_bytes: u64,
    min_confidence: f32,
    custom: Vec<CompiledCustom>,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("max_rows", &self.max_rows)
            .field("max_bytes", &self.max_bytes)
            .field("min_confidence", &self.min_confidence)
            .field("custom", &self.custom.len())
            .finish()
    }
}

fn compile_regex(
    index: usize,
    field: &'static str,
    pattern: &str,
) -> Result<regex::Regex, ConfigError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ConfigError::Regex {
            index,
            field,
            message: e.to_string(),
        })
}

impl Classifier {
    /// Builds a classifier after validating `config`.
    pub fn new(config: &ClassifierConfig) -> Result<Self, ConfigError> {
        if config.max_rows == 0 || config.max_rows > MAX_ROWS_LIMIT {
            return Err(ConfigError::Budget {
                field: "max_rows",
                reason: "must be between 1 and 1000000",
            });
        }
        if config.max_bytes == 0 || config.max_bytes > MAX_BYTES_LIMIT {
            return Err(ConfigError::Budget {
                field: "max_bytes",
                reason: "must be between 1 and 268435456",
            });
        }
        if !(0.0..=1.0).contains(&config.min_confidence) {
            return Err(ConfigError::MinConfidence);
        }
        if config.custom.len() > MAX_CUSTOM {
            return Err(ConfigError::TooManyCustom { max: MAX_CUSTOM });
        }
        let mut custom: Vec<CompiledCustom> = Vec::new();
        for (index, c) in config.custom.iter().enumerate() {
            let valid_name = !c.name.is_empty()
                && c.name.len() <= 64
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
            if !valid_name {
                return Err(ConfigError::Name {
                    index,
                    reason: "use 1 to 64 lowercase letters, digits, '.', '_' or '-'",
                });
            }
            if DataClass::builtin(&c.name).is_some()
                || custom.iter().any(|k| k.class.as_str() == c.name)
            {
                return Err(ConfigError::Name {
                    index,
                    reason: "duplicate class name",
                });
            }
            if c.column_regex.is_none() && c.value_regex.is_none() {
                return Err(ConfigError::NoPattern { index });
            }
            let column = c
                .column_regex
                .as_deref()
                .map(|p| compile_regex(index, "column_regex", p))
                .transpose()?;
            let value = c
                .value_regex
                .as_deref()
                .map(|p| {
                    // Values must match whole.
                    regex::bytes::RegexBuilder::new(&format!("^(?:{p})$"))
                        .size_limit(1 << 20)
                        .build()
                        .map_err(|e| ConfigError::Regex {
                            index,
                            field: "value_regex",
                            message: e.to_string(),
                        })
                })
                .transpose()?;
            custom.push(CompiledCustom {
                class: DataClass::Custom(Arc::from(c.name.as_str())),
                column,
                value,
                validator: c.validator,
            });
        }
        Ok(Classifier {
            max_rows: config.max_rows,
            max_bytes: config.max_bytes,
            min_confidence: config.min_confidence,
            custom,
        })
    }

    /// Starts classifying one result set with these column names.
    pub fn start<S: AsRef<str>>(&self, column_names: &[S]) -> Accumulator<'_> {
        self.start_prepared(&self.prepare(column_names))
    }

    /// Reads column names once (normalization and name evidence), for
    /// result sets that come back with the same columns many times: a
    /// prepared statement executed in a loop.
    pub fn prepare<S: AsRef<str>>(&self, column_names: &[S]) -> PreparedColumns {
        let columns = column_names
            .iter()
            .map(|n| {
                let name = n.as_ref();
                let normalized = names::normalize(name);
                ColumnTemplate {
                    name: name.chars().take(128).collect(),
                    evidence: names::evidence(&normalized),
                    custom_names: self
                        .custom
                        .iter()
                        .map(|c| c.column.as_ref().is_some_and(|r| r.is_match(&normalized)))
                        .collect(),
                }
            })
            .collect();
        PreparedColumns { columns }
    }

    /// Starts classifying one result set whose columns were prepared by
    /// this classifier.
    pub fn start_prepared(&self, prepared: &PreparedColumns) -> Accumulator<'_> {
        let columns = prepared
            .columns
            .iter()
            .map(|t| ColumnState {
                name: t.name.clone(),
                evidence: t.evidence,
                non_null: 0,
                hits: [0; BUILTIN.len()],
                custom_names: t.custom_names.clone(),
                custom_hits: vec![0; self.custom.len()],
            })
            .collect();
        Accumulator {
            classifier: self,
            columns,
            rows_seen: 0,
            rows_sampled: 0,
            bytes_sampled: 0,
        }
    }

    /// Classifies one value without context (no column name): the built-in
    /// classes whose validators accept it.
    pub fn classify_value(value: &[u8]) -> Vec<DataClass> {
        let set = values::detect(value, &names::Evidence::default());
        set.iter().map(|(_, c)| c.clone()).collect()
    }
}

/// Column names read once by [`Classifier::prepare`].
#[derive(Debug, Clone)]
pub struct PreparedColumns {
    columns: Arc<[ColumnTemplate]>,
}

impl PreparedColumns {
    /// How many columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }
}

#[derive(Debug)]
struct ColumnTemplate {
    name: String,
    evidence: names::Evidence,
    custom_names: Vec<bool>,
}

struct ColumnState {
    name: String,
    evidence: names::Evidence,
    non_null: u64,
    hits: [u64; BUILTIN.len()],
    custom_names: Vec<bool>,
    custom_hits: Vec<u64>,
}

/// Collects evidence for one result set within the sampling budget.
pub struct Accumulator<'c> {
    classifier: &'c Classifier,
    columns: Vec<ColumnState>,
    rows_seen: u64,
    rows_sampled: u64,
    bytes_sampled: u64,
}

impl fmt::Debug for Accumulator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accumulator")
            .field("columns", &self.columns.len())
            .field("rows_seen", &self.rows_seen)
            .field("rows_sampled", &self.rows_sampled)
            .field("bytes_sampled", &self.bytes_sampled)
            .finish()
    }
}

/// Values longer than this are counted but not examined.
const MAX_VALUE_EXAMINED: usize = 4095;

impl Accumulator<'_> {
    /// Whether the sampling budget is spent (later rows are only counted).
    pub fn budget_spent(&self) -> bool {
        self.rows_sampled >= self.classifier.max_rows
            || self.bytes_sampled >= self.classifier.max_bytes
    }

    /// Observes one row: one entry per column, `None` for NULL. Extra
    /// values beyond the column count are ignored.
    pub fn observe_row(&mut self, row: &[Option<&[u8]>]) {
        self.rows_seen += 1;
        if self.budget_spent() {
            return;
        }
        self.rows_sampled += 1;
        for (col, value) in self.columns.iter_mut().zip(row) {
            let Some(value) = value else {
                continue;
            };
            col.non_null += 1;
            self.bytes_sampled += value.len() as u64;
            if value.len() > MAX_VALUE_EXAMINED {
                continue;
            }
            let set = values::detect(value, &col.evidence);
            for (i, _) in set.iter() {
                col.hits[i] += 1;
            }
            for (k, custom) in self.classifier.custom.iter().enumerate() {
                if let Some(re) = &custom.value
                    && re.is_match(value)
                    && values::validate(custom.validator, value)
                {
                    col.custom_hits[k] += 1;
                }
            }
        }
    }

    /// Combines the evidence into findings, one per class, strongest first.
    pub fn finish(self) -> Report {
        let mut findings: Vec<ClassFinding> = Vec::new();
        let mut add = |class: &DataClass, confidence: f32, count: u64, column: &str| match findings
            .iter_mut()
            .find(|f| &f.class == class)
        {
            Some(f) => {
                f.confidence = f.confidence.max(confidence);
                f.count += count;
                if !f.columns.iter().any(|c| c == column) {
                    f.columns.push(column.to_string());
                }
            }
            None => findings.push(ClassFinding {
                class: class.clone(),
                confidence,
                count,
                columns: vec![column.to_string()],
            }),
        };
        for col in &self.columns {
            for (i, class) in BUILTIN.iter().enumerate() {
                let named = col.evidence.classes.has(class);
                let hits = col.hits[i];
                if let Some(conf) = combine(class, named, hits, col.non_null) {
                    add(class, conf, hits, &col.name);
                }
            }
            for (k, custom) in self.classifier.custom.iter().enumerate() {
                let named = col.custom_names.get(k).copied().unwrap_or(false);
                let hits = col.custom_hits.get(k).copied().unwrap_or(0);
                let value_conf = match custom.validator {
                    Validator::None => 0.6,
                    _ => 0.8,
                };
                let conf = match (named, hits > 0) {
                    (true, true) => Some(0.95),
                    (false, true) => Some(value_conf),
                    (true, false) if custom.value.is_some() && col.non_null >= 5 => Some(0.3),
                    (true, false) => Some(0.6),
                    (false, false) => None,
                };
                if let Some(conf) = conf {
                    add(&custom.class, conf, hits, &col.name);
                }
            }
        }
        let min = self.classifier.min_confidence;
        findings.retain(|f| f.confidence >= min);
        findings.sort_by(|a, b| {
            b.confidence
                .total_cmp(&a.confidence)
                .then_with(|| a.class.cmp(&b.class))
        });
        Report {
            findings,
            rows_seen: self.rows_seen,
            rows_sampled: self.rows_sampled,
            bytes_sampled: self.bytes_sampled,
        }
    }
}

/// Confidence of a built-in class for one column, from its name evidence
/// and the number of sampled values that passed the class's validator.
fn combine(class: &DataClass, named: bool, hits: u64, non_null: u64) -> Option<f32> {
    let value_strength: f32 = match class {
        DataClass::Email => 0.9,
        DataClass::Jwt => 0.95,
        DataClass::PasswordHash => 0.95,
        DataClass::Iban => 0.9,
        DataClass::Card => 0.85,
        DataClass::ApiKey => 0.7,
        DataClass::Ip => 0.8,
        DataClass::Address => 0.5,
        // Formatted SSNs and phone numbers look like many other things.
        DataClass::Ssn | DataClass::Phone => 0.4,
        // Only found with name evidence.
        DataClass::Dob | DataClass::Name => 0.6,
        DataClass::Custom(_) => 0.6,
    };
    let name_strength: f32 = match class {
        DataClass::Name | DataClass::Dob | DataClass::Ssn | DataClass::Card => 0.7,
        _ => 0.6,
    };
    let has_validator = !matches!(class, DataClass::Name);
    match (named, hits > 0) {
        (true, true) => Some(value_strength.max(0.95) + 0.02 * (hits.min(2) as f32)),
        (false, true) => Some(value_strength),
        // The name says so, but many sampled values say otherwise.
        (true, false) if has_validator && non_null >= 5 => Some(0.3),
        (true, false) => Some(name_strength),
        (false, false) => None,
    }
    .map(|c| c.min(1.0))
}

/// One class found in a result set. Holds no values.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassFinding {
    /// The class.
    pub class: DataClass,
    /// Confidence in `[0, 1]`.
    pub confidence: f32,
    /// Sampled values that passed the class's validator (0 for name-only
    /// evidence).
    pub count: u64,
    /// The columns the evidence came from.
    pub columns: Vec<String>,
}

/// The classification of one result set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// Findings, strongest first.
    pub findings: Vec<ClassFinding>,
    /// Rows observed.
    pub rows_seen: u64,
    /// Rows whose values were examined (within the budget).
    pub rows_sampled: u64,
    /// Value bytes examined.
    pub bytes_sampled: u64,
}

impl Report {
    /// The finding for `class`, if any.
    pub fn get(&self, class: &DataClass) -> Option<&ClassFinding> {
        self.findings.iter().find(|f| &f.class == class)
    }
}

/// A salted, truncated SHA-256 of a value, for correlating values without
/// keeping them: `SHA-256(len(salt) || salt || value)[..16]`.
pub fn salted_hash(salt: &[u8], value: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update((salt.len() as u64).to_be_bytes());
    h.update(salt);
    h.update(value);
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}
