//! The rules of a wrapped call, each written once and run on every store: the
//! in-memory store (`memory::`), Redis (`redis::`, the standalone server of
//! `redis/ensure.sh`, in a database of the rules', each test under a key
//! prefix of its own) and a slice on
//! the Redis cluster (`cluster::`) that reaches every script through the
//! cluster's routing. A rule inspects records through the store contract
//! (`get`, the keys `key_for` names) and `Harness::records`.

mod support;

use lambda_idempotency::{
    ConfigError, Dispatcher, Error, Idempotency, IdempotencyError, IdempotencyLayer,
    IdempotencyStore, OutboxMessage, PermanentError, Status,
};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use support::faults::{FaultStore as CountingStore, Op};
use support::stores::{Harness, Store};
use support::{
    context, counting_service, idempotency_error, in_progress, incompressible, invoke, now_ms,
    permanent, poll, spawn_call, Audit, Counter,
};
use tokio::sync::{oneshot, Notify};
use tower::{Service, ServiceExt};

type BoxError = lambda_runtime::Error;

fn config<S: Store>(h: &Harness<S>) -> lambda_idempotency::IdempotencyConfigBuilder {
    h.builder().key_expression("order_id")
}

/// A wrapped handler that counts its runs and answers `response`.
fn answering<S: IdempotencyStore>(
    idempotency: &Idempotency<S>,
    runs: &Counter,
    response: Value,
) -> impl Service<LambdaEvent<Value>, Response = Value, Error = support::ServiceError> + Clone {
    let runs = runs.clone();
    idempotency
        .wrap(service_fn(move |_: LambdaEvent<Value>| {
            runs.hit();
            std::future::ready(Ok::<_, BoxError>(response.clone()))
        }))
        .expect("one handler per key prefix")
}

