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
    let b = table.register(request("bob"));
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "bob");
    assert_eq!((s.in_flight, s.candidates), (2, 2));
    assert_eq!(s.confidence, 0.5);

    drop(b);
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "alice");
    assert_eq!((s.in_flight, s.candidates), (1, 1));
    assert_eq!(s.confidence, 1.0);
    drop(a);
    assert!(table.is_empty());
    assert!(table.stitch().is_none());
}

#[test]
fn a_request_that_already_called_out_no_longer_dilutes_the_confidence() {
    let table = InFlightTable::new();
    let _a = table.register(request("alice"));
    assert_eq!(table.stitch().unwrap().confidence, 1.0);
    // Alice waits on her call; Bob arrives and calls out.
    let _b = table.register(request("bob"));
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "bob");
    assert_eq!((s.in_flight, s.candidates), (2, 1));
    assert_eq!(s.confidence, 1.0);
    // A second call while both have called: Bob again, counted once.
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "bob");
    assert_eq!(s.candidates, 1);

    // Two fresh requests: either could be calling.
    let c = table.register(request("carol"));
    let d = table.register(request("dave"));
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "dave");
    assert_eq!((s.in_flight, s.candidates), (4, 2));
    assert_eq!(s.confidence, 0.5);
    // Dave called, Carol finished without calling: Dave's next call is alone.
    drop(c);
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "dave");
    assert_eq!((s.in_flight, s.candidates), (3, 1));
    drop(d);
    // Everyone left has called: the newest, counted alone.
    let s = table.stitch().unwrap();
    assert_eq!(s.request.token.claims.sub, "bob");
    assert_eq!((s.in_flight, s.candidates), (2, 1));
}
