use super::*;

/// Renders the extracted pairs as `k=v` lines (`-` when nothing was found).
fn render(c: Option<&SqlComment>) -> String {
    match c {
        None => "-".into(),
        Some(c) => c
            .pairs()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[track_caller]
fn check_dialect(dialect: Dialect, sql: &str, expected: &str) {
    let got = extract(sql, dialect);
    assert_eq!(render(got.as_ref()), expected.trim(), "{dialect:?}: {sql}");
}

/// The same answer in both dialects.
#[track_caller]
fn check(sql: &str, expected: &str) {
    check_dialect(Dialect::Postgres, sql, expected);
    check_dialect(Dialect::MySql, sql, expected);
}

const TP: &str = "00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01";

#[test]
fn spec_exhibit_with_its_typo_and_line_breaks() {
    // The exhibit of the OpenTelemetry sqlcommenter specification, typo and
    // line breaks included: the misquoted pair gets an odd value, the others
    // are read right.
    let sql = "SELECT * FROM FOO /*action='%2Fparam*d',controller='index,'framework='spring',\n\
               traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',\n\
               tracestate='congo%3Dt61rcWkgMzE%2Crojo%3D00f067aa0ba902b7'*/";
    check(
        sql,
        "action=/param*d\n\
         controller=index,'framework='spring\n\
         traceparent=00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01\n\
         tracestate=congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    );
    let c = extract(sql, Dialect::Postgres).unwrap();
    let tp = c.traceparent().unwrap();
    assert_eq!(tp.flags, 1);
    assert_eq!(tp.trace_id[0], 0x5b);
    assert_eq!(tp.parent_id[7], 0xd2);
}

#[test]
fn django_sample_from_the_spec() {
    let sql = "INSERT INTO \"polls_question\"\n(\"question_text\", \"pub_date\") VALUES\n\
               ('What is this?', '2019-05-28T18:54:50.767481+00:00'::timestamptz) RETURNING\n\
               \"polls_question\".\"id\" /*controller='index',db_driver='django.db.backends.postgresql',\n\
               framework='django%3A2.2.1',route='%5Epolls/%24',\n\
               traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',\n\
               tracestate='congo%3Dt61rcWkgMzE%2Crojo%3D00f067aa0ba902b7'*/";
    check_dialect(
        Dialect::Postgres,
        sql,
        "controller=index\n\
         db_driver=django.db.backends.postgresql\n\
         framework=django:2.2.1\n\
         route=^polls/$\n\
         traceparent=00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01\n\
         tracestate=congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    );
}

#[test]
fn other_emitters() {
    // Rails 7 query logs (sqlcommenter format) and Marginalia's format.
    check(
        "SELECT \"users\".* FROM \"users\" /*action='index',application='Blog',controller='articles'*/",
        "action=index\napplication=Blog\ncontroller=articles",
    );
    check(
        "SELECT 1 /*application:BookStore,controller:books,action:index*/",
        "application=BookStore\ncontroller=books\naction=index",
    );
    // Unquoted values, as pganalyze accepts.
    check(
        &format!("SELECT 1 /*traceparent={TP}*/"),
        &format!("traceparent={TP}"),
    );
    // Prisma / OpenTelemetry: only a traceparent.
    check(
        "SELECT * FROM users /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b9c7c989f97918e1-01'*/",
        "traceparent=00-0af7651916cd43dd8448eb211c80319c-b9c7c989f97918e1-01",
    );
}

#[test]
fn odd_spacing_and_escapes() {
    check(
        "SELECT 1 /*  route = '/a' ,  team='x y'  */",
        "route=/a\nteam=x y",
    );
    check(
        "SELECT 1 /*name='O\\'Reilly',q='%27quoted%27'*/",
        "name=O'Reilly\nq='quoted'",
    );
    check(
        "SELECT 1 /*key%20with%20space='DROP%20TABLE%20FOO'*/",
        "key with space=DROP TABLE FOO",
    );
    check("SELECT 1 /*k=''*/", "k=");
    check("SELECT 1 /*bad=%ZZ,ok=%41*/", "bad=%ZZ\nok=A");
}

#[test]
fn last_comment_wins() {
    check("/*a='1'*/ SELECT 1 /*b='2'*/", "b=2");
    check("SELECT 1 /*b='2'*/ /* plain remark */", "-");
    check("/*a='1'*/ SELECT 1 -- tail", "a=1");
}

#[test]
fn comments_inside_literals_do_not_count() {
    check("SELECT '/*a=''1''*/' /*b='2'*/", "b=2");
    check("SELECT '/*a=1*/'", "-");
    check_dialect(Dialect::Postgres, "SELECT \"/*a=1*/\" FROM t", "-");
    check_dialect(Dialect::Postgres, "SELECT $$ /*a=1*/ $$", "-");
    check_dialect(
        Dialect::Postgres,
        "SELECT $tag$ /*a=1*/ $tag$ /*b=2*/",
        "b=2",
    );
    check_dialect(Dialect::MySql, "SELECT 'it\\'s /*a=1*/' /*b=2*/", "b=2");
    check_dialect(Dialect::MySql, "SELECT `/*a=1*/` FROM t", "-");
    check("SELECT 1 -- /*a=1*/", "-");
}

#[test]
fn hints_and_executable_comments_are_not_sqlcommenter() {
    check_dialect(Dialect::MySql, "SELECT /*+ BKA(t1) */ * FROM t1", "-");
    check_dialect(
        Dialect::MySql,
        "SELECT 1 /*a='1'*/ /*!40101 SET x=1 */",
        "a=1",
    );
    check("SELECT /*+ SeqScan(t) */ * FROM t /*app='x'*/", "app=x");
}

#[test]
fn negative_cases() {
    check("SELECT 1", "-");
    check("SELECT 1 /* just a remark */", "-");
    check("SELECT 1 /**/", "-");
    check("SELECT 1 /*=x*/", "-");
    check("SELECT 1 /* unterminated", "-");
    check("SELECT 1 /*a='unterminated*/", "a=unterminated");
}

#[test]
fn txn_token_keys() {
    for key in ["txn_token", "txn-token", "Txn-Token", "TXN_TOKEN"] {
        let c = extract(
            &format!("SELECT 1 /*{key}='eyJ.abc.def'*/"),
            Dialect::Postgres,
        )
        .unwrap();
        assert_eq!(c.txn_token(), Some("eyJ.abc.def"), "{key}");
        let debug = format!("{c:?}");
        assert!(!debug.contains("eyJ"), "token in debug output: {debug}");
        assert!(debug.contains("redacted"));
    }
    let c = extract("SELECT 1 /*token='x'*/", Dialect::Postgres).unwrap();
    assert_eq!(c.txn_token(), None);
}

#[test]
fn traceparent_validation() {
    assert!(TraceParent::parse(TP).is_some());
    for bad in [
        "00-00000000000000000000000000000000-c532cb4098ac3dd2-01",
        "00-5bd66ef5095369c7b0d1f8f4bd33716a-0000000000000000-01",
        "ff-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01",
        "00-5BD66EF5095369C7B0D1F8F4BD33716A-c532cb4098ac3dd2-01",
        "00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01-extra",
        "00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2",
        "",
        "garbage",
    ] {
        assert_eq!(TraceParent::parse(bad), None, "{bad}");
    }
    // A future version may carry more fields.
    assert!(
        TraceParent::parse("01-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01-more")
            .is_some()
    );
}

#[test]
fn bounds() {
    let many: Vec<String> = (0..100).map(|i| format!("k{i}='v'")).collect();
    let c = extract(&format!("SELECT 1 /*{}*/", many.join(",")), Dialect::MySql).unwrap();
    assert_eq!(c.len(), MAX_PAIRS);
    assert_eq!(c.dropped(), 100 - MAX_PAIRS);
    let long = "x".repeat(MAX_VALUE_LEN + 1);
    let c = extract(&format!("SELECT 1 /*a='{long}',b='1'*/"), Dialect::MySql).unwrap();
    assert_eq!(render(Some(&c)), "b=1");
    assert_eq!(c.dropped(), 1);
}

#[test]
fn annotate_appends_sorted_encoded_pairs() {
    let out = annotate(
        "SELECT * FROM t WHERE id = $1;",
        Dialect::Postgres,
        &[("traceparent", TP), ("route", "/a b"), ("app", "it's")],
    );
    assert_eq!(
        out,
        format!(
            "SELECT * FROM t WHERE id = $1 /*app='it%27s',route='%2Fa%20b',traceparent='{TP}'*/;"
        )
    );
    assert_eq!(
        annotate("SELECT 1  ", Dialect::MySql, &[("a", "1")]),
        "SELECT 1 /*a='1'*/"
    );
}

#[test]
fn annotate_leaves_commented_statements_alone() {
    for sql in [
        "SELECT 1 /* mine */",
        "SELECT 1 -- mine",
        "/*+ hint */ SELECT 1",
    ] {
        assert_eq!(annotate(sql, Dialect::Postgres, &[("a", "1")]), sql);
    }
    // A comment-like string literal is not a comment.
    assert_eq!(
        annotate("SELECT '/* x */'", Dialect::Postgres, &[("a", "1")]),
        "SELECT '/* x */' /*a='1'*/"
    );
    assert_eq!(annotate("SELECT 1", Dialect::Postgres, &[]), "SELECT 1");
    assert!(has_comment("SELECT 1 -- mine", Dialect::MySql));
    assert!(has_comment("SELECT /*+ hint */ 1", Dialect::MySql));
    assert!(!has_comment("SELECT '/* x */'", Dialect::Postgres));
}

#[test]
fn round_trip() {
    let pairs: &[(&str, &str)] = &[
        ("traceparent", TP),
        ("txn_token", "eyJhbGciOiJFZERTQSJ9.eyJ0eG4iOiIxIn0.c2ln"),
        ("route", "/checkout?x=1&y='2'*/ -- nasty"),
        ("weird key", "ünïcödé, commas, 'quotes' and \\backslashes\\"),
        ("empty", ""),
    ];
    for dialect in [Dialect::Postgres, Dialect::MySql] {
        let sql = annotate("SELECT * FROM t", dialect, pairs);
        let c = extract(&sql, dialect).unwrap();
        let mut expected: Vec<(&str, &str)> = pairs.to_vec();
        expected.sort();
        let got: Vec<(&str, &str)> = c.pairs().collect();
        assert_eq!(got, expected, "{sql}");
        assert!(c.traceparent().is_some());
        assert_eq!(c.dropped(), 0);
        // The annotation does not change the statement's shape.
        assert_eq!(
            crate::sql::fingerprint(&sql, dialect),
            crate::sql::fingerprint("SELECT * FROM t", dialect)
        );
    }
}

#[test]
fn url_coding() {
    assert_eq!(url_decode("%2Fparam*d"), "/param*d");
    assert_eq!(url_decode("100%"), "100%");
    assert_eq!(url_decode("%e2%82%ac"), "€");
    assert_eq!(url_decode("%ff"), "\u{fffd}");
    assert_eq!(url_encode("a-b_c.d~e f/g*"), "a-b_c.d~e%20f%2Fg%2A");
}
