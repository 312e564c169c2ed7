//! The OpenAPI document stays in step with the router.

#[test]
fn the_openapi_document_lists_every_route() {
    let text = include_str!("../../openapi.yaml");
    let doc: serde_json::Value = serde_norway::from_str(text).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let source = include_str!("../http.rs");
    let routes: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(routes.len() >= 12, "{routes:?}");
    for route in routes {
        assert!(paths.contains_key(route), "{route} is not in openapi.yaml");
    }
}
