//! The syntax-tree walk: statements, queries and table factors are walked
//! explicitly (they define scopes and say whether a table is read or
//! written); expressions are scanned with `sqlparser`'s visitor, which finds
//! column references and hands nested queries back to the walker.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Assignment, AssignmentTarget, ConflictTarget, CopySource, Delete, Expr, FromTable, Ident,
    Insert, JoinConstraint, JoinOperator, Merge, MergeAction, MergeUpdateKind, ObjectName,
    ObjectNamePart, ObjectType, OnConflictAction, OnInsert, Query, Select, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, Statement, TableFactor, TableObject, TableWithJoins,
    Update, UpdateTableFromKind, Visit, Visitor,
};
use sqlparser::dialect::{MySqlDialect, PostgreSqlDialect};
use sqlparser::parser::Parser;

use super::fingerprint::Shape;
use super::{ColumnRef, Dialect, StatementAnalysis, StatementKind, TableName};

/// Deepest nesting of queries and statements the walker follows.
const MAX_WALK_DEPTH: u32 = 128;

/// `sqlparser`'s own recursion limit, above what [`super::MAX_PARSE_DEPTH`]
/// lets through (its default of 50 refuses legitimate nesting).
const PARSER_RECURSION_LIMIT: usize = 16 * super::MAX_PARSE_DEPTH as usize;

/// Parses `sql` and analyzes each statement; `None` when it does not parse.
pub(super) fn parse_and_walk(
    sql: &str,
    dialect: Dialect,
    shape: &Shape,
) -> Option<Vec<StatementAnalysis>> {
    let parsed = match dialect {
        Dialect::Postgres => Parser::new(&PostgreSqlDialect {})
            .with_recursion_limit(PARSER_RECURSION_LIMIT)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements()),
        Dialect::MySql => Parser::new(&MySqlDialect {})
            .with_recursion_limit(PARSER_RECURSION_LIMIT)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements()),
    };
    let statements = parsed.ok()?;
    let same_count = statements.len() == shape.statements.len();
    Some(
        statements
            .iter()
            .enumerate()
            .map(|(i, stmt)| {
                let fallback = if same_count {
                    shape.statements.get(i).map(|s| s.kind)
                } else {
                    None
                };
                analyze_statement(stmt, dialect, fallback)
            })
            .collect(),
    )
}

fn analyze_statement(
    stmt: &Statement,
    dialect: Dialect,
    fallback: Option<StatementKind>,
) -> StatementAnalysis {
    let mut w = Walker {
        dialect,
        scopes: Vec::new(),
        ctes: Vec::new(),
        depth: 0,
        acc: Acc::default(),
    };
    let kind = w
        .statement(stmt)
        .or(fallback)
        .unwrap_or(StatementKind::Other);
    w.acc.finish(kind)
}

#[derive(Default)]
struct Acc {
    read: BTreeSet<TableName>,
    written: BTreeSet<TableName>,
    cols_read: BTreeSet<ColumnRef>,
    cols_written: BTreeSet<ColumnRef>,
    wildcard: bool,
    wildcard_tables: BTreeSet<TableName>,
}

impl Acc {
    fn finish(self, kind: StatementKind) -> StatementAnalysis {
        StatementAnalysis {
            kind,
            tables_read: self.read.into_iter().collect(),
            tables_written: self.written.into_iter().collect(),
            columns_read: self.cols_read.into_iter().collect(),
            columns_written: self.cols_written.into_iter().collect(),
            wildcard: self.wildcard,
            wildcard_tables: self.wildcard_tables.into_iter().collect(),
        }
    }
}

/// A name visible in a `FROM` scope.
struct Entry {
    /// The alias, or the table's own name.
    key: String,
    /// Whether `key` is an alias (then a schema-qualified reference does
    /// not match it).
    aliased: bool,
    /// The base table, or `None` for a derived table, CTE or function.
    table: Option<TableName>,
}

