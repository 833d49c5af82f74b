//! What the layer tells the logs: the `outcome` field of each `idempotency` span,
//! and a WARN for a takeover, an ERROR for a late attempt fenced off.
//!
//! A binary of its own, its tests one at a time: tracing caches whether a log
//! line is wanted per call site, and with a single scoped subscriber it asks the
//! thread that reaches the call site first, which in a shared binary is another
//! test's, with no subscriber.

mod support;

use lambda_idempotency::{Error, Idempotency, IdempotencyConfig, IdempotencyError, MemoryStore};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use support::{context, now_ms};
use tokio::sync::Notify;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config() -> lambda_idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("test")
}

/// The `outcome` recorded on each `idempotency` span, in order.
#[derive(Clone, Default)]
struct SpanOutcomes(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanOutcomes {
    fn on_record(
        &self,
        _: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Outcome<'a>(&'a Mutex<Vec<String>>);
        impl tracing::field::Visit for Outcome<'_> {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "outcome" {
                    self.0.lock().expect("lock").push(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        values.record(&mut Outcome(&self.0));
    }
}

#[tokio::test]
async fn the_span_names_each_call_s_outcome() {
    use tracing_subscriber::layer::SubscriberExt;
    let _one = ONE_AT_A_TIME.lock().await;
    let outcomes = SpanOutcomes::default();
    // This test's thread only (a current-thread runtime): other tests are not seen.
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(outcomes.clone()));
    let config = config()
        .payload_validation("amount")
        .local_cache(16)
        .strict(true)
        .build()
        .expect("config");
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(store.clone(), config.clone());
    let work = idempotency.function("work", |event: Value| async move {
        match event["fail"].as_bool() {
            Some(true) => Err(std::io::Error::other("failed")),
            _ => Ok(json!({"ok": event["order_id"]})),
        }
    });
    let other_environment = Idempotency::new(store, config);
    let elsewhere = other_environment.function("work", |_: Value| async move {
        Ok::<_, std::io::Error>(json!("never runs"))
    });

    work.call(json!({"order_id": "s-1", "amount": 1}), None)
        .await
        .expect("executed");
    work.call(json!({"order_id": "s-1", "amount": 1}), None)
        .await
        .expect("from the local cache");
    elsewhere
        .call(json!({"order_id": "s-1", "amount": 1}), None)
        .await
        .expect("from the store");
    for event in [
        json!({"order_id": "s-1", "amount": 2}),
        json!({"amount": 1}),
        json!({"order_id": "s-2", "amount": 1, "fail": true}),
    ] {
        work.call(event, None).await.expect_err("refused or failed");
    }
    assert_eq!(
        *outcomes.0.lock().expect("lock"),
        [
            "executed",
            "replayed_from_cache",
            "replayed_from_store",
            "payload_mismatch",
            "missing_key_refused",
            "handler_error_released",
        ]
    );
}

/// The WARN and ERROR events logged, as (level, message).
#[derive(Clone, Default)]
struct Alerts(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Alerts {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let level = *event.metadata().level();
        if level <= tracing::Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().expect("lock").push((level, message.0));
        }
    }
}

#[tokio::test]
async fn a_takeover_logs_one_warning_and_the_fenced_off_late_attempt_one_error() {
    use tracing_subscriber::layer::SubscriberExt;
    let _one = ONE_AT_A_TIME.lock().await;
    let alerts = Alerts::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(alerts.clone()));
    let idempotency = Idempotency::new(MemoryStore::new(), config().build().expect("config"));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let work = Arc::new(idempotency.function("work", {
        let (entered, gate) = (entered.clone(), gate.clone());
        move |event: Value| {
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                if event["hold"] == json!(true) {
                    entered.notify_one();
                    gate.notified().await;
                }
                Ok::<_, std::io::Error>(json!("done"))
            }
        }
    }));
    let late = tokio::spawn({
        let work = work.clone();
        async move {
            work.call(json!({"order_id": "w", "hold": true}), Some(&context(200)))
                .await
        }
    });
    entered.notified().await;
    let deadline = now_ms() + 200;
    while now_ms() <= deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    work.call(json!({"order_id": "w"}), Some(&context(60_000)))
        .await
        .expect("takeover");
    gate.notify_one();
    let late = late.await.expect("join");
    assert!(matches!(
        late,
        Err(Error::Idempotency(IdempotencyError::LostOwnership { .. }))
    ));
    let alerts = alerts.0.lock().expect("lock").clone();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0].0, tracing::Level::WARN);
    assert!(alerts[0].1.contains("took over"), "{alerts:?}");
    assert_eq!(alerts[1].0, tracing::Level::ERROR);
    assert!(alerts[1].1.contains("taken over"), "{alerts:?}");
}
