use super::*;

fn hop(id: &str) -> HopEvent {
    HopEvent {
        event_id: id.into(),
        chain_id: "0af7651916cd43dd8448eb211c80319c".into(),
        ..HopEvent::default()
    }
}

#[test]
fn a_full_queue_drops_and_counts_without_waiting() {
    let metrics = Arc::new(Metrics::default());
    let (sink, _queue) = queue(2, Arc::clone(&metrics));
    for i in 0..5 {
        sink.emit(hop(&i.to_string()));
    }
    assert_eq!(metrics.exporter_dropped.get(), 3);
    assert_eq!(metrics.exporter_queue_depth.get(), 2);
}

#[tokio::test]
async fn exporter_writes_json_lines_and_keeps_writing_while_draining() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hops.jsonl");
    let metrics = Arc::new(Metrics::default());
    let (sink, queue) = queue(16, Arc::clone(&metrics));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(queue.run(
        ExportTarget::JsonlFile(path.clone()),
        100,
        Duration::from_secs(3600),
        stop_rx,
    ));
    sink.emit(hop("a"));
    sink.emit(hop("b"));
    stop_tx.send(true).unwrap();
    // Shutdown began: later events are still written, one by one.
    sink.emit(hop("c"));
    drop(sink);
    task.await.unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["event_id"], "c");
    assert_eq!(lines[0]["event_id"], "a");
    assert_eq!(lines[1]["direction"], "DIRECTION_UNSPECIFIED");
    assert_eq!(metrics.exporter_dropped.get(), 0);
}
