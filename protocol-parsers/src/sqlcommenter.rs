//! sqlcommenter: request context carried in a SQL comment.
//!
//! Applications (Rails query logs, Google's sqlcommenter packages,
//! OpenTelemetry's `instrumentation-pg`, Prisma, Datadog DBM) append a comment
//! such as `/*traceparent='00-...-01',route='%2Fcheckout'*/` to each
//! statement. [`extract`] reads it back: it takes the *last* block comment of
//! the text (comments inside string literals, quoted identifiers and
//! dollar-quoted bodies do not count, and neither do MySQL `/*! ... */`
//! executable comments and `/*+ ... */` optimizer hints), splits it into
//! `key='value'` pairs on commas outside quotes, unquotes, unescapes `\'`
//! and URL-decodes keys and values. It is lenient: unquoted `key=value` and
//! Marginalia's `key:value` are accepted, a value's closing quote is the one
//! followed by a comma or the end, and malformed pairs are skipped.
//!
//! The result is bounded ([`MAX_PAIRS`], [`MAX_KEY_LEN`], [`MAX_VALUE_LEN`])
//! and its `Debug` output never shows a transaction token.
//!
//! [`annotate`] is the emitter: sorted keys, URL-encoded, quoted, appended
//! before a trailing `;`, and nothing added when the statement already has a
//! comment.

use std::fmt;

use crate::sql::Dialect;

#[cfg(test)]
mod tests;

/// Pairs kept from one comment; later ones are dropped and counted.
pub const MAX_PAIRS: usize = 32;
/// Longest key kept, in bytes after decoding.
pub const MAX_KEY_LEN: usize = 128;
/// Longest value kept, in bytes after decoding (room for a transaction
/// token).
pub const MAX_VALUE_LEN: usize = 8192;
/// Longest comment body examined, in bytes.
pub const MAX_COMMENT_LEN: usize = 64 << 10;

/// The key/value pairs of a sqlcommenter comment, in comment order.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SqlComment {
    pairs: Vec<(String, String)>,
    dropped: usize,
}

impl fmt::Debug for SqlComment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.pairs {
            if is_txn_token_key(k) {
                m.entry(k, &format_args!("<redacted, {} bytes>", v.len()));
            } else {
                m.entry(k, v);
            }
        }
        m.finish()?;
        if self.dropped > 0 {
            write!(f, " (+{} dropped)", self.dropped)?;
        }
        Ok(())
    }
}

fn is_txn_token_key(k: &str) -> bool {
    k.eq_ignore_ascii_case("txn_token") || k.eq_ignore_ascii_case("txn-token")
}

impl SqlComment {
    /// The value of `key` (exact match; the first one when repeated).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All pairs, in comment order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of pairs kept.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no pair was found.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Pairs skipped because they were malformed, too long or too many.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// The W3C `traceparent`, when present and valid.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
            .and_then(|(_, v)| TraceParent::parse(v))
    }

    /// The raw transaction token (key `txn_token`, `txn-token` or
    /// `Txn-Token`, any case). Not verified here; never log it.
    pub fn txn_token(&self) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| is_txn_token_key(k))
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// Version; `0xff` is invalid.
    pub version: u8,
    /// Trace id, not all zero.
    pub trace_id: [u8; 16],
    /// Parent span id, not all zero.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses the header value; lowercase hex only, as the spec requires.
    pub fn parse(s: &str) -> Option<TraceParent> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) {
            return None;
        }
        if b.len() > 55 && b[55] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, out) in parent_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            version,
            trace_id,
            parent_id,
            flags,
        })
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    match two {
        [h, l] => Some(nib(*h)? << 4 | nib(*l)?),
        _ => None,
    }
}

/// What the lexer found in a SQL text.
struct Comments {
    /// Byte range of the last sqlcommenter candidate's body.
    last: Option<(usize, usize)>,
    /// Any comment at all (block or line).
    any: bool,
}

fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