#[derive(Default)]
struct Scope {
    entries: Vec<Entry>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

struct Walker {
    dialect: Dialect,
    scopes: Vec<Scope>,
    ctes: Vec<Vec<String>>,
    depth: u32,
    acc: Acc,
}

impl Walker {
    fn enter(&mut self) -> bool {
        if self.depth >= MAX_WALK_DEPTH {
            return false;
        }
        self.depth += 1;
        true
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    // ---- names ----

    fn ident(&self, id: &Ident) -> String {
        if id.quote_style.is_some() || self.dialect == Dialect::MySql {
            id.value.clone()
        } else {
            id.value.to_lowercase()
        }
    }

    fn column_name(&self, id: &Ident) -> String {
        match (self.dialect, id.quote_style) {
            (Dialect::MySql, _) | (Dialect::Postgres, None) => id.value.to_lowercase(),
            (Dialect::Postgres, Some(_)) => id.value.clone(),
        }
    }

    fn keys_match(&self, a: &str, b: &str) -> bool {
        match self.dialect {
            Dialect::Postgres => a == b,
            Dialect::MySql => a.eq_ignore_ascii_case(b),
        }
    }

    fn idents<'a>(&self, name: &'a ObjectName) -> Option<Vec<&'a Ident>> {
        name.0
            .iter()
            .map(|p| match p {
                ObjectNamePart::Identifier(id) => Some(id),
                ObjectNamePart::Function(_) => None,
            })
            .collect()
    }

    fn table_name(&self, name: &ObjectName) -> Option<TableName> {
        let parts = self.idents(name)?;
        let (last, rest) = parts.split_last()?;
        Some(TableName {
            schema: rest.last().map(|s| self.ident(s)),
            name: self.ident(last),
        })
    }

    fn is_cte(&self, name: &ObjectName) -> bool {
        let [ObjectNamePart::Identifier(id)] = name.0.as_slice() else {
            return false;
        };
        let key = self.ident(id);
        self.ctes
            .iter()
            .rev()
            .any(|frame| frame.iter().any(|c| self.keys_match(c, &key)))
    }

    // ---- scopes and resolution ----

    fn add_entry(&mut self, entry: Entry) {
        if self.scopes.is_empty() {
            self.scopes.push(Scope::default());
        }
        if let Some(scope) = self.scopes.last_mut() {
            scope.entries.push(entry);
        }
    }

    /// Resolves a qualifier (`t`, `s.t`) to what it names: `Some(Some(t))`
    /// for a base table, `Some(None)` for a derived table, `None` when
    /// nothing in scope matches.
    fn resolve_qualifier(&self, qualifier: &[&Ident]) -> Option<Option<TableName>> {
        match qualifier {
            [] => None,
            [one] => {
                let key = self.ident(one);
                for scope in self.scopes.iter().rev() {
                    if let Some(e) = scope.entries.iter().find(|e| self.keys_match(&e.key, &key)) {
                        return Some(e.table.clone());
                    }
                }
                None
            }
            [.., schema, table] => {
                let want = TableName {
                    schema: Some(self.ident(schema)),
                    name: self.ident(table),
                };
                for scope in self.scopes.iter().rev() {
                    if let Some(e) = scope
                        .entries
                        .iter()
                        .find(|e| !e.aliased && e.table.as_ref() == Some(&want))
                    {
                        return Some(e.table.clone());
                    }
                }
                Some(Some(want))
            }
        }
    }

    fn resolve_column(&self, qualifier: &[&Ident], col: &Ident) -> ColumnRef {
        let name = self.column_name(col);
        let table = if qualifier.is_empty() {
            self.scopes
                .iter()
                .rev()
                .find(|s| !s.entries.is_empty())
                .and_then(|s| match s.entries.as_slice() {
                    [only] => only.table.clone(),
                    _ => None,
                })
        } else {
            self.resolve_qualifier(qualifier).flatten()
        };
        ColumnRef { table, name }
    }

    fn column_read(&mut self, qualifier: &[&Ident], col: &Ident) {
        // MySQL reads "..." as a string literal (without ANSI_QUOTES).
        if self.dialect == Dialect::MySql && col.quote_style == Some('"') {
            return;
        }
        // `VALUES (DEFAULT)` reaches here as an identifier.
        if qualifier.is_empty()
            && col.quote_style.is_none()
            && col.value.eq_ignore_ascii_case("default")
        {
            return;
        }
        // A bare alias is a whole-row reference (`to_jsonb(o)`): all columns
        // of its table are read. (A bare table name is left a column name,
        // since PostgreSQL resolves columns first.)
        if qualifier.is_empty() && col.quote_style.is_none() {
            let key = self.ident(col);
            let row = self.scopes.iter().rev().find_map(|s| {
                s.entries
                    .iter()
                    .find(|e| e.aliased && e.table.is_some() && self.keys_match(&e.key, &key))
            });
            if let Some(entry) = row {
                let table = entry.table.clone();
                self.acc.wildcard = true;
                self.acc.wildcard_tables.extend(table);
                return;
            }
        }
        let c = self.resolve_column(qualifier, col);
        self.acc.cols_read.insert(c);
    }

