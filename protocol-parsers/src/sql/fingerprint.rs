//! Tokenizer-level normalization: the fingerprint of a query shape, computed
//! in one pass over the raw text without `sqlparser`.
//!
//! The normalizer replaces literals (numbers, strings of every quoting
//! style, placeholders) with `?`, collapses lists of literals `(?, ?, ?)` and
//! repeated `VALUES` rows to one `(?)`, drops comments (except the SQL inside
//! MySQL `/*! ... */` executable comments), lowercases keywords (and, for
//! PostgreSQL, every unquoted identifier, which the server folds to lower
//! case anyway), keeps quoted identifiers verbatim, and rewrites whitespace to
//! a canonical spacing. The same pass records, per statement, the kind from
//! the leading keyword and the counts used to decide whether the text is safe
//! to hand to `sqlparser`.

use std::sync::OnceLock;

use super::{Dialect, StatementKind};

/// Statements beyond this count are fingerprinted but not described.
pub(crate) const MAX_STATEMENTS: usize = 256;

/// What the normalizer learnt about one statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatementShape {
    /// Kind from the leading keyword.
    pub(crate) kind: StatementKind,
    /// Binary-operator-like tokens: a bound on the depth of the expression
    /// tree `sqlparser` would build.
    pub(crate) operators: u32,
}

/// The result of one normalization pass.
#[derive(Debug, Default)]
pub(crate) struct Shape {
    /// One entry per non-empty statement, at most [`MAX_STATEMENTS`].
    pub(crate) statements: Vec<StatementShape>,
    /// Deepest parenthesis nesting seen.
    pub(crate) max_depth: u32,
    /// Statements seen beyond [`MAX_STATEMENTS`].
    pub(crate) dropped_statements: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Keyword,
    Ident,
    Value,
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Comma,
    Dot,
    Cast,
    Op,
    Other,
}

impl Tok {
    fn is_operand(self) -> bool {
        matches!(
            self,
            Tok::Ident | Tok::Value | Tok::Close | Tok::CloseBracket
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    Start,
    AfterWith(u32),
    Done(StatementKind),
}

struct ParenFrame {
    /// Position of the `(` in the output.
    out_pos: usize,
    /// Only `?` and `,` seen so far inside.
    only_values: bool,
    /// Number of `?` seen.
    values: u32,
}

struct Normalizer<'a> {
    sql: &'a str,
    bytes: &'a [u8],
    dialect: Dialect,
    out: &'a mut String,
    prev: Option<Tok>,
    parens: Vec<ParenFrame>,
    depth: u32,
    lead: Lead,
    operators: u32,
    stmt_has_tokens: bool,
    shape: Shape,
    /// Inside a MySQL `/*! ... */`: the next `*/` closes it.
    in_exec_comment: bool,
}

/// Normalizes `sql` into `out` (cleared first) and describes its statements.
pub(crate) fn normalize(sql: &str, dialect: Dialect, out: &mut String) -> Shape {
    out.clear();
    out.reserve(sql.len().min(1 << 20));
    let mut n = Normalizer {
        sql,
        bytes: sql.as_bytes(),
        dialect,
        out,
        prev: None,
        parens: Vec::new(),
        depth: 0,
        lead: Lead::Start,
        operators: 0,
        stmt_has_tokens: false,
        shape: Shape::default(),
        in_exec_comment: false,
    };
    n.run();
    n.shape
}

/// A stable 64-bit hash (multiply-mix over 8-byte words, finished with the
/// MurmurHash3 avalanche), so fingerprints are the same across processes.
pub(crate) fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_le_bytes(w);
        h = (h ^ v).wrapping_mul(K).rotate_left(31);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_continue(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn is_op_char(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
    )
}

impl Normalizer<'_> {
    fn at(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }

    fn run(&mut self) {
        let len = self.bytes.len();
        let mut i = 0;
        while i < len {
            let b = self.bytes[i];
            i = match b {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i + 1,
                b'-' if self.at(i + 1) == b'-' && self.dash_comment(i) => self.skip_line(i),
                b'#' if self.dialect == Dialect::MySql => self.skip_line(i),
                b'/' if self.at(i + 1) == b'*' => self.block_comment(i),
                b'*' if self.in_exec_comment && self.at(i + 1) == b'/' => {
                    self.in_exec_comment = false;
                    i + 2
                }
                b'\'' => {
                    let backslash = self.dialect == Dialect::MySql;
                    let end = self.quoted(i, b'\'', backslash);
                    self.emit_value();
                    end
                }
                b'"' if self.dialect == Dialect::MySql => {
                    let end = self.quoted(i, b'"', true);
                    self.emit_value();
                    end
                }
                b'"' => {
                    let end = self.quoted(i, b'"', false);
                    self.emit_verbatim(i, end, Tok::Ident);
                    end
                }
                b'`' if self.dialect == Dialect::MySql => {
                    let end = self.quoted(i, b'`', false);
                    self.emit_verbatim(i, end, Tok::Ident);
                    end
                }
                b'$' => self.dollar(i),
                b'?' => {
                    // `?|`, `?&` and `?-` are PostgreSQL operators; a bare
                    // `?` is a placeholder.
                    self.emit_value();
                    i + 1
                }
                b'0'..=b'9' => {
                    let end = self.number(i);
                    self.emit_value();
                    end
                }
                b'.' if self.at(i + 1).is_ascii_digit()
                    && !self.prev.is_some_and(Tok::is_operand) =>
                {
                    let end = self.number(i);
                    self.emit_value();
                    end
                }
                b'(' => {
                    self.open_paren();
                    i + 1
                }
                b')' => {
                    self.close_paren();
                    i + 1
                }
                b'[' => {
                    self.operators += 1;
                    self.emit_str("[", Tok::OpenBracket);
                    i + 1
                }
                b']' => {
                    self.emit_str("]", Tok::CloseBracket);
                    i + 1
                }
                b',' => {
                    self.emit_str(",", Tok::Comma);
                    i + 1
                }
                b'.' => {
                    self.emit_str(".", Tok::Dot);
                    i + 1
                }
                b';' => {
                    self.end_statement();
                    i + 1
                }
                b':' if self.at(i + 1) == b':' => {
                    self.operators += 1;
                    self.emit_str("::", Tok::Cast);
                    i + 2
                }
                b'+' | b'-'
                    if !self.prev.is_some_and(Tok::is_operand)
                        && (self.at(i + 1).is_ascii_digit()
                            || (self.at(i + 1) == b'.' && self.at(i + 2).is_ascii_digit())) =>
                {
                    // A signed literal: fold the sign into the value.
                    let end = self.number(i + 1);
                    self.emit_value();
                    end
                }
                _ if is_op_char(b) => self.operator(i),
                _ if is_ident_start(b) => self.word(i),
                _ => {
                    let end = i + 1;
                    self.emit_verbatim(i, end, Tok::Other);
                    end
                }
            };
        }
        self.end_statement();
    }

    /// MySQL needs a space or control character after `--`.
    fn dash_comment(&self, i: usize) -> bool {
        match self.dialect {
            Dialect::Postgres => true,
            Dialect::MySql => {
                let c = self.at(i + 2);
                c == 0 || c <= b' '
            }
        }
    }

    fn skip_line(&self, i: usize) -> usize {
        match memchr::memchr(b'\n', &self.bytes[i..]) {
            Some(p) => i + p + 1,
            None => self.bytes.len(),
        }
    }

    fn block_comment(&mut self, i: usize) -> usize {
        if self.dialect == Dialect::MySql && self.at(i + 2) == b'!' {
            // Executable comment: its content is SQL the server runs.
            let mut j = i + 3;
            while self.at(j).is_ascii_digit() {
                j += 1;
            }
            self.in_exec_comment = true;
            return j;
        }
        let nested = self.dialect == Dialect::Postgres;
        let mut depth = 1u32;
        let mut j = i + 2;
        let len = self.bytes.len();
        while j < len {
            let b = self.bytes[j];
            if b == b'*' && self.at(j + 1) == b'/' {
                depth -= 1;
                j += 2;
                if depth == 0 {
                    return j;
                }
            } else if nested && b == b'/' && self.at(j + 1) == b'*' {
                depth = depth.saturating_add(1);
                j += 2;
            } else {
                j += 1;
            }
        }
        len
    }

    /// Skips a quoted token starting at `i` (the opening quote); a doubled
    /// quote is an escaped quote, and with `backslash` a `\` escapes the
    /// next byte. Returns the index after the closing quote.
    fn quoted(&self, i: usize, quote: u8, backslash: bool) -> usize {
        let len = self.bytes.len();
        let mut j = i + 1;
        while j < len {
            let b = self.bytes[j];
            if backslash && b == b'\\' {
                j += 2;
            } else if b == quote {
                if self.at(j + 1) == quote {
                    j += 2;
                } else {
                    return j + 1;
                }
            } else {
                j += 1;
            }
        }
        len
    }

