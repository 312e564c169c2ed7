//! Arbitrary rows into the classifier: the input is split into values on
//! 0xff; the first four are the column names.
#![no_main]

use std::sync::OnceLock;

use custody_protocols::classify::{Classifier, ClassifierConfig, CustomClass, Validator};
use libfuzzer_sys::fuzz_target;

static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let classifier = CLASSIFIER.get_or_init(|| {
        Classifier::new(&ClassifierConfig {
            custom: vec![CustomClass {
                name: "pii.member_id".into(),
                column_regex: Some("member".into()),
                value_regex: Some("M[0-9]{4,12}".into()),
                validator: Validator::Luhn,
            }],
            ..ClassifierConfig::default()
        })
        .expect("valid config")
    });
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).collect();
    let names: Vec<String> = parts
        .iter()
        .take(4)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let mut acc = classifier.start(&names);
    for row in parts[names.len().min(parts.len())..].chunks(names.len().max(1)) {
        let values: Vec<Option<&[u8]>> = row
            .iter()
            .map(|v| if v.first() == Some(&0xfe) { None } else { Some(*v) })
            .collect();
        acc.observe_row(&values);
    }
    let report = acc.finish();
    for f in &report.findings {
        assert!((0.0..=1.0).contains(&f.confidence));
    }
    assert!(report.rows_sampled <= report.rows_seen);
});