/// A test per rule and store: `memory::rule` on a fresh memory store,
/// `redis::rule` on the standalone Redis server under a prefix named after the
/// rule, `cluster::rule` on the Redis cluster. `every` rules run on the memory
/// store and Redis; the others where named.
macro_rules! on_stores {
    (
        every { $( #[$every_attr:meta] $every:ident ),* $(,)? }
        memory { $( #[$memory_attr:meta] $memory:ident ),* $(,)? }
        redis { $( #[$redis_attr:meta] $redis:ident ),* $(,)? }
        cluster { $( #[$cluster_attr:meta] $cluster:ident ),* $(,)? }
    ) => {
        mod memory {
            use super::Harness;
            $( #[$every_attr] async fn $every() { super::$every(Harness::memory()).await } )*
            $( #[$memory_attr] async fn $memory() { super::$memory(Harness::memory()).await } )*
        }
        mod redis {
            use super::Harness;
            $(
                #[$every_attr]
                async fn $every() {
                    super::$every(Harness::redis(stringify!($every)).await).await
                }
            )*
            $(
                #[$redis_attr]
                async fn $redis() {
                    super::$redis(Harness::redis(stringify!($redis)).await).await
                }
            )*
        }
        mod cluster {
            use super::Harness;
            $(
                #[$cluster_attr]
                async fn $cluster() {
                    super::$cluster(Harness::cluster(stringify!($cluster)).await).await
                }
            )*
        }
    };
}

on_stores! {
    every {
        #[tokio::test] first_execution_runs_and_replay_returns_the_stored_response_byte_for_byte,
        #[tokio::test] the_stored_record_is_completed_with_the_response_and_a_prefixed_sha256_key,
        #[tokio::test] key_for_names_the_record_a_wrapped_handler_and_a_named_function_write,
        #[tokio::test] a_duplicate_while_in_progress_gets_already_in_progress,
        #[tokio::test] same_key_with_different_validated_fields_is_refused,
        #[tokio::test] a_handler_error_is_returned_unchanged_and_the_key_released,
        #[tokio::test] permanent_errors_replay_only_when_enabled,
        #[tokio::test] missing_key_material_skips_idempotency_or_fails_in_strict_mode,
        #[tokio::test] a_multi_select_of_absent_fields_is_missing_key_material,
        #[tokio::test] falsy_responses_replay_exactly_as_stored,
        #[tokio::test] a_response_that_fits_compressed_is_stored_and_replayed,
        #[tokio::test] a_store_failure_while_reserving_never_runs_the_handler,
        #[tokio::test] a_store_failure_while_completing_leaves_a_reservation_that_expires,
        #[tokio::test] the_local_cache_serves_replays_without_a_store_request,
        #[tokio::test] in_progress_records_are_never_cached,
        #[tokio::test] an_expired_reservation_is_taken_over_and_the_late_owner_is_fenced_off,
        #[tokio::test] a_remaining_time_of_zero_is_a_valid_deadline,
        #[tokio::test] an_expired_completed_record_counts_as_absent,
        #[tokio::test] a_typed_closure_selects_the_key_material,
        #[tokio::test] two_wrapped_functions_with_the_same_payload_get_distinct_keys,
        #[tokio::test] the_disable_switch_bypasses_the_store,
        #[tokio::test] the_replay_hook_sees_the_replayed_response_and_its_record,
        #[tokio::test] a_malformed_event_is_a_typed_error_and_the_handler_does_not_run,
        #[tokio::test] the_layer_wraps_a_handler_in_a_service_builder,
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        fifty_concurrent_calls_with_one_key_run_the_handler_once,
        #[tokio::test]
        a_store_of_records_alone_serves_handlers_and_refuses_steps_and_outbox_without_running_them,
        #[tokio::test] a_step_s_permanent_error_passed_on_with_the_question_mark_is_permanent,
        #[tokio::test] a_failed_attempt_s_steps_replay_on_resume_and_its_outbox_is_delivered_once,
    }
    // DynamoDB's 400 KB item limit, which the memory store mirrors; Redis has
    // no such limit, and stores the same response.
    memory {
        #[tokio::test] an_oversized_response_is_refused_before_the_write_and_the_key_released,
    }
    redis {
        #[tokio::test] a_response_over_dynamodb_s_item_limit_is_stored_and_replayed,
    }
    // Every script (reserve, complete with and without outbox, release, journal
    // write, mark delivered) and read, routed to the primary of the key's slot.
    cluster {
        #[tokio::test] first_execution_runs_and_replay_returns_the_stored_response_byte_for_byte,
        #[tokio::test] a_duplicate_while_in_progress_gets_already_in_progress,
        #[tokio::test] a_handler_error_is_returned_unchanged_and_the_key_released,
        #[tokio::test] an_expired_reservation_is_taken_over_and_the_late_owner_is_fenced_off,
        #[tokio::test] an_expired_completed_record_counts_as_absent,
        #[tokio::test] a_failed_attempt_s_steps_replay_on_resume_and_its_outbox_is_delivered_once,
    }
}

async fn first_execution_runs_and_replay_returns_the_stored_response_byte_for_byte<S: Store>(
    h: Harness<S>,
) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);

    let first = invoke(&mut service, json!({"order_id": "o-1", "extra": 1}))
        .await
        .expect("first");
    let replay = invoke(&mut service, json!({"order_id": "o-1", "extra": 2}))
        .await
        .expect("replay");

    assert_eq!(runs.get(), 1);
    assert_eq!(
        serde_json::to_vec(&first).expect("json"),
        serde_json::to_vec(&replay).expect("json")
    );
    assert_eq!(h.records().await, 1);
}

async fn the_stored_record_is_completed_with_the_response_and_a_prefixed_sha256_key<S: Store>(
    h: Harness<S>,
) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let response = invoke(
        &mut counting_service(&idempotency, &runs),
        json!({"order_id": "o-2"}),
    )
    .await
    .expect("run");

    // The key material is the string "o-2"; its canonical JSON is "\"o-2\"".
    let key = h.key(None, "o-2");
    let record = store
        .get(&key)
        .await
        .expect("get")
        .expect("record stored under the hashed key");
    assert_eq!(record.key, key);
    assert_eq!(record.status, Status::Completed);
    assert_eq!(
        record.data.as_deref(),
        Some(serde_json::to_string(&response).expect("json").as_str())
    );
    let one_hour = (now_ms() / 1000 + 3600 - record.expiration).abs();
    assert!(
        one_hour <= 2,
        "expiration about an hour from now, off by {one_hour}s"
    );
}

async fn key_for_names_the_record_a_wrapped_handler_and_a_named_function_write<S: Store>(
    h: Harness<S>,
) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let event = json!({"order_id": "o-3"});
    let runs = Counter::default();
    invoke(&mut counting_service(&idempotency, &runs), event.clone())
        .await
        .expect("run");
    let named = idempotency.function(
        "charge",
        |e: Value| async move { Ok::<_, std::io::Error>(e) },
    );
    named.call(event.clone(), None).await.expect("named run");

    for handler in [None, Some("charge")] {
        let key = idempotency
            .key_for(handler, &event)
            .expect("derivable")
            .expect("has key material");
        let record = store.get(&key).await.expect("get");
        assert_eq!(
            record.map(|r| r.status),
            Some(Status::Completed),
            "{handler:?}"
        );
    }
    assert_eq!(
        idempotency
            .key_for(None, &json!({"other": 1}))
            .expect("derivable"),
        None
    );
}

async fn a_duplicate_while_in_progress_gets_already_in_progress<S: Store>(h: Harness<S>) {
    let idempotency = Idempotency::new(h.store.clone(), config(&h).build().expect("config"));
    let (entered_tx, entered_rx) = oneshot::channel();
    let entered_tx = Arc::new(Mutex::new(Some(entered_tx)));
    let release = Arc::new(Notify::new());
    let runs = Counter::default();
    let service = {
        let (release, runs) = (release.clone(), runs.clone());
        idempotency
            .wrap(service_fn(move |_event: LambdaEvent<Value>| {
                runs.hit();
                let (release, entered) = (release.clone(), entered_tx.lock().expect("lock").take());
                async move {
                    if let Some(tx) = entered {
                        let _ = tx.send(());
                    }
                    release.notified().await;
                    Ok::<_, BoxError>(json!("done"))
                }
            }))
            .expect("one handler per key prefix")
    };

    // Spawn the service's own (boxed, Send) future, as lambda_runtime::run_concurrent does.
    let mut first_service = service.clone();
    let ready = first_service.ready().await.expect("ready");
    let first = tokio::spawn(ready.call(LambdaEvent::new(
        json!({"order_id": "o-3"}),
        context(60_000),
    )));
    entered_rx.await.expect("first call entered the handler");
    let err = invoke(&mut service.clone(), json!({"order_id": "o-3"}))
        .await
        .expect_err("in progress");
    assert!(
        matches!(
            idempotency_error(&err),
            IdempotencyError::AlreadyInProgress { .. }
        ),
        "{err}"
    );

    release.notify_one();
    assert_eq!(
        first.await.expect("join").expect("first call"),
        json!("done")
    );
    assert_eq!(runs.get(), 1);
}

async fn same_key_with_different_validated_fields_is_refused<S: Store>(h: Harness<S>) {
    let store = CountingStore::new(h.store.clone());
    let cached = config(&h)
        .payload_validation("[amount, currency]")
        .local_cache(8)
        .build()
        .expect("config");
    let idempotency = Idempotency::new(store.clone(), cached);
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);

    invoke(
        &mut service,
        json!({"order_id": "o-4", "amount": 10, "currency": "EUR"}),
    )
    .await
    .expect("first");
    // The cached record is checked too, without a request.
    let calls = store.calls.get();
    let err = invoke(
        &mut service,
        json!({"order_id": "o-4", "amount": 11, "currency": "EUR"}),
    )
    .await
    .expect_err("mismatch");
    assert!(
        matches!(
            idempotency_error(&err),
            IdempotencyError::PayloadMismatch { .. }
        ),
        "{err}"
    );
    assert_eq!(store.calls.get(), calls, "refused from the local cache");

    // Without the cache, from the record the refused reservation returns.
    let uncached = Idempotency::new(
        store.clone(),
        config(&h)
            .payload_validation("[amount, currency]")
            .build()
            .expect("config"),
    );
    let err = invoke(
        &mut counting_service(&uncached, &runs),
        json!({"order_id": "o-4", "amount": 10, "currency": "USD"}),
    )
    .await
    .expect_err("mismatch");
    assert!(
        matches!(
            idempotency_error(&err),
            IdempotencyError::PayloadMismatch { .. }
        ),
        "{err}"
    );
    // Same fields, other extra data: replayed.
    invoke(
        &mut service,
        json!({"order_id": "o-4", "amount": 10, "currency": "EUR", "note": "x"}),
    )
    .await
    .expect("replay");
    assert_eq!(runs.get(), 1);
}

async fn a_handler_error_is_returned_unchanged_and_the_key_released<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = {
        let runs = runs.clone();
        idempotency
            .wrap(service_fn(move |_: LambdaEvent<Value>| {
                let run = runs.hit();
                async move {
                    if run == 1 {
                        Err::<Value, BoxError>(std::io::Error::other("card network down").into())
                    } else {
                        Ok(json!({"run": run}))
                    }
                }
            }))
            .expect("one handler per key prefix")
    };

    let err = invoke(&mut service, json!({"order_id": "o-5"}))
        .await
        .expect_err("handler error");
    let Error::Handler(handler_error) = &err else {
        panic!("{err:?}")
    };
    let io = handler_error
        .downcast_ref::<std::io::Error>()
        .expect("the handler's own error type");
    assert_eq!(io.to_string(), "card network down");
    assert_eq!(h.records().await, 0, "the reservation was released");

    assert_eq!(
        invoke(&mut service, json!({"order_id": "o-5"}))
            .await
            .expect("retry"),
        json!({"run": 2})
    );
    assert_eq!(runs.get(), 2);
}

async fn permanent_errors_replay_only_when_enabled<S: Store>(h: Harness<S>) {
    for replay_errors in [false, true] {
        // Each round on an empty store.
        let h = h.another();
        let idempotency = Idempotency::new(
            h.store.clone(),
            config(&h)
                .replay_permanent_errors(replay_errors)
                .build()
                .expect("config"),
        );
        let runs = Counter::default();
        let mut service = {
            let runs = runs.clone();
            idempotency
                .wrap(service_fn(move |_: LambdaEvent<Value>| {
                    runs.hit();
                    async move {
                        Err::<Value, BoxError>(
                            PermanentError::new("card declined")
                                .with_details(json!({"code": 51}))
                                .into(),
                        )
                    }
                }))
                .expect("one handler per key prefix")
        };
        let first = invoke(&mut service, json!({"order_id": "o-6"}))
            .await
            .expect_err("declined");
        let second = invoke(&mut service, json!({"order_id": "o-6"}))
            .await
            .expect_err("declined again");
        assert_eq!(permanent(&first), permanent(&second));
        assert!(matches!(first, Error::Handler(_)), "{first:?}");
        assert_eq!(
            matches!(second, Error::Replayed(_)),
            replay_errors,
            "replayed only when enabled: {second:?}"
        );
        assert_eq!(
            permanent(&second).expect("permanent").details,
            Some(json!({"code": 51}))
        );
        assert_eq!(
            runs.get(),
            if replay_errors { 1 } else { 2 },
            "replay_permanent_errors = {replay_errors}"
        );
        assert_eq!(h.records().await, usize::from(replay_errors));
    }
}

async fn missing_key_material_skips_idempotency_or_fails_in_strict_mode<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    for event in [
        json!({}),
        json!({"order_id": null}),
        json!({"order_id": ""}),
        json!({"order_id": []}),
    ] {
        invoke(&mut service, event).await.expect("runs unprotected");
    }
    assert_eq!(runs.get(), 4);
    assert_eq!(h.records().await, 0);

    let strict = Idempotency::new(
        store.clone(),
        config(&h).strict(true).build().expect("config"),
    );
    let mut service = counting_service(&strict, &runs);
    let err = invoke(&mut service, json!({"other": 1}))
        .await
        .expect_err("strict");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::MissingKey { .. }),
        "{err}"
    );
    assert_eq!(runs.get(), 4, "the handler did not run");

    // 0 and false are real keys.
    for event in [
        json!({"order_id": 0}),
        json!({"order_id": false}),
        json!({"order_id": 0}),
        json!({"order_id": false}),
    ] {
        invoke(&mut service, event).await.expect("runs or replays");
    }
    assert_eq!(runs.get(), 6);
    assert_eq!(h.records().await, 2);
}

async fn a_multi_select_of_absent_fields_is_missing_key_material<S: Store>(h: Harness<S>) {
    let idempotency = Idempotency::new(
        h.store.clone(),
        h.builder()
            .key_expression("[user, order]")
            .strict(true)
            .build()
            .expect("config"),
    );
    let runs = Counter::default();
    let err = invoke(&mut counting_service(&idempotency, &runs), json!({"x": 1}))
        .await
        .expect_err("strict");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::MissingKey { .. }),
        "{err}"
    );
}

