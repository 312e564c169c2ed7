//! The fixtures' values are what Custody's classifier recognises.

use custody_protocols::classify::{Classifier, DataClass};
use custody_testkit::fixtures::Shop;

#[test]
fn every_sensitive_value_is_recognised_without_its_column_name() {
    for c in Shop::standard().customers {
        for (value, class) in [
            (&c.email, DataClass::Email),
            (&c.phone, DataClass::Phone),
            (&c.ssn, DataClass::Ssn),
            (&c.card_number, DataClass::Card),
        ] {
            let got = Classifier::classify_value(value.as_bytes());
            assert!(got.contains(&class), "{value}: {got:?}");
        }
    }
}