    fn column_written(&mut self, name: &ObjectName) -> Option<TableName> {
        let parts = self.idents(name)?;
        let (col, qualifier) = parts.split_last()?;
        let c = self.resolve_column(qualifier, col);
        let table = c.table.clone();
        self.acc.cols_written.insert(c);
        table
    }

    fn star(&mut self, qualifier: Option<&ObjectName>) {
        self.acc.wildcard = true;
        match qualifier {
            None => {
                let tables: Vec<TableName> = self
                    .scopes
                    .last()
                    .map(|s| s.entries.iter().filter_map(|e| e.table.clone()).collect())
                    .unwrap_or_default();
                self.acc.wildcard_tables.extend(tables);
            }
            Some(name) => {
                let Some(parts) = self.idents(name) else {
                    return;
                };
                if let Some(Some(t)) = self.resolve_qualifier(&parts) {
                    self.acc.wildcard_tables.insert(t);
                }
            }
        }
    }

    fn scan<V: Visit>(&mut self, node: &V) {
        self.scan_skipping(node, &[]);
    }

    fn scan_skipping<V: Visit>(&mut self, node: &V, skip: &[String]) {
        let mut scan = ExprScan {
            walker: self,
            nested: 0,
            skip,
        };
        let _ = node.visit(&mut scan);
    }

    fn select_items(&mut self, items: &[SelectItem]) {
        for item in items {
            match item {
                SelectItem::UnnamedExpr(e)
                | SelectItem::ExprWithAlias { expr: e, .. }
                | SelectItem::ExprWithAliases { expr: e, .. } => self.scan(e),
                SelectItem::Wildcard(_) => self.star(None),
                SelectItem::QualifiedWildcard(kind, _) => match kind {
                    SelectItemQualifiedWildcardKind::ObjectName(name) => self.star(Some(name)),
                    SelectItemQualifiedWildcardKind::Expr(e) => {
                        self.acc.wildcard = true;
                        self.scan(e);
                    }
                },
            }
        }
    }

    // ---- statements ----

    fn statement(&mut self, stmt: &Statement) -> Option<StatementKind> {
        if !self.enter() {
            return None;
        }
        let kind = self.statement_inner(stmt);
        self.leave();
        kind
    }

    fn statement_inner(&mut self, stmt: &Statement) -> Option<StatementKind> {
        use StatementKind as K;
        Some(match stmt {
            Statement::Query(q) => {
                self.query(q);
                // `WITH ... INSERT/UPDATE/DELETE` is a query whose body is DML.
                match q.body.as_ref() {
                    SetExpr::Insert(_) => K::Insert,
                    SetExpr::Update(_) => K::Update,
                    SetExpr::Delete(_) => K::Delete,
                    SetExpr::Merge(_) => K::Merge,
                    _ => K::Select,
                }
            }
            Statement::Insert(ins) => {
                self.insert(ins);
                K::Insert
            }
            Statement::Update(u) => {
                self.update(u);
                K::Update
            }
            Statement::Delete(d) => {
                self.delete(d);
                K::Delete
            }
            Statement::Merge(m) => {
                self.merge(m);
                K::Merge
            }
            Statement::Copy { source, to, .. } => {
                match source {
                    CopySource::Table {
                        table_name,
                        columns,
                    } => {
                        if let Some(t) = self.table_name(table_name) {
                            for c in columns {
                                let col = ColumnRef {
                                    table: Some(t.clone()),
                                    name: self.column_name(c),
                                };
                                if *to {
                                    self.acc.cols_read.insert(col);
                                } else {
                                    self.acc.cols_written.insert(col);
                                }
                            }
                            if *to {
                                self.acc.read.insert(t);
                            } else {
                                self.acc.written.insert(t);
                            }
                        }
                    }
                    CopySource::Query(q) => self.query(q),
                }
                K::Copy
            }
            Statement::CreateTable(ct) => {
                self.write_name(&ct.name);
                if let Some(q) = &ct.query {
                    self.query(q);
                }
                if let Some(c) = &ct.clone {
                    self.read_name(c);
                }
                K::Ddl
            }
            Statement::CreateView(cv) => {
                self.write_name(&cv.name);
                self.query(&cv.query);
                K::Ddl
            }
            Statement::CreateIndex(ci) => {
                self.write_name(&ci.table_name);
                K::Ddl
            }
            Statement::AlterTable(at) => {
                self.write_name(&at.name);
                K::Ddl
            }
            Statement::Drop {
                object_type, names, ..
            } => {
                if matches!(
                    object_type,
                    ObjectType::Table | ObjectType::View | ObjectType::MaterializedView
                ) {
                    for n in names {
                        self.write_name(n);
                    }
                }
                K::Ddl
            }
            Statement::Truncate(t) => {
                for target in &t.table_names {
                    self.write_name(&target.name);
                }
                K::Ddl
            }
            Statement::RenameTable(renames) => {
                for r in renames {
                    self.write_name(&r.old_name);
                    self.write_name(&r.new_name);
                }
                K::Ddl
            }
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => K::Transaction,
            Statement::Explain { statement, .. } => {
                let _ = self.statement(statement);
                K::Other
            }
            _ => return None,
        })
    }