fn skip_quoted(b: &[u8], i: usize, quote: u8, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        let c = b[j];
        if backslash && c == b'\\' {
            j += 2;
        } else if c == quote {
            if at(b, j + 1) == quote {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

fn scan_comments(sql: &str, dialect: Dialect) -> Comments {
    let b = sql.as_bytes();
    let mut out = Comments {
        last: None,
        any: false,
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        i = match c {
            b'\'' => {
                let backslash = dialect == Dialect::MySql
                    || (i > 0
                        && matches!(b[i - 1], b'e' | b'E')
                        && !is_word(at(b, i.wrapping_sub(2))));
                skip_quoted(b, i, b'\'', backslash)
            }
            b'"' => skip_quoted(b, i, b'"', dialect == Dialect::MySql),
            b'`' if dialect == Dialect::MySql => skip_quoted(b, i, b'`', false),
            b'$' if dialect == Dialect::Postgres => skip_dollar(b, i),
            b'-' if at(b, i + 1) == b'-' => {
                out.any = true;
                memchr::memchr(b'\n', &b[i..]).map_or(b.len(), |p| i + p + 1)
            }
            b'#' if dialect == Dialect::MySql => {
                out.any = true;
                memchr::memchr(b'\n', &b[i..]).map_or(b.len(), |p| i + p + 1)
            }
            b'/' if at(b, i + 1) == b'*' => {
                out.any = true;
                let nested = dialect == Dialect::Postgres;
                let (body_end, end) = block_end(b, i + 2, nested);
                let marker = at(b, i + 2);
                if !(marker == b'!' && dialect == Dialect::MySql) && marker != b'+' {
                    out.last = Some((i + 2, body_end));
                }
                end
            }
            _ => i + 1,
        };
    }
    out
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Returns (end of body, index after `*/`).
fn block_end(b: &[u8], start: usize, nested: bool) -> (usize, usize) {
    let mut depth = 1u32;
    let mut j = start;
    while j < b.len() {
        if b[j] == b'*' && at(b, j + 1) == b'/' {
            depth -= 1;
            if depth == 0 {
                return (j, j + 2);
            }
            j += 2;
        } else if nested && b[j] == b'/' && at(b, j + 1) == b'*' {
            depth = depth.saturating_add(1);
            j += 2;
        } else {
            j += 1;
        }
    }
    (b.len(), b.len())
}

fn skip_dollar(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    if at(b, j).is_ascii_digit() {
        return j;
    }
    while at(b, j).is_ascii_alphanumeric() || at(b, j) == b'_' {
        j += 1;
    }
    if at(b, j) != b'$' {
        return i + 1;
    }
    let delim = &b[i..=j];
    let body = j + 1;
    memchr::memmem::find(&b[body..], delim).map_or(b.len(), |p| body + p + delim.len())
}

/// Extracts the sqlcommenter pairs of `sql`, or `None` when its last
/// comment holds no pair.
pub fn extract(sql: &str, dialect: Dialect) -> Option<SqlComment> {
    let (start, end) = scan_comments(sql, dialect).last?;
    let body = sql.get(start..end)?;
    let parsed = parse_pairs(body);
    if parsed.pairs.is_empty() {
        None
    } else {
        Some(parsed)
    }
}

/// Parses the body of a comment (without `/*` and `*/`) into pairs.
pub fn parse_pairs(body: &str) -> SqlComment {
    let mut out = SqlComment::default();
    if body.len() > MAX_COMMENT_LEN {
        out.dropped = 1;
        return out;
    }
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        // Skip separators.
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        // Key: up to `=` or `:`, not crossing a comma.
        let key_start = i;
        while i < b.len() && !matches!(b[i], b'=' | b':' | b',') {
            i += 1;
        }
        if i >= b.len() || b[i] == b',' {
            // A word without a value: not a pair.
            out.dropped += 1;
            continue;
        }
        let key_raw = body.get(key_start..i).unwrap_or("").trim();
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() && b[i] != b'\n' {
            i += 1;
        }
        let (value, next) = if matches!(at(b, i), b'\'' | b'"') {
            quoted_value(body, i)
        } else {
            let end = memchr::memchr(b',', &b[i..]).map_or(b.len(), |p| i + p);
            (body.get(i..end).unwrap_or("").trim().to_string(), end)
        };
        i = next;
        let key = url_decode(key_raw);
        let value = url_decode(&value);
        let valid_key = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && !key_raw.chars().any(char::is_whitespace)
            && !key.chars().any(char::is_control);
        if !valid_key || value.len() > MAX_VALUE_LEN || out.pairs.len() >= MAX_PAIRS {
            out.dropped += 1;
            continue;
        }
        out.pairs.push((key, value));
    }
    out
}

/// Reads a quoted value starting at `i` (the quote). The closing quote is the
/// first unescaped one followed by optional spaces and a comma or the end.
/// Returns the unescaped (not yet URL-decoded) value and where to go on.
fn quoted_value(body: &str, i: usize) -> (String, usize) {
    let b = body.as_bytes();
    let quote = b[i];
    let mut j = i + 1;
    let mut close = None;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            c if c == quote => {
                let mut k = j + 1;
                while k < b.len() && b[k].is_ascii_whitespace() {
                    k += 1;
                }
                if k >= b.len() || b[k] == b',' {
                    close = Some((j, k));
                    break;
                }
                j += 1;
            }
            _ => j += 1,
        }
    }
    let (end, next) = close.unwrap_or((b.len(), b.len()));
    let raw = body.get(i + 1..end.max(i + 1)).unwrap_or("");
    let mut value = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => value.push(n),
                None => value.push('\\'),
            }
        } else {
            value.push(c);
        }
    }
    (value, next)
}

/// Percent-decodes `s`; invalid escapes are kept as they are, invalid UTF-8
/// is replaced.
pub fn url_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (hex_val(at(b, i + 1)), hex_val(at(b, i + 2)))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the
/// result cannot close a comment or a quote.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(c));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c & 15)]));
        }
    }
    out
}

/// Whether `sql` holds a comment of any kind (block, line, hint or
/// executable), outside literals and quoted identifiers: a statement
/// [`annotate`] leaves alone.
pub fn has_comment(sql: &str, dialect: Dialect) -> bool {
    scan_comments(sql, dialect).any
}

/// Appends a sqlcommenter comment with `pairs` to `sql` (sorted by key,
/// URL-encoded, quoted), before a trailing `;`. Returns `sql` unchanged when
/// it already has a comment or `pairs` is empty.
pub fn annotate(sql: &str, dialect: Dialect, pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() || scan_comments(sql, dialect).any {
        return sql.to_string();
    }
    let mut sorted: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (url_encode(k), url_encode(v).replace('\'', "\\'")))
        .collect();
    sorted.sort();
    let mut comment = String::from("/*");
    for (n, (k, v)) in sorted.iter().enumerate() {
        if n > 0 {
            comment.push(',');
        }
        comment.push_str(k);
        comment.push_str("='");
        comment.push_str(v);
        comment.push('\'');
    }
    comment.push_str("*/");
    let trimmed = sql.trim_end();
    let (head, tail) = match trimmed.strip_suffix(';') {
        Some(head) => (head.trim_end(), ";"),
        None => (trimmed, ""),
    };
    format!("{head} {comment}{tail}")
}