async fn falsy_responses_replay_exactly_as_stored<S: Store>(h: Harness<S>) {
    for response in [
        json!(null),
        json!({}),
        json!([]),
        json!(0),
        json!(""),
        json!(false),
    ] {
        // Each response on an empty store.
        let h = h.another();
        let idempotency = Idempotency::new(h.store.clone(), config(&h).build().expect("config"));
        let runs = Counter::default();
        let mut service = answering(&idempotency, &runs, response.clone());
        assert_eq!(
            invoke(&mut service, json!({"order_id": "f"}))
                .await
                .expect("first"),
            response
        );
        assert_eq!(
            invoke(&mut service, json!({"order_id": "f"}))
                .await
                .expect("replay"),
            response
        );
        assert_eq!(runs.get(), 1, "{response} was replayed, not recomputed");
    }
}

/// With `compress-responses` the memory store accepts what `DynamoDbStore`
/// stores compressed (it keeps the text; it only measures).
async fn a_response_that_fits_compressed_is_stored_and_replayed<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = answering(
        &idempotency,
        &runs,
        json!({"blob": "x".repeat(1024 * 1024)}),
    );
    let first = invoke(&mut service, json!({"order_id": "gz"}))
        .await
        .expect("fits compressed");
    let replay = invoke(&mut service, json!({"order_id": "gz"}))
        .await
        .expect("replayed");
    assert_eq!(first, replay);
    assert_eq!(runs.get(), 1);
}