    fn write_name(&mut self, name: &ObjectName) {
        if let Some(t) = self.table_name(name) {
            self.acc.written.insert(t);
        }
    }

    fn read_name(&mut self, name: &ObjectName) {
        if let Some(t) = self.table_name(name) {
            self.acc.read.insert(t);
        }
    }

    fn assignments(&mut self, assignments: &[Assignment]) -> Vec<TableName> {
        let mut targets = Vec::new();
        for a in assignments {
            match &a.target {
                AssignmentTarget::ColumnName(n) => targets.extend(self.column_written(n)),
                AssignmentTarget::Tuple(ns) => {
                    for n in ns {
                        targets.extend(self.column_written(n));
                    }
                }
            }
            self.scan(&a.value);
        }
        targets
    }

    fn insert(&mut self, ins: &Insert) {
        if let Some(src) = &ins.source {
            // The source query does not see the target.
            self.query(src);
        }
        let target = match &ins.table {
            TableObject::TableName(n) => self.table_name(n),
            TableObject::TableFunction(f) => {
                self.scan(f);
                None
            }
            TableObject::TableQuery(q) => {
                self.query(q);
                None
            }
        };
        // PostgreSQL's `EXCLUDED` names the proposed row of the target; it
        // sits in an outer scope so unqualified names resolve to the target.
        self.scopes.push(Scope::default());
        if let Some(t) = &target
            && self.dialect == Dialect::Postgres
        {
            self.add_entry(Entry {
                key: "excluded".into(),
                aliased: true,
                table: Some(t.clone()),
            });
        }
        self.scopes.push(Scope::default());
        if let Some(t) = &target {
            self.acc.written.insert(t.clone());
            let (key, aliased) = match &ins.table_alias {
                Some(a) => (self.ident(&a.alias), true),
                None => (t.name.clone(), false),
            };
            self.add_entry(Entry {
                key,
                aliased,
                table: Some(t.clone()),
            });
        }
        for c in &ins.columns {
            let _ = self.column_written(c);
        }
        let _ = self.assignments(&ins.assignments);
        match &ins.on {
            Some(OnInsert::DuplicateKeyUpdate(a)) => {
                let _ = self.assignments(a);
            }
            Some(OnInsert::OnConflict(oc)) => {
                match &oc.conflict_target {
                    Some(ConflictTarget::Columns { columns, predicate }) => {
                        for c in columns {
                            self.column_read(&[], c);
                        }
                        if let Some(p) = predicate {
                            self.scan(p);
                        }
                    }
                    Some(ConflictTarget::OnConstraint(_)) | None => {}
                }
                if let OnConflictAction::DoUpdate(du) = &oc.action {
                    let _ = self.assignments(&du.assignments);
                    if let Some(sel) = &du.selection {
                        self.scan(sel);
                    }
                }
            }
            _ => {}
        }
        if let Some(r) = &ins.returning {
            self.select_items(r);
        }
        self.scopes.pop();
        self.scopes.pop();
    }

