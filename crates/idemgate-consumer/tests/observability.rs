//! What a consumer reports: the `idemgate_consumer_*` metrics, and a span per handler run that
//! carries the key into the handler's logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemgate_consumer::memory::MemoryBroker;
use idemgate_consumer::{Consumer, Message};
use idemgate_core::{Claim, ClaimOptions, Key, MemoryStore, Store};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_consumer_counts_its_events_and_spans_its_deliveries() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let logs = Buf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let stats = tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&recorder, || {
            // one thread: the recorder and the subscriber are this thread's
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let store = Arc::new(MemoryStore::new());
                // a key another consumer claimed and abandoned: this one takes it over
                let abandoned = Key::new("obs", "e-3").unwrap();
                let opts = ClaimOptions::with_lease(Duration::from_millis(1));
                assert!(matches!(
                    store.claim(&abandoned, None, &opts).await.unwrap(),
                    Claim::Acquired(_)
                ));
                tokio::time::sleep(Duration::from_millis(5)).await;
                let broker = MemoryBroker::new();
                let event = |id: &str| Message::new("obs", "x").with_event_id(id);
                for id in ["e-1", "e-1", "e-2", "e-3"] {
                    broker.send(event(id));
                }
                broker.send(Message::new("obs", "no id"));
                broker.close();
                Consumer::gate("obs", store)
                    .with_concurrency(1)
                    .run(
                        broker.source(),
                        |m: Message| async move {
                            tracing::info!(payload = m.payload.len(), "charging");
                            Ok::<_, String>(())
                        },
                        std::future::pending(),
                    )
                    .await
                    .unwrap()
            })
        })
    });
    assert_eq!(
        (stats.handled, stats.duplicates, stats.takeovers),
        (3, 1, 1),
        "{stats:?}"
    );
    let text = metrics.render();
    for (event, n) in [
        ("received", 5),
        ("handled", 3),
        ("duplicates", 1),
        ("takeovers", 1),
        ("dead_lettered", 1),
        ("dead_lettered_poison", 1),
    ] {
        let line = format!("idemgate_consumer_total{{consumer=\"obs\",event=\"{event}\"}} {n}");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains("idemgate_consumer_handler_seconds_count{consumer=\"obs\"} 3"),
        "{text}"
    );
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for id in ["e-1", "e-2", "e-3"] {
        assert!(
            logs.lines().any(|l| l.contains("idemgate.delivery")
                && l.contains(&format!("event_id=\"{id}\""))
                && l.contains(&format!("key=obs/{id}"))
                && l.contains("charging")),
            "no span with {id} around the handler's log:\n{logs}"
        );
    }
    assert!(
        logs.contains("attempt=2"),
        "the take-over's attempt is not in its span:\n{logs}"
    );
}