async fn an_oversized_response_is_refused_before_the_write_and_the_key_released<S: Store>(
    h: Harness<S>,
) {
    let store = CountingStore::new(h.store.clone());
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    // Over 400 KB with or without the `compress-responses` feature.
    let blob = json!({"blob": incompressible(600 * 1024, 1)});
    let mut service = answering(&idempotency, &runs, blob);
    let err = invoke(&mut service, json!({"order_id": "big"}))
        .await
        .expect_err("too large");
    match idempotency_error(&err) {
        IdempotencyError::ResponseTooLarge { size, limit, .. } => assert!(size > limit),
        other => panic!("{other}"),
    }
    assert_eq!(h.records().await, 0, "released");
    // reserve, the complete the store refused without writing, release (the
    // DynamoDB test checks that no write request is sent).
    assert_eq!(store.calls.get(), 3);
    invoke(&mut service, json!({"order_id": "big"}))
        .await
        .expect_err("runs again, refused again");
    assert_eq!(runs.get(), 2);
}

/// Redis keeps a value of up to 512 MB: the response the memory store and
/// DynamoDB refuse is written through the completing script's arguments and
/// replayed byte for byte.
async fn a_response_over_dynamodb_s_item_limit_is_stored_and_replayed<S: Store>(h: Harness<S>) {
    let idempotency = Idempotency::new(h.store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let blob = json!({"blob": incompressible(600 * 1024, 1)});
    let mut service = answering(&idempotency, &runs, blob);
    let first = invoke(&mut service, json!({"order_id": "big"}))
        .await
        .expect("stored");
    let replay = invoke(&mut service, json!({"order_id": "big"}))
        .await
        .expect("replayed");
    assert_eq!(
        serde_json::to_vec(&first).expect("json"),
        serde_json::to_vec(&replay).expect("json")
    );
    assert_eq!(runs.get(), 1);
    let record = h
        .store
        .get(&h.key(None, "big"))
        .await
        .expect("get")
        .expect("record");
    assert!(record.data.is_some_and(|data| data.len() > 600 * 1024));
}

async fn a_store_failure_while_reserving_never_runs_the_handler<S: Store>(h: Harness<S>) {
    let idempotency = Idempotency::new(
        CountingStore::failing(h.store.clone(), &[Op::Reserve]),
        config(&h).build().expect("config"),
    );
    let runs = Counter::default();
    let err = invoke(
        &mut counting_service(&idempotency, &runs),
        json!({"order_id": "s"}),
    )
    .await
    .expect_err("store down");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::Store(_)),
        "{err}"
    );
    assert!(err.to_string().contains("injected store failure"), "{err}");
    assert_eq!(runs.get(), 0);
}

async fn a_store_failure_while_completing_leaves_a_reservation_that_expires<S: Store>(
    h: Harness<S>,
) {
    let store = CountingStore::failing(h.store.clone(), &[Op::Complete]);
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    // Just past, within the second a deadline may lag (one full second was
    // racy: a millisecond more and it counts as no deadline at all).
    let deadline = context(-500);
    let deadline_ms = deadline.deadline as i64;
    let err = service
        .ready()
        .await
        .expect("ready")
        .call(LambdaEvent::new(json!({"order_id": "sc"}), deadline))
        .await;
    let err = err.expect_err("completion failed");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::Store(_)),
        "{err}"
    );

    // The key is held only until the failed invocation's deadline...
    let key = h.key(None, "sc");
    let held = store
        .inner
        .get(&key)
        .await
        .expect("get")
        .expect("reservation kept");
    assert_eq!(
        (held.status, held.in_progress_expiration),
        (Status::InProgress, Some(deadline_ms))
    );
    // ...after which a retry takes over (and here fails to complete again).
    invoke(&mut service, json!({"order_id": "sc"}))
        .await
        .expect_err("completion fails again");
    assert_eq!(runs.get(), 2);
}