    fn update(&mut self, u: &Update) {
        self.scopes.push(Scope::default());
        let main = self.table_factor(&u.table.relation, Access::Write);
        for j in &u.table.joins {
            self.table_factor(&j.relation, Access::Read);
        }
        if let Some(from) = &u.from {
            let (UpdateTableFromKind::BeforeSet(tables) | UpdateTableFromKind::AfterSet(tables)) =
                from;
            for twj in tables {
                self.table_with_joins(twj);
            }
        }
        for j in &u.table.joins {
            self.join_constraint(&j.join_operator);
        }
        // Columns written: unqualified targets are the main table's.
        let scopes_before = self.scopes.len();
        let targets = if u.table.joins.is_empty() && main.is_some() {
            // Only the target is in the assignment scope.
            self.scopes.push(Scope::default());
            if let Some(t) = &main {
                self.add_entry(Entry {
                    key: t.name.clone(),
                    aliased: false,
                    table: Some(t.clone()),
                });
            }
            let targets = self.column_targets(&u.assignments);
            self.scopes.truncate(scopes_before);
            targets
        } else {
            self.column_targets(&u.assignments)
        };
        for t in targets {
            self.acc.read.remove(&t);
            self.acc.written.insert(t);
        }
        for a in &u.assignments {
            self.scan(&a.value);
        }
        if let Some(sel) = &u.selection {
            self.scan(sel);
        }
        if let Some(r) = &u.returning {
            self.select_items(r);
        }
        self.scan(&u.order_by);
        self.scopes.pop();
    }

    /// Records the written columns of `SET` targets and returns their tables.
    fn column_targets(&mut self, assignments: &[Assignment]) -> Vec<TableName> {
        let mut out = Vec::new();
        for a in assignments {
            let names: &[ObjectName] = match &a.target {
                AssignmentTarget::ColumnName(n) => std::slice::from_ref(n),
                AssignmentTarget::Tuple(ns) => ns,
            };
            for n in names {
                out.extend(self.column_written(n));
            }
        }
        out
    }

    fn delete(&mut self, d: &Delete) {
        self.scopes.push(Scope::default());
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
        if d.tables.is_empty() {
            let mut first = true;
            for twj in from {
                let access = if first { Access::Write } else { Access::Read };
                first = false;
                self.table_factor(&twj.relation, access);
                for j in &twj.joins {
                    self.table_factor(&j.relation, Access::Read);
                }
                for j in &twj.joins {
                    self.join_constraint(&j.join_operator);
                }
            }
        } else {
            // MySQL multi-table DELETE: the named tables (or aliases) are written.
            for twj in from {
                self.table_with_joins(twj);
            }
            for name in &d.tables {
                let Some(parts) = self.idents(name) else {
                    continue;
                };
                let target = match self.resolve_qualifier(&parts) {
                    Some(t) => t,
                    None => self.table_name(name),
                };
                if let Some(t) = target {
                    self.acc.read.remove(&t);
                    self.acc.written.insert(t);
                }
            }
        }
        if let Some(using) = &d.using {
            for twj in using {
                self.table_with_joins(twj);
            }
        }
        if let Some(sel) = &d.selection {
            self.scan(sel);
        }
        if let Some(r) = &d.returning {
            self.select_items(r);
        }
        self.scan(&d.order_by);
        self.scopes.pop();
    }

