use std::collections::BTreeSet;

use custody_context::token::{CustodyClaims, InitiatorKind, TxnClaims};
use custody_context::traceparent::TraceId;

use super::*;

fn request(sub: &str) -> InFlightRequest {
    let claims = TxnClaims {
        iss: None,
        iat: 0,
        exp: 1,
        aud: vec!["td".into()],
        txn: TraceId::random(),
        sub: sub.into(),
        scope: "s".into(),
        req_wl: vec![],
        tctx: None,
        rctx: None,
        act: None,
        custody: CustodyClaims {
            v: 1,
            ini: InitiatorKind::Human,
            taint: BTreeSet::new(),
            att: vec![],
        },
    };
    InFlightRequest {
        token: Arc::new(VerifiedToken {
            claims,
            kid: "k".into(),
            digest: [0; 32],
        }),
        encoded: Arc::from("t"),
        span: TraceParent::new_root(),
    }
}

#[test]
fn alone_is_certain_and_newest_wins_under_concurrency() {
    let table = InFlightTable::new();
    assert!(table.stitch().is_none());
    let a = table.register(request("alice"));
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "alice");
    assert_eq!(s.confidence, 1.0);

    let b = table.register(request("bob"));
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "bob");
    assert_eq!(s.in_flight, 2);
    assert_eq!(s.confidence, 0.5);

    drop(b);
    assert_eq!(table.stitch().unwrap().request.token.claims.sub, "alice");
    drop(a);
    assert!(table.is_empty());
}