    fn dollar(&mut self, i: usize) -> usize {
        let next = self.at(i + 1);
        if next.is_ascii_digit() {
            // `$1` placeholder.
            let mut j = i + 1;
            while self.at(j).is_ascii_digit() {
                j += 1;
            }
            self.emit_value();
            return j;
        }
        if self.dialect == Dialect::Postgres {
            // `$tag$ ... $tag$` or `$$ ... $$`.
            let mut j = i + 1;
            if is_ident_start(self.at(j)) && self.at(j) < 0x80 {
                while self.at(j).is_ascii_alphanumeric() || self.at(j) == b'_' {
                    j += 1;
                }
            }
            if self.at(j) == b'$' {
                let delim = &self.bytes[i..=j];
                let body = j + 1;
                let end = memchr::memmem::find(&self.bytes[body..], delim)
                    .map_or(self.bytes.len(), |p| body + p + delim.len());
                self.emit_value();
                return end;
            }
        }
        self.emit_verbatim(i, i + 1, Tok::Other);
        i + 1
    }

    fn number(&self, i: usize) -> usize {
        let mut j = i;
        if self.at(j) == b'0' && matches!(self.at(j + 1), b'x' | b'X' | b'b' | b'B' | b'o' | b'O') {
            j += 2;
        }
        loop {
            let b = self.at(j);
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
                if (b == b'e' || b == b'E') && matches!(self.at(j + 1), b'+' | b'-') {
                    j += 2;
                } else {
                    j += 1;
                }
            } else {
                return j;
            }
        }
    }

    fn operator(&mut self, i: usize) -> usize {
        let mut j = i;
        while is_op_char(self.at(j)) {
            if j > i
                && ((self.at(j) == b'-' && self.at(j + 1) == b'-')
                    || (self.at(j) == b'/' && self.at(j + 1) == b'*')
                    || (self.dialect == Dialect::MySql && self.at(j) == b'#'))
            {
                break;
            }
            if self.in_exec_comment && self.at(j) == b'*' && self.at(j + 1) == b'/' {
                break;
            }
            // Leave a sign in front of a number to the literal: `1--1`.
            if j > i
                && matches!(self.at(j), b'-' | b'+')
                && (self.at(j + 1).is_ascii_digit() || self.at(j + 1) == b'.')
            {
                break;
            }
            j += 1;
        }
        if j == i {
            j = i + 1;
        }
        let op = &self.sql.get(i..j).unwrap_or("");
        if *op != "*" {
            self.operators += 1;
        }
        self.emit_verbatim(i, j, Tok::Op);
        j
    }

    fn word(&mut self, i: usize) -> usize {
        let mut j = i;
        while is_ident_continue(self.at(j)) {
            j += 1;
        }
        let word = &self.bytes[i..j];
        // String-literal prefixes: E'', B'', X'', N'', U&'' and MySQL
        // charset introducers such as _utf8mb4''.
        if self.at(j) == b'\'' {
            let is_prefix = matches!(
                word,
                [b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N']
            ) || (self.dialect == Dialect::MySql && word.first() == Some(&b'_'));
            if is_prefix {
                let backslash = self.dialect == Dialect::MySql || matches!(word, [b'e' | b'E']);
                let end = self.quoted(j, b'\'', backslash);
                self.emit_value();
                return end;
            }
        }
        if matches!(word, [b'u' | b'U']) && self.at(j) == b'&' && self.at(j + 1) == b'\'' {
            let end = self.quoted(j + 1, b'\'', false);
            self.emit_value();
            return end;
        }
        let mut lower = [0u8; 16];
        let packed = if word.len() <= lower.len() {
            let l = &mut lower[..word.len()];
            l.copy_from_slice(word);
            l.make_ascii_lowercase();
            Some(pack(l))
        } else {
            None
        };
        let keyword = packed.is_some_and(is_keyword);
        if keyword {
            let l = &lower[..word.len()];
            if packed.is_some_and(|p| operator_keywords().contains(&p)) {
                self.operators += 1;
            }
            self.note_word(Some(l));
            self.space_before(Tok::Keyword);
            // Keywords are ASCII: push the lowercase bytes.
            for &c in l {
                self.out.push(char::from(c));
            }
            self.prev = Some(Tok::Keyword);
            self.after_token(Tok::Keyword);
        } else {
            self.note_word(None);
            self.space_before(Tok::Ident);
            let text = self.sql.get(i..j).unwrap_or("");
            let start = self.out.len();
            self.out.push_str(text);
            if self.dialect == Dialect::Postgres {
                self.out[start..].make_ascii_lowercase();
            }
            self.prev = Some(Tok::Ident);
            self.after_token(Tok::Ident);
        }
        j
    }

    /// Tracks the leading keyword of the statement.
    fn note_word(&mut self, keyword: Option<&[u8]>) {
        match self.lead {
            Lead::Start => {
                self.lead = match keyword {
                    Some(b"with") => Lead::AfterWith(self.depth),
                    Some(k) => Lead::Done(kind_of_keyword(k)),
                    None => Lead::Done(StatementKind::Other),
                };
            }
            Lead::AfterWith(d) if d == self.depth => {
                if let Some(k) = keyword {
                    let kind = kind_of_keyword(k);
                    if matches!(
                        kind,
                        StatementKind::Select
                            | StatementKind::Insert
                            | StatementKind::Update
                            | StatementKind::Delete
                            | StatementKind::Merge
                    ) {
                        self.lead = Lead::Done(kind);
                    }
                }
            }
            _ => {}
        }
    }

    fn space_before(&mut self, cur: Tok) {
        self.stmt_has_tokens = true;
        let Some(prev) = self.prev else {
            if !self.out.is_empty() {
                self.out.push_str("; ");
            }
            return;
        };
        let no_space = matches!(
            cur,
            Tok::Close | Tok::Comma | Tok::Dot | Tok::CloseBracket | Tok::Cast | Tok::OpenBracket
        ) || matches!(prev, Tok::Open | Tok::Dot | Tok::OpenBracket | Tok::Cast)
            || (cur == Tok::Open && prev == Tok::Ident);
        if !no_space {
            self.out.push(' ');
        }
    }

    fn after_token(&mut self, tok: Tok) {
        if let Some(frame) = self.parens.last_mut() {
            match tok {
                Tok::Value => frame.values += 1,
                Tok::Comma => {}
                _ => frame.only_values = false,
            }
        }
    }

    fn emit_value(&mut self) {
        self.space_before(Tok::Value);
        self.out.push('?');
        self.prev = Some(Tok::Value);
        self.after_token(Tok::Value);
    }

    fn emit_str(&mut self, s: &str, tok: Tok) {
        self.space_before(tok);
        self.out.push_str(s);
        self.prev = Some(tok);
        self.after_token(tok);
    }

    fn emit_verbatim(&mut self, start: usize, end: usize, tok: Tok) {
        if matches!(self.lead, Lead::Start) && tok == Tok::Ident {
            self.lead = Lead::Done(StatementKind::Other);
        }
        self.space_before(tok);
        let s = self.sql.get(start..end).unwrap_or("");
        self.out.push_str(s);
        self.prev = Some(tok);
        self.after_token(tok);
    }

    fn open_paren(&mut self) {
        self.space_before(Tok::Open);
        if let Some(frame) = self.parens.last_mut() {
            frame.only_values = false;
        }
        self.parens.push(ParenFrame {
            out_pos: self.out.len(),
            only_values: true,
            values: 0,
        });
        self.out.push('(');
        self.prev = Some(Tok::Open);
        self.depth += 1;
        self.shape.max_depth = self.shape.max_depth.max(self.depth);
    }

    fn close_paren(&mut self) {
        self.space_before(Tok::Close);
        self.depth = self.depth.saturating_sub(1);
        match self.parens.pop() {
            Some(frame) if frame.only_values && frame.values > 0 => {
                self.out.truncate(frame.out_pos);
                self.out.push_str("(?)");
                // Repeated VALUES rows collapse to one.
                if self.out.ends_with("values (?), (?)") {
                    let keep = self.out.len() - ", (?)".len();
                    self.out.truncate(keep);
                }
            }
            _ => self.out.push(')'),
        }
        self.prev = Some(Tok::Close);
        if let Some(frame) = self.parens.last_mut() {
            frame.only_values = false;
        }
    }

    fn end_statement(&mut self) {
        if self.stmt_has_tokens {
            let kind = match self.lead {
                Lead::Done(kind) => kind,
                Lead::AfterWith(_) => StatementKind::Select,
                Lead::Start => StatementKind::Other,
            };
            if self.shape.statements.len() < MAX_STATEMENTS {
                self.shape.statements.push(StatementShape {
                    kind,
                    operators: self.operators,
                });
            } else {
                self.shape.dropped_statements += 1;
            }
        }
        self.prev = None;
        self.parens.clear();
        self.depth = 0;
        self.lead = Lead::Start;
        self.operators = 0;
        self.stmt_has_tokens = false;
    }
}