    fn merge(&mut self, m: &Merge) {
        self.scopes.push(Scope::default());
        let target = self.table_factor(&m.table, Access::Write);
        self.table_factor(&m.source, Access::Read);
        self.scan(m.on.as_ref());
        for clause in &m.clauses {
            if let Some(p) = &clause.predicate {
                self.scan(p);
            }
            match &clause.action {
                MergeAction::Insert(ins) => {
                    for c in &ins.columns {
                        let col = self.idents(c).and_then(|p| p.last().copied());
                        if let Some(col) = col {
                            let name = self.column_name(col);
                            self.acc.cols_written.insert(ColumnRef {
                                table: target.clone(),
                                name,
                            });
                        }
                    }
                    self.scan(&ins.kind);
                    if let Some(p) = &ins.insert_predicate {
                        self.scan(p);
                    }
                }
                MergeAction::Update(upd) => {
                    if let MergeUpdateKind::Set(assignments) = &upd.kind {
                        for a in assignments {
                            let names: &[ObjectName] = match &a.target {
                                AssignmentTarget::ColumnName(n) => std::slice::from_ref(n),
                                AssignmentTarget::Tuple(ns) => ns,
                            };
                            for n in names {
                                let col = self.idents(n).and_then(|p| p.last().copied());
                                if let Some(col) = col {
                                    let name = self.column_name(col);
                                    self.acc.cols_written.insert(ColumnRef {
                                        table: target.clone(),
                                        name,
                                    });
                                }
                            }
                            self.scan(&a.value);
                        }
                    }
                    if let Some(p) = &upd.update_predicate {
                        self.scan(p);
                    }
                    if let Some(p) = &upd.delete_predicate {
                        self.scan(p);
                    }
                }
                _ => {}
            }
        }
        self.scopes.pop();
    }

    // ---- queries ----

    fn query(&mut self, q: &Query) {
        if !self.enter() {
            return;
        }
        let with_frame = if let Some(with) = &q.with {
            let names = with
                .cte_tables
                .iter()
                .map(|c| self.ident(&c.alias.name))
                .collect();
            self.ctes.push(names);
            for cte in &with.cte_tables {
                self.query(&cte.query);
            }
            true
        } else {
            false
        };
        match q.body.as_ref() {
            SetExpr::Select(s) => self.select(s, Some(q)),
            other => {
                self.set_expr(other);
                if let Some(ob) = &q.order_by {
                    self.scan(ob);
                }
            }
        }
        if let Some(l) = &q.limit_clause {
            self.scan(l);
        }
        if with_frame {
            self.ctes.pop();
        }
        self.leave();
    }