async fn the_local_cache_serves_replays_without_a_store_request<S: Store>(h: Harness<S>) {
    let store = CountingStore::new(h.store.clone());
    let idempotency = Idempotency::new(
        store.clone(),
        config(&h).local_cache(2).build().expect("config"),
    );
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);

    let first = invoke(&mut service, json!({"order_id": "c-1"}))
        .await
        .expect("first");
    assert_eq!(store.calls.get(), 2, "reserve + complete");
    // The first cached replay parses the stored response, later ones reuse it:
    // both give the response byte for byte.
    for _ in 0..2 {
        let replay = invoke(&mut service, json!({"order_id": "c-1"}))
            .await
            .expect("cached replay");
        assert_eq!(
            serde_json::to_vec(&replay).expect("json"),
            serde_json::to_vec(&first).expect("json")
        );
    }
    assert_eq!(store.calls.get(), 2, "served from the cache");

    // Capacity 2: the least recently used record leaves the cache.
    invoke(&mut service, json!({"order_id": "c-2"}))
        .await
        .expect("second key");
    invoke(&mut service, json!({"order_id": "c-3"}))
        .await
        .expect("third key");
    let before = store.calls.get();
    invoke(&mut service, json!({"order_id": "c-1"}))
        .await
        .expect("replay from the store");
    assert_eq!(
        store.calls.get(),
        before + 1,
        "evicted: one reserve request, refused with the record"
    );
    assert_eq!(runs.get(), 3);
}

async fn in_progress_records_are_never_cached<S: Store>(h: Harness<S>) {
    let store = CountingStore::new(h.store.clone());
    let idempotency = Idempotency::new(
        store.clone(),
        config(&h).local_cache(8).build().expect("config"),
    );
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let slow = {
        let (entered, gate) = (entered.clone(), gate.clone());
        Arc::new(idempotency.function("slow", move |_: Value| {
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                entered.notify_one();
                gate.notified().await;
                Ok::<_, BoxError>(json!("finished"))
            }
        }))
    };
    let first = tokio::spawn({
        let slow = slow.clone();
        async move { slow.call(json!({"order_id": "job-1"}), None).await }
    });
    entered.notified().await;
    // Each duplicate asks the store: nothing in progress is served from the cache.
    let mut requests = Vec::new();
    for _ in 0..2 {
        let before = store.calls.get();
        let err = slow
            .call(json!({"order_id": "job-1"}), None)
            .await
            .expect_err("in progress");
        assert!(
            matches!(
                err,
                Error::Idempotency(IdempotencyError::AlreadyInProgress { .. })
            ),
            "{err}"
        );
        requests.push(store.calls.get() - before);
    }
    assert_eq!(requests, vec![1, 1]);
    gate.notify_one();
    assert_eq!(
        first.await.expect("join").expect("first"),
        json!("finished")
    );
    let before = store.calls.get();
    assert_eq!(
        slow.call(json!({"order_id": "job-1"}), None)
            .await
            .expect("cached replay"),
        json!("finished")
    );
    assert_eq!(
        store.calls.get(),
        before,
        "completed: served from the cache"
    );
}

async fn an_expired_reservation_is_taken_over_and_the_late_owner_is_fenced_off<S: Store>(
    h: Harness<S>,
) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runs = Counter::default();
    // The first call's Lambda deadline passes while its handler still runs, as if
    // it had timed out: its reservation is open to takeover.
    let work = {
        let (entered, gate, runs) = (entered.clone(), gate.clone(), runs.clone());
        Arc::new(idempotency.function("work", move |outcome: Value| {
            let run = runs.hit();
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                if run == 1 {
                    entered.notify_one();
                    gate.notified().await;
                }
                match outcome["fail"].as_bool() {
                    Some(true) => Err(std::io::Error::other("late failure")),
                    _ => Ok(json!({"run": run})),
                }
            }
        }))
    };
    for late_outcome in ["complete", "fail"] {
        let fail = late_outcome == "fail";
        // Validation is off, so both calls share the key "order_id".
        let event = json!({"order_id": late_outcome, "fail": fail});
        let late = tokio::spawn({
            let (work, event) = (work.clone(), event.clone());
            async move { work.call(event, Some(&context(100))).await }
        });
        entered.notified().await;

        let fresh = context(60_000);

        let taken_over = poll(
            || work.call(json!({"order_id": late_outcome}), Some(&fresh)),
            in_progress,
        )
        .await
        .expect("takeover");
        let winner = store
            .get(&only_key(&h, late_outcome).await)
            .await
            .expect("get")
            .expect("record");
        assert_eq!(winner.status, Status::Completed);

        gate.notify_one();
        match (fail, late.await.expect("join")) {
            (false, Err(Error::Idempotency(IdempotencyError::LostOwnership { .. }))) => {}
            (true, Err(Error::Handler(e))) => assert_eq!(e.to_string(), "late failure"),
            (_, other) => panic!("{late_outcome}: unexpected {other:?}"),
        }
        // The late owner neither overwrote nor deleted the new owner's record.
        let after = store
            .get(&winner.key)
            .await
            .expect("get")
            .expect("record kept");
        assert_eq!(after, winner);
        assert_eq!(
            after.data.as_deref(),
            Some(serde_json::to_string(&taken_over).expect("json").as_str())
        );
        runs.reset();
    }
}