/// The statement kind a leading keyword announces.
pub(crate) fn kind_of_keyword(k: &[u8]) -> StatementKind {
    match k {
        b"select" | b"values" | b"table" => StatementKind::Select,
        b"insert" | b"replace" => StatementKind::Insert,
        b"update" => StatementKind::Update,
        b"delete" => StatementKind::Delete,
        b"merge" => StatementKind::Merge,
        b"create" | b"alter" | b"drop" | b"truncate" | b"comment" | b"rename" => StatementKind::Ddl,
        b"copy" => StatementKind::Copy,
        b"begin" | b"start" | b"commit" | b"rollback" | b"savepoint" | b"release" | b"end"
        | b"abort" | b"xa" => StatementKind::Transaction,
        _ => StatementKind::Other,
    }
}

/// Keywords the normalizer lowercases, sorted for binary search.
pub(super) const KEYWORDS: &[&[u8]] = &[
    b"abort",
    b"add",
    b"all",
    b"alter",
    b"analyze",
    b"and",
    b"any",
    b"array",
    b"as",
    b"asc",
    b"begin",
    b"between",
    b"by",
    b"call",
    b"cascade",
    b"case",
    b"cast",
    b"check",
    b"collate",
    b"column",
    b"comment",
    b"commit",
    b"conflict",
    b"constraint",
    b"copy",
    b"create",
    b"cross",
    b"current_date",
    b"current_time",
    b"current_user",
    b"deallocate",
    b"default",
    b"delete",
    b"desc",
    b"describe",
    b"distinct",
    b"div",
    b"do",
    b"drop",
    b"duplicate",
    b"else",
    b"end",
    b"escape",
    b"except",
    b"execute",
    b"exists",
    b"explain",
    b"false",
    b"fetch",
    b"first",
    b"for",
    b"foreign",
    b"from",
    b"full",
    b"grant",
    b"group",
    b"having",
    b"if",
    b"ignore",
    b"ilike",
    b"in",
    b"index",
    b"inner",
    b"insert",
    b"intersect",
    b"interval",
    b"into",
    b"is",
    b"join",
    b"key",
    b"lateral",
    b"left",
    b"like",
    b"limit",
    b"local",
    b"lock",
    b"locked",
    b"matched",
    b"merge",
    b"mod",
    b"natural",
    b"next",
    b"not",
    b"nothing",
    b"nowait",
    b"null",
    b"offset",
    b"on",
    b"only",
    b"or",
    b"order",
    b"outer",
    b"over",
    b"partition",
    b"prepare",
    b"primary",
    b"recursive",
    b"references",
    b"regexp",
    b"release",
    b"rename",
    b"replace",
    b"restrict",
    b"returning",
    b"revoke",
    b"right",
    b"rlike",
    b"rollback",
    b"row",
    b"rows",
    b"savepoint",
    b"select",
    b"session",
    b"set",
    b"share",
    b"show",
    b"similar",
    b"skip",
    b"some",
    b"start",
    b"straight_join",
    b"table",
    b"tables",
    b"then",
    b"to",
    b"transaction",
    b"true",
    b"truncate",
    b"union",
    b"unique",
    b"unlock",
    b"update",
    b"use",
    b"using",
    b"values",
    b"view",
    b"when",
    b"where",
    b"window",
    b"with",
    b"work",
    b"xa",
    b"xor",
];

/// Packs a word of at most 16 bytes into an integer (words have no NUL
/// bytes, so distinct words give distinct values).
const fn pack(s: &[u8]) -> u128 {
    let mut v = 0u128;
    let mut i = 0;
    while i < s.len() && i < 16 {
        v = (v << 8) | s[i] as u128;
        i += 1;
    }
    v
}

fn keyword_table() -> &'static [u128] {
    static TABLE: OnceLock<Vec<u128>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: Vec<u128> = KEYWORDS.iter().map(|k| pack(k)).collect();
        t.sort_unstable();
        t
    })
}

/// Keywords that join operands, counted with the operators.
fn operator_keywords() -> &'static [u128; 15] {
    const OPS: [u128; 15] = [
        pack(b"and"),
        pack(b"or"),
        pack(b"not"),
        pack(b"is"),
        pack(b"like"),
        pack(b"ilike"),
        pack(b"between"),
        pack(b"in"),
        pack(b"collate"),
        pack(b"similar"),
        pack(b"regexp"),
        pack(b"rlike"),
        pack(b"xor"),
        pack(b"div"),
        pack(b"mod"),
    ];
    &OPS
}

fn is_keyword(packed: u128) -> bool {
    keyword_table().binary_search(&packed).is_ok()
}