    fn set_expr(&mut self, body: &SetExpr) {
        if !self.enter() {
            return;
        }
        match body {
            SetExpr::Select(s) => self.select(s, None),
            SetExpr::Query(q) => self.query(q),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            SetExpr::Values(v) => self.scan(v),
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
                let _ = self.statement(s);
            }
            SetExpr::Table(t) => {
                if let Some(name) = &t.table_name {
                    let table = TableName {
                        schema: t.schema_name.as_ref().map(|s| self.ident(s)),
                        name: self.ident(name),
                    };
                    self.acc.read.insert(table);
                }
            }
        }
        self.leave();
    }

    /// Walks a `SELECT`; `query` carries the `ORDER BY` that sees its scope.
    fn select(&mut self, s: &Select, query: Option<&Query>) {
        self.scopes.push(Scope::default());
        for twj in &s.from {
            self.table_with_joins(twj);
        }
        self.select_items(&s.projection);
        if let Some(e) = &s.prewhere {
            self.scan(e);
        }
        if let Some(e) = &s.selection {
            self.scan(e);
        }
        self.scan(&s.group_by);
        if let Some(e) = &s.having {
            self.scan(e);
        }
        if let Some(e) = &s.qualify {
            self.scan(e);
        }
        self.scan(&s.named_window);
        if let Some(into) = &s.into
            && self.dialect == Dialect::Postgres
        {
            // PostgreSQL `SELECT ... INTO new_table` creates a table.
            for target in &into.targets {
                let table = match target {
                    Expr::Identifier(id) => Some(TableName::new(self.ident(id))),
                    Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                        [.., schema, name] => {
                            Some(TableName::qualified(self.ident(schema), self.ident(name)))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                self.acc.written.extend(table);
            }
        }
        if let Some(ob) = query.and_then(|q| q.order_by.as_ref()) {
            let aliases: Vec<String> = s
                .projection
                .iter()
                .filter_map(|item| match item {
                    SelectItem::ExprWithAlias { alias, .. } => Some(self.column_name(alias)),
                    _ => None,
                })
                .collect();
            self.scan_skipping(ob, &aliases);
        }
        self.scopes.pop();
    }

    fn join_constraint(&mut self, op: &JoinOperator) {
        let constraint = match op {
            JoinOperator::Join(c)
            | JoinOperator::Inner(c)
            | JoinOperator::Left(c)
            | JoinOperator::LeftOuter(c)
            | JoinOperator::Right(c)
            | JoinOperator::RightOuter(c)
            | JoinOperator::FullOuter(c)
            | JoinOperator::CrossJoin(c)
            | JoinOperator::Semi(c)
            | JoinOperator::LeftSemi(c)
            | JoinOperator::RightSemi(c)
            | JoinOperator::Anti(c)
            | JoinOperator::LeftAnti(c)
            | JoinOperator::RightAnti(c)
            | JoinOperator::StraightJoin(c) => c,
            other => {
                self.scan(other);
                return;
            }
        };
        match constraint {
            JoinConstraint::On(e) => self.scan(e),
            JoinConstraint::Using(names) | JoinConstraint::UsingAlias(names, _) => {
                for n in names {
                    if let Some(parts) = self.idents(n)
                        && let Some((col, _)) = parts.split_last()
                    {
                        self.column_read(&[], col);
                    }
                }
            }
            JoinConstraint::Natural | JoinConstraint::None => {}
        }
    }

    fn table_with_joins(&mut self, twj: &TableWithJoins) {
        self.table_factor(&twj.relation, Access::Read);
        for j in &twj.joins {
            self.table_factor(&j.relation, Access::Read);
        }
        for j in &twj.joins {
            self.join_constraint(&j.join_operator);
        }
    }

    /// Adds a `FROM` item to the current scope; returns its base table.
    fn table_factor(&mut self, tf: &TableFactor, access: Access) -> Option<TableName> {
        if !self.enter() {
            return None;
        }
        let out = self.table_factor_inner(tf, access);
        self.leave();
        out
    }

    fn table_factor_inner(&mut self, tf: &TableFactor, access: Access) -> Option<TableName> {
        match tf {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                if let Some(args) = args {
                    // A table function such as `generate_series(1, 10)`.
                    self.scan(args);
                    let key = match alias {
                        Some(a) => self.ident(&a.name),
                        None => self.table_name(name).map(|t| t.name).unwrap_or_default(),
                    };
                    self.add_entry(Entry {
                        key,
                        aliased: true,
                        table: None,
                    });
                    return None;
                }
                if self.is_cte(name) {
                    let key = match alias {
                        Some(a) => self.ident(&a.name),
                        None => self.table_name(name).map(|t| t.name).unwrap_or_default(),
                    };
                    self.add_entry(Entry {
                        key,
                        aliased: true,
                        table: None,
                    });
                    return None;
                }
                let table = self.table_name(name)?;
                match access {
                    Access::Read => self.acc.read.insert(table.clone()),
                    Access::Write => self.acc.written.insert(table.clone()),
                };
                let (key, aliased) = match alias {
                    Some(a) => (self.ident(&a.name), true),
                    None => (table.name.clone(), false),
                };
                self.add_entry(Entry {
                    key,
                    aliased,
                    table: Some(table.clone()),
                });
                Some(table)
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                self.query(subquery);
                if let Some(a) = alias {
                    let key = self.ident(&a.name);
                    self.add_entry(Entry {
                        key,
                        aliased: true,
                        table: None,
                    });
                }
                None
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                self.table_with_joins(table_with_joins);
                if let Some(a) = alias {
                    let key = self.ident(&a.name);
                    self.add_entry(Entry {
                        key,
                        aliased: true,
                        table: None,
                    });
                }
                None
            }
            other => {
                self.scan(other);
                None
            }
        }
    }
}

/// Finds column references in an expression tree; nested queries go back to
/// the walker, and their own expressions are left to it.
struct ExprScan<'w, 's> {
    walker: &'w mut Walker,
    nested: u32,
    skip: &'s [String],
}

impl Visitor for ExprScan<'_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.nested == 0 {
            self.walker.query(query);
        }
        self.nested += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.nested = self.nested.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.nested > 0 {
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Identifier(id) => {
                if !self.skip.is_empty() {
                    let name = self.walker.column_name(id);
                    if self.skip.contains(&name) {
                        return ControlFlow::Continue(());
                    }
                }
                self.walker.column_read(&[], id);
            }
            Expr::CompoundIdentifier(parts) => {
                if let Some((col, qualifier)) = parts.split_last() {
                    let q: Vec<&Ident> = qualifier.iter().collect();
                    self.walker.column_read(&q, col);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}