/// The one key in `store` created for order id `order_id` (the "work" function's scope).
async fn only_key<S: Store>(h: &Harness<S>, order_id: &str) -> String {
    let key = h.key(Some("work"), order_id);
    assert!(
        h.store.get(&key).await.expect("get").is_some(),
        "no record under {key}"
    );
    key
}

async fn a_remaining_time_of_zero_is_a_valid_deadline<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    let event = LambdaEvent::new(json!({"order_id": "zero"}), context(0));
    service
        .ready()
        .await
        .expect("ready")
        .call(event)
        .await
        .expect("runs");
    assert_eq!(runs.get(), 1);
    assert_eq!(h.records().await, 1);
}

async fn an_expired_completed_record_counts_as_absent<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    invoke(&mut service, json!({"order_id": "old"}))
        .await
        .expect("first");
    let key = h.key(None, "old");

    h.expire_in_place(&key).await;

    invoke(&mut service, json!({"order_id": "old"}))
        .await
        .expect("runs again");
    assert_eq!(runs.get(), 2);
    let fresh = store.get(&key).await.expect("get").expect("record");
    assert!(
        fresh.expiration > now_ms() / 1000,
        "replaced by a live record"
    );
}

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Order {
    id: u64,
    customer: String,
    note: String,
}

async fn a_typed_closure_selects_the_key_material<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let by_order = config(&h)
        .key_fn(|order: &Order| (order.customer.clone(), order.id))
        .build()
        .expect("config");
    let idempotency = Idempotency::new(store.clone(), by_order);
    let runs = Counter::default();
    let mut service = {
        let runs = runs.clone();
        idempotency
            .wrap(service_fn(move |event: LambdaEvent<Order>| {
                let run = runs.hit();
                async move { Ok::<_, BoxError>(json!({"id": event.payload.id, "run": run})) }
            }))
            .expect("one handler per key prefix")
    };
    let order = |id, note: &str| Order {
        id,
        customer: "c-1".into(),
        note: note.into(),
    };
    for (id, note) in [(1, "a"), (1, "b"), (2, "a")] {
        service
            .ready()
            .await
            .expect("ready")
            .call(LambdaEvent::new(order(id, note), context(60_000)))
            .await
            .expect("call");
    }
    assert_eq!(runs.get(), 2, "the note is not part of the key");
    assert_eq!(h.records().await, 2);

    // A closure over another event type is a clear error, and the handler does not run.
    let mismatched = Idempotency::new(
        store.clone(),
        config(&h)
            .key_fn(|order: &Order| order.id)
            .build()
            .expect("config"),
    );
    let err = invoke(&mut counting_service(&mismatched, &runs), json!({"id": 1}))
        .await
        .expect_err("type mismatch");
    match idempotency_error(&err) {
        IdempotencyError::InvalidEvent(reason) => assert!(reason.contains("Order"), "{reason}"),
        other => panic!("{other}"),
    }
    assert_eq!(runs.get(), 2);
}

async fn two_wrapped_functions_with_the_same_payload_get_distinct_keys<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let idempotency = Idempotency::new(store.clone(), h.builder().build().expect("config"));
    let runs = Counter::default();
    let make = |name: &'static str| {
        let runs = runs.clone();
        idempotency.function(name, move |payload: Value| {
            runs.hit();
            async move { Ok::<_, BoxError>(json!({"by": name, "payload": payload})) }
        })
    };
    let (reserve, charge) = (make("reserve_stock"), make("charge_card"));
    let payload = json!({"order_id": 7});
    assert_eq!(
        reserve.call(payload.clone(), None).await.expect("reserve")["by"],
        "reserve_stock"
    );
    assert_eq!(
        charge.call(payload.clone(), None).await.expect("charge")["by"],
        "charge_card"
    );
    assert_eq!(
        charge.call(payload.clone(), None).await.expect("replay")["by"],
        "charge_card"
    );
    assert_eq!(runs.get(), 2);
    assert_eq!(h.records().await, 2);
}

async fn the_disable_switch_bypasses_the_store<S: Store>(h: Harness<S>) {
    let store = CountingStore::new(h.store.clone());
    let idempotency = Idempotency::new(
        store.clone(),
        config(&h).disabled(true).build().expect("config"),
    );
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    for _ in 0..3 {
        invoke(&mut service, json!({"order_id": "d"}))
            .await
            .expect("runs");
    }
    assert_eq!(runs.get(), 3);
    assert_eq!(store.calls.get(), 0);
}

async fn the_replay_hook_sees_the_replayed_response_and_its_record<S: Store>(h: Harness<S>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hooked = {
        let seen = seen.clone();
        config(&h).on_replay(move |response, record| {
            seen.lock()
                .expect("lock")
                .push((response.clone(), record.key.clone(), record.status))
        })
    };
    let idempotency = Idempotency::new(h.store.clone(), hooked.build().expect("config"));
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    let first = invoke(&mut service, json!({"order_id": "h"}))
        .await
        .expect("first");
    assert!(
        seen.lock().expect("lock").is_empty(),
        "a first execution is not a replay"
    );
    invoke(&mut service, json!({"order_id": "h"}))
        .await
        .expect("replay");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec![(first, h.key(None, "h"), Status::Completed)]);
}

async fn a_malformed_event_is_a_typed_error_and_the_handler_does_not_run<S: Store>(h: Harness<S>) {
    let store = h.store.clone();
    let from_body = h
        .builder()
        .key_expression("powertools_json(body).order_id")
        .build()
        .expect("config");
    let idempotency = Idempotency::new(store.clone(), from_body);
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    let err = invoke(&mut service, json!({"body": "{not json"}))
        .await
        .expect_err("malformed");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::InvalidEvent(_)),
        "{err}"
    );
    assert_eq!(runs.get(), 0);
    assert_eq!(h.records().await, 0);

    invoke(&mut service, json!({"body": "{\"order_id\": \"b-1\"}"}))
        .await
        .expect("well formed");
    invoke(
        &mut service,
        json!({"body": "{\"order_id\":\"b-1\", \"x\": 1}"}),
    )
    .await
    .expect("replay");
    assert_eq!(runs.get(), 1);
}

async fn the_layer_wraps_a_handler_in_a_service_builder<S: Store>(h: Harness<S>) {
    let idempotency = Idempotency::new(h.store.clone(), config(&h).build().expect("config"));
    let runs = Counter::default();
    let mut service = {
        let runs = runs.clone();
        tower::ServiceBuilder::new()
            .layer(IdempotencyLayer::new(&idempotency).expect("the key prefix is free"))
            .service(service_fn(move |e: LambdaEvent<Value>| {
                runs.hit();
                async move { Ok::<_, BoxError>(e.payload) }
            }))
    };
    assert!(
        matches!(
            idempotency.layer(),
            Err(ConfigError::SharedKeyPrefix { .. })
        ),
        "a second layer would share the first one's keys"
    );
    invoke(&mut service, json!({"order_id": "l"}))
        .await
        .expect("first");
    invoke(&mut service, json!({"order_id": "l"}))
        .await
        .expect("replay");
    assert_eq!(runs.get(), 1);
}

/// What `lambda_runtime::run_concurrent` does: clones of one service, invoked at
/// the same time on several threads, sharing the store client and the cache.
async fn fifty_concurrent_calls_with_one_key_run_the_handler_once<S: Store>(h: Harness<S>) {
    const CALLS: usize = 50;
    let store = CountingStore::new(h.store.clone());
    let idempotency = Idempotency::new(
        store.clone(),
        config(&h).local_cache(16).build().expect("config"),
    );
    let gate = Arc::new(Notify::new());
    let runs = Counter::default();
    let service = {
        let (gate, runs) = (gate.clone(), runs.clone());
        idempotency
            .wrap(service_fn(move |_: LambdaEvent<Value>| {
                runs.hit();
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok::<_, BoxError>(json!({"charged": true}))
                }
            }))
            .expect("one handler per key prefix")
    };

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..CALLS {
        let (call, tx) = (spawn_call(&service, json!({"order_id": "c"})), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(call.await.expect("join"));
        });
    }
    // Everyone but the one running the handler is refused while it is held.
    let mut refused = 0;
    for _ in 0..CALLS - 1 {
        let result = rx.recv().await.expect("result");
        let err = result.expect_err("only one call can run");
        assert!(err.contains("in progress"), "{err}");
        refused += 1;
    }
    gate.notify_one();
    assert_eq!(
        rx.recv().await.expect("result").expect("the running call"),
        json!({"charged": true})
    );
    assert_eq!((runs.get(), refused), (1, CALLS - 1));

    // Now completed and cached: 50 concurrent replays, no store request.
    let before = store.calls.get();
    let replays: Vec<_> = (0..CALLS)
        .map(|_| spawn_call(&service, json!({"order_id": "c"})))
        .collect();
    for replay in replays {
        assert_eq!(
            replay.await.expect("join").expect("replay"),
            json!({"charged": true})
        );
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(store.calls.get(), before);
}

async fn a_store_of_records_alone_serves_handlers_and_refuses_steps_and_outbox_without_running_them<
    S: Store,
>(
    h: Harness<S>,
) {
    let store = CountingStore::new(h.store.clone()).records_only();
    assert!(store.journal().is_none() && store.outbox().is_none());
    let idempotency = Idempotency::new(store, config(&h).build().expect("config"));

    // A plain handler needs nothing but the record contract.
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);
    let first = invoke(&mut service, json!({"order_id": "plain"}))
        .await
        .expect("first");
    let replay = invoke(&mut service, json!({"order_id": "plain"}))
        .await
        .expect("replay");
    assert_eq!((runs.get(), &first), (1, &replay));

    // A step is refused before its closure runs, and the key is given back.
    let effect_runs = Counter::default();
    let step_runs = effect_runs.clone();
    let with_step = idempotency.function("with_step", move |order: Value| {
        let step_runs = step_runs.clone();
        async move {
            let effects = lambda_idempotency::effects()?;
            effects
                .step("charge", |key| async move {
                    step_runs.hit();
                    Ok::<_, std::io::Error>(key)
                })
                .await?;
            Ok::<_, Error<std::io::Error>>(order)
        }
    });
    let refused = with_step.call(json!({"order_id": "step"}), None).await;
    assert!(
        matches!(
            refused,
            // The handler passed the step's error on with `?`.
            Err(Error::Handler(Error::Idempotency(
                IdempotencyError::Unsupported {
                    missing: "step journal"
                }
            )))
        ),
        "{refused:?}"
    );
    assert_eq!(effect_runs.get(), 0);

    {
        // Staged messages cannot be committed: refused, nothing kept, key released.
        let with_outbox = idempotency.function("with_outbox", |order: Value| async move {
            let effects = lambda_idempotency::effects()?;
            effects
                .outbox()
                .push(lambda_idempotency::OutboxMessage::Custom {
                    sink: "audit".into(),
                    payload: order.clone(),
                });
            Ok::<_, Error<std::io::Error>>(order)
        });
        let refused = with_outbox.call(json!({"order_id": "outbox"}), None).await;
        assert!(
            matches!(
                refused,
                Err(Error::Idempotency(IdempotencyError::Unsupported {
                    missing: "outbox"
                }))
            ),
            "{refused:?}"
        );
    }
    // Only the plain handler's completed record is left: both refusals released theirs.
    assert_eq!(h.records().await, 1);
}

async fn a_step_s_permanent_error_passed_on_with_the_question_mark_is_permanent<S: Store>(
    h: Harness<S>,
) {
    let idempotency = Idempotency::new(
        h.store.clone(),
        config(&h)
            .replay_permanent_errors(true)
            .build()
            .expect("config"),
    );
    let runs = Counter::default();
    let ship = idempotency.function("ship", {
        let runs = runs.clone();
        move |_: Value| {
            runs.hit();
            async move {
                // The step's `PermanentError` reaches the engine inside an
                // `Error<PermanentError>`, the handler's own error type.
                lambda_idempotency::effects()?
                    .step("carrier", |_| async move {
                        Err::<Value, _>(PermanentError::new("no carrier serves this address"))
                    })
                    .await
            }
        }
    });
    for _ in 0..2 {
        let err = ship
            .call(json!({"order_id": "p-step"}), None)
            .await
            .expect_err("refused permanently");
        assert!(err.to_string().contains("no carrier"), "{err}");
    }
    // Stored as a permanent error and replayed: the handler ran once.
    assert_eq!(runs.get(), 1);
}

/// A failed attempt that made a step keeps its record open; the retry resumes
/// its execution, replays the journaled step instead of running it again, and
/// commits its outbox message with the response, delivered once with its
/// derived key and marked delivered.
async fn a_failed_attempt_s_steps_replay_on_resume_and_its_outbox_is_delivered_once<S: Store>(
    h: Harness<S>,
) {
    let audit = Audit::default();
    let idempotency = Idempotency::new(h.store.clone(), config(&h).build().expect("config"))
        .with_dispatcher(Dispatcher::new().with_sink("audit", audit.clone()));
    let (runs, charges) = (Counter::default(), Counter::default());
    let ship = {
        let (runs, charges) = (runs.clone(), charges.clone());
        idempotency.function("ship", move |order: Value| {
            let (run, charges) = (runs.hit(), charges.clone());
            async move {
                let effects = lambda_idempotency::effects()?;
                let charge = effects
                    .step("charge", |key| async move {
                        Ok::<_, std::io::Error>(json!({"charge": charges.hit(), "key": key}))
                    })
                    .await?;
                if run == 1 {
                    return Err(Error::Handler(std::io::Error::other("carrier down")));
                }
                let message = effects.outbox().push(OutboxMessage::Custom {
                    sink: "audit".into(),
                    payload: order.clone(),
                });
                Ok::<_, Error<std::io::Error>>(json!({"charge": charge, "message": message}))
            }
        })
    };
    let order = json!({"order_id": "s-1"});
    let failed = ship.call(order.clone(), None).await;
    assert!(
        matches!(failed, Err(Error::Handler(Error::Handler(_)))),
        "the handler's error: {failed:?}"
    );
    let key = h.key(Some("ship"), "s-1");
    let open = h.store.get(&key).await.expect("get").expect("kept open");
    assert_eq!(
        (open.status, open.in_progress_expiration),
        (Status::InProgress, Some(0)),
        "open to the next attempt at once"
    );
    let step_key = format!("{key}#{}#step#0", open.execution);
    let journaled = h
        .store
        .journal()
        .expect("a journal")
        .get_step(&step_key)
        .await
        .expect("get_step")
        .expect("the charge journaled");
    assert_eq!(journaled.name, "charge");

    let response = ship.call(order.clone(), None).await.expect("resumed");
    assert_eq!(
        (runs.get(), charges.get()),
        (2, 1),
        "the charge replayed from the journal"
    );
    assert_eq!(
        serde_json::to_string(&response["charge"]).expect("json"),
        journaled.data
    );
    let record = h.store.get(&key).await.expect("get").expect("record");
    assert_eq!(
        (record.status, &record.execution),
        (Status::Completed, &open.execution),
        "completed by the resumed execution"
    );
    let message = response["message"].as_str().expect("a derived key");
    assert_eq!(
        audit.delivered(),
        vec![(order.clone(), message.to_owned())],
        "delivered after the commit, with its derived key"
    );
    let outbox = h.store.outbox().expect("an outbox");
    let committed = outbox
        .get_outbox(&format!("{key}#{}#outbox#0", record.execution))
        .await
        .expect("get_outbox")
        .expect("committed with the record");
    // Marked: no sweep delivers it again (a sweep reads the whole store's
    // outbox, on a shared server other tests' messages too).
    assert_eq!(
        (committed.derived_key.as_str(), committed.delivered),
        (message, true)
    );

    assert_eq!(ship.call(order, None).await.expect("replay"), response);
    assert_eq!(
        (runs.get(), charges.get(), audit.delivered().len()),
        (2, 1, 1)
    );
}
