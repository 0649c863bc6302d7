//! The producer against a real local Kinesis (kinesalite), with faults injected by the
//! project's proxy: every user record is read back, deaggregated, and checked with the KCL's
//! shard-range rule for the shard it was read from.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use kinesis_core::batch::RecordBatch;
use kinesis_core::cancel::CancelToken;
use kinesis_core::config::{Credentials, Destination, KeyMode, ProducerConfig};
use kinesis_core::error::FailureKind;
use kinesis_core::kpl::{deaggregate, kcl_user_records, Deaggregated};
use kinesis_core::producer::{BatchOutcome, Producer, RecordStatus};
use support::{Entries, Fault, FaultProxy, Kinesalite};

fn config(endpoint: &str, mode: KeyMode) -> ProducerConfig {
    ProducerConfig {
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        credentials: Credentials::Static {
            access_key_id: "AKIDTEST".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        },
        key_mode: mode,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        deadline: Duration::from_secs(60),
        ..ProducerConfig::default()
    }
}

/// Records with unique, recognisable data; keys from a small set so aggregates share them.
fn batch(n: usize, keys: Option<usize>) -> RecordBatch {
    let mut b = RecordBatch::default();
    for i in 0..n {
        let data = format!(
            "{{\"seq\":{i},\"line\":\"127.0.0.1 - - GET /index.html?{i} HTTP/1.1 200 {}\"}}\n",
            "x".repeat(i % 300)
        );
        let key = keys.map(|k| format!("host-{}", i % k));
        b.push(data.as_bytes(), key.as_deref(), None);
    }
    b
}

fn all(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// A stop signal nobody fires.
fn go() -> CancelToken {
    CancelToken::new()
}

/// What a KCL consumer delivers, counted per user record data.
async fn kcl_view(endpoint: &str, stream: &str) -> HashMap<Vec<u8>, usize> {
    let client = support::client(endpoint).await;
    let mut seen = HashMap::new();
    for r in support::read_all(&client, stream).await {
        for u in kcl_user_records(
            &r.data,
            &r.partition_key,
            r.starting_hash_key,
            r.ending_hash_key,
        ) {
            *seen.entry(u.data).or_insert(0) += 1;
        }
    }
    seen
}

fn assert_each_once(batch: &RecordBatch, seen: &HashMap<Vec<u8>, usize>) {
    for i in 0..batch.len() {
        assert_eq!(
            seen.get(batch.data(i)).copied(),
            Some(1),
            "user record {i} was read back {:?} times",
            seen.get(batch.data(i))
        );
    }
    assert_eq!(
        seen.len(),
        batch.len(),
        "records nobody sent were read back"
    );
}

fn assert_all_delivered(o: &BatchOutcome) {
    assert!(o.all_delivered(), "not all delivered: {:?}", o.failures);
    assert_eq!(o.counters.delivered as usize, o.status.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_keys_spread_over_shards_and_every_record_arrives_once() {
    let k = Kinesalite::start();
    let stream = support::unique_stream_name("random");
    support::create_stream(&support::client(&k.endpoint()).await, &stream, 4).await;
    let producer = Producer::new(config(&k.endpoint(), KeyMode::RandomPerAggregate))
        .await
        .unwrap();
    let b = batch(20_000, None);
    let o = producer
        .put(&stream, &b, &all(b.len()), &go(), &|_| {})
        .await;
    assert_all_delivered(&o);
    assert!(o.counters.aggregates >= 2, "{:?}", o.counters);
    assert!(
        o.counters.requests < o.counters.kinesis_records,
        "records were not batched: {:?}",
        o.counters
    );
    assert_each_once(&b, &kcl_view(&k.endpoint(), &stream).await);
    // Aggregates are full: all but the last reach at least 90% of the 1 MiB limit.
    let client = support::client(&k.endpoint()).await;
    let mut sizes: Vec<usize> = support::read_all(&client, &stream)
        .await
        .iter()
        .map(|r| r.data.len() + r.partition_key.len())
        .collect();
    sizes.sort();
    assert!(sizes[1] as f64 >= 0.9 * 1024.0 * 1024.0, "{sizes:?}");
    assert!(*sizes.last().unwrap() <= 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_record_keys_aggregate_per_shard_and_pass_the_kcl_range_check() {
    let k = Kinesalite::start();
    let stream = support::unique_stream_name("perkey");
    support::create_stream(&support::client(&k.endpoint()).await, &stream, 4).await;
    let mut cfg = config(&k.endpoint(), KeyMode::PerRecord);
    cfg.aggregation_max_bytes = 64 * 1024; // many aggregates per shard
    let producer = Producer::new(cfg).await.unwrap();
    let b = batch(5_000, Some(50));
    let o = producer
        .put(&stream, &b, &all(b.len()), &go(), &|_| {})
        .await;
    assert_all_delivered(&o);
    assert_eq!(o.counters.wrong_shard, 0);
    // Every aggregate read back passes the range check of the shard it was read from (the KCL
    // would otherwise drop it), and user records keep their own partition keys.
    let client = support::client(&k.endpoint()).await;
    let mut users = 0;
    for r in support::read_all(&client, &stream).await {
        if let Deaggregated::Aggregate(recs) = deaggregate(&r.data) {
            kinesis_core::kpl::check_shard_range(&recs, r.starting_hash_key, r.ending_hash_key)
                .expect("aggregate would be dropped by the KCL");
            assert!(recs.iter().all(|u| u.partition_key.starts_with("host-")));
            users += recs.len();
        } else {
            users += 1;
        }
    }
    assert_eq!(users, b.len());
    assert_each_once(&b, &kcl_view(&k.endpoint(), &stream).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_throttling_5xx_resets_and_timeouts_lose_nothing() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let stream = support::unique_stream_name("faults");
    support::create_stream(&support::client(&k.endpoint()).await, &stream, 4).await;
    let mut cfg = config(&proxy.endpoint(), KeyMode::PerRecord);
    cfg.aggregation_max_bytes = 16 * 1024;
    cfg.batch_max_entries = 20;
    cfg.concurrency = 4;
    cfg.request_timeout = Duration::from_millis(800);
    let producer = Producer::new(cfg).await.unwrap();
    producer.check_stream(&stream).await.unwrap();
    proxy.push_n(6, Fault::PartialThrottle(Entries::Fraction(0.4)));
    proxy.push(Fault::Status(500));
    proxy.push(Fault::PartialInternalFailure(Entries::Fraction(0.5)));
    proxy.push(Fault::Status(503));
    proxy.push(Fault::Reset);
    proxy.push(Fault::ThrottleRequest);
    proxy.push(Fault::Delay(Duration::from_millis(1500)));
    let b = batch(4_000, Some(64));
    let o = producer
        .put(&stream, &b, &all(b.len()), &go(), &|_| {})
        .await;
    proxy.settle().await;
    assert_all_delivered(&o);
    let c = &o.counters;
    assert!(
        c.throttled_entries > 0 && c.retried_entries > 0 && c.request_errors >= 4,
        "{c:?}"
    );
    assert_eq!(proxy.pending(), 0, "not every fault was hit");
    // The timed-out request may have landed as well (as on the real service): at least once.
    let seen = kcl_view(&k.endpoint(), &stream).await;
    for i in 0..b.len() {
        assert!(
            seen.get(b.data(i)).copied().unwrap_or(0) >= 1,
            "user record {i} lost"
        );
    }
}

/// kinesis_streams: one Kinesis record per user record, each with its own partition key (the
/// record's, or a fresh random one) landing on the shard its key hashes to, bytes untouched,
/// PutRecords calls packed to the entry limit; through throttled and failed entries and calls,
/// every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaggregated_records_keep_their_keys_and_arrive_once_through_faults() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let admin = support::client(&k.endpoint()).await;
    for mode in [KeyMode::PerRecord, KeyMode::RandomPerAggregate] {
        let stream = support::unique_stream_name("unaggregated");
        support::create_stream(&admin, &stream, 4).await;
        let mut cfg = config(&proxy.endpoint(), mode.clone());
        cfg.destination = Destination::Streams { aggregate: false };
        cfg.max_retries = 30;
        let producer = Producer::new(cfg).await.unwrap();
        proxy.clear();
        proxy.always(Fault::PartialThrottle(Entries::Fraction(0.2)));
        proxy.sometimes(0.1, Fault::Status(500));
        proxy.sometimes(0.1, Fault::PartialInternalFailure(Entries::Fraction(0.3)));
        let b = batch(3_000, (mode == KeyMode::PerRecord).then_some(97));
        let o = producer
            .put(&stream, &b, &all(b.len()), &go(), &|_| {})
            .await;
        assert_all_delivered(&o);
        let c = &o.counters;
        assert_eq!((c.kinesis_records, c.aggregates), (3_000, 0), "{c:?}");
        assert!(c.throttled_entries > 0 && c.retried_entries > 0, "{c:?}");
        let first_calls = c.requests - c.request_errors;
        assert!(
            first_calls >= 6,
            "3,000 records need at least 6 calls of 500"
        );

        let records = support::read_all(&admin, &stream).await;
        assert_eq!(records.len(), 3_000, "one Kinesis record per user record");
        let mut keys = std::collections::HashSet::new();
        for r in &records {
            assert!(
                matches!(deaggregate(&r.data), Deaggregated::PassThrough),
                "not aggregated"
            );
            let hash = kinesis_core::hashkey::partition_key_hash(&r.partition_key);
            assert!(hash >= r.starting_hash_key && hash <= r.ending_hash_key);
            let i = (0..b.len())
                .find(|&i| b.data(i) == r.data.as_slice())
                .unwrap();
            match b.partition_key(i) {
                Some(key) => assert_eq!(r.partition_key, key),
                None => assert_eq!(r.partition_key.len(), 32),
            }
            keys.insert(r.partition_key.clone());
        }
        if mode == KeyMode::RandomPerAggregate {
            assert_eq!(keys.len(), 3_000, "a fresh random key per record");
        }
        assert_each_once(&b, &kcl_view(&k.endpoint(), &stream).await);
    }
}

/// kinesis_streams: a record's explicit hash key decides its shard; a record too large with its
/// key is refused with the reason, the others delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaggregated_explicit_hash_keys_and_oversized_records() {
    let k = Kinesalite::start();
    let admin = support::client(&k.endpoint()).await;
    let stream = support::unique_stream_name("unaggregated-ehk");
    support::create_stream(&admin, &stream, 4).await;
    let mut cfg = config(&k.endpoint(), KeyMode::PerRecord);
    cfg.destination = Destination::Streams { aggregate: false };
    let producer = Producer::new(cfg).await.unwrap();
    let mut b = RecordBatch::default();
    for i in 0..40u128 {
        let ehk = (i % 4) * (u128::MAX / 4) + 1000 + i;
        b.push(format!("ehk {i}").as_bytes(), Some("same-key"), Some(ehk));
    }
    b.push(&vec![b'x'; 1024 * 1024], Some("k"), None);
    let o = producer
        .put(&stream, &b, &all(b.len()), &go(), &|_| {})
        .await;
    let RecordStatus::Refused(f) = o.status[40] else {
        panic!("the oversized record was not refused: {:?}", o.status[40])
    };
    assert!(o.failures[f as usize].message.contains("1048577 bytes"));
    assert_eq!(o.counters.delivered, 40);
    let records = support::read_all(&admin, &stream).await;
    assert_eq!(records.len(), 40);
    for r in records {
        let i: u128 = String::from_utf8(r.data[4..].to_vec())
            .unwrap()
            .parse()
            .unwrap();
        let ehk = (i % 4) * (u128::MAX / 4) + 1000 + i;
        assert!(ehk >= r.starting_hash_key && ehk <= r.ending_hash_key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_split_mid_run_is_recovered_for_kcl_consumers() {
    let k = Kinesalite::start();
    let admin = support::client(&k.endpoint()).await;
    let stream = support::unique_stream_name("split");
    let shards = support::create_stream(&admin, &stream, 2).await;
    let mut cfg = config(&k.endpoint(), KeyMode::PerRecord);
    cfg.aggregation_max_bytes = 32 * 1024;
    let producer = Producer::new(cfg).await.unwrap();
    let first = batch(500, Some(40));
    assert_all_delivered(
        &producer
            .put(&stream, &first, &all(first.len()), &go(), &|_| {})
            .await,
    );
    // Split shard 0 in the middle of its range: the producer's cached map is now stale.
    let s0 = &shards[0];
    support::split_shard(
        &admin,
        &stream,
        &s0.shard_id,
        s0.starting_hash_key + (s0.ending_hash_key - s0.starting_hash_key) / 2,
    )
    .await;
    let mut second = RecordBatch::default();
    for i in 0..3000 {
        second.push(
            format!("after-split-{i}").as_bytes(),
            Some(&format!("key-{}", i % 200)),
            None,
        );
    }
    let o = producer
        .put(&stream, &second, &all(second.len()), &go(), &|_| {})
        .await;
    assert_all_delivered(&o);
    assert!(
        o.counters.wrong_shard > 0,
        "the stale map was never noticed: {:?}",
        o.counters
    );
    assert!(
        o.counters.shard_map_refreshes >= 1 && o.counters.resent_user_records > 0,
        "{:?}",
        o.counters
    );
    let seen = kcl_view(&k.endpoint(), &stream).await;
    for i in 0..second.len() {
        assert_eq!(
            seen.get(second.data(i)).copied(),
            Some(1),
            "after-split record {i} as a KCL consumer sees it"
        );
    }
    for i in 0..first.len() {
        assert_eq!(seen.get(first.data(i)).copied(), Some(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_not_dropped() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let stream = support::unique_stream_name("fail");
    support::create_stream(&support::client(&k.endpoint()).await, &stream, 2).await;

    // A missing stream needs a person, and says what to check.
    let producer = Producer::new(config(&k.endpoint(), KeyMode::RandomPerAggregate))
        .await
        .unwrap();
    let b = batch(10, None);
    let o = producer
        .put("no-such-stream", &b, &all(10), &go(), &|_| {})
        .await;
    assert_eq!(o.counters.failed, 10);
    let RecordStatus::Failed(i) = o.status[0] else {
        panic!("{:?}", o.status[0])
    };
    let f = &o.failures[i as usize];
    assert_eq!(
        (f.kind, f.code.as_str()),
        (FailureKind::NeedsAttention, "ResourceNotFoundException")
    );
    assert!(f.message.contains("stream_name"), "{}", f.message);
    let e = producer.check_stream("no-such-stream").await.unwrap_err();
    assert_eq!(e.code, "ResourceNotFoundException");

    // Throttling that never ends: retries are bounded, the records are reported as throttled.
    let mut cfg = config(&proxy.endpoint(), KeyMode::RandomPerAggregate);
    cfg.max_retries = 3;
    let producer = Producer::new(cfg).await.unwrap();
    proxy.always_for("PutRecords", Fault::PartialThrottle(Entries::Fraction(1.0)));
    let o = producer.put(&stream, &b, &all(10), &go(), &|_| {}).await;
    proxy.clear();
    assert_eq!(o.counters.failed, 10);
    let RecordStatus::Failed(i) = o.status[3] else {
        panic!()
    };
    assert_eq!(o.failures[i as usize].kind, FailureKind::Throttled);
    assert!(
        o.failures[i as usize].message.contains("after 4 attempts"),
        "{}",
        o.failures[i as usize].message
    );
    assert_eq!(o.counters.requests, 4);

    // Only the indexes asked for are sent; a record over the limit is refused, not sent.
    let mut big = RecordBatch::default();
    big.push(b"ok-1", None, None);
    big.push(&vec![b'x'; 1024 * 1024 + 1], None, None);
    big.push(b"skipped", None, None);
    let o = producer.put(&stream, &big, &[0, 1], &go(), &|_| {}).await;
    assert_eq!(o.status[0], RecordStatus::Delivered);
    assert!(matches!(o.status[1], RecordStatus::Refused(_)));
    assert_eq!(o.status[2], RecordStatus::Skipped);

    // Stopping a delivery (its waiter was killed) starts no new request, but a request already
    // sent finishes and what it delivered is reported, never claimed as undelivered.
    let mut cfg = config(&proxy.endpoint(), KeyMode::RandomPerAggregate);
    cfg.concurrency = 1;
    // One aggregate of about two records per request: several requests, sent one by one.
    cfg.batch_max_entries = 1;
    cfg.aggregation_max_bytes = 250;
    let producer = Producer::new(cfg).await.unwrap();
    let stop = CancelToken::new();
    proxy.push_for("PutRecords", Fault::Delay(Duration::from_millis(1500)));
    let confirmed = std::sync::Mutex::new(Vec::new());
    let record = |m: &[u32]| confirmed.lock().unwrap().extend_from_slice(m);
    let started = std::time::Instant::now();
    let indexes = all(10);
    let (o, _) = tokio::join!(producer.put(&stream, &b, &indexes, &stop, &record), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert!(started.elapsed() < Duration::from_secs(5));
    let delivered: Vec<u32> = (0..10)
        .filter(|&i| o.status[i as usize] == RecordStatus::Delivered)
        .collect();
    assert!(
        !delivered.is_empty() && delivered.len() < 10,
        "{:?}",
        o.status
    );
    let mut reported = confirmed.lock().unwrap().clone();
    reported.sort();
    assert_eq!(
        reported, delivered,
        "the progress callback saw every delivered record"
    );
    for i in 0..10 {
        if let RecordStatus::Failed(f) = o.status[i] {
            assert_eq!(o.failures[f as usize].kind, FailureKind::Cancelled);
        }
    }
    assert_eq!(o.counters.requests, 1, "nothing was sent after the stop");
    proxy.clear();
}

/// The KPL metrics a delivery records add up to its outcome and to what the stream holds, level
/// by level, with throttled entries, a failed request and records that finally fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_to_the_outcome_and_the_stream() {
    use kinesis_core::metrics::{Granularity, Level, Metrics, MetricsConfig, Name};
    use std::sync::Arc;

    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let stream = support::unique_stream_name("metrics");
    support::create_stream(&support::client(&k.endpoint()).await, &stream, 4).await;
    let mut cfg = config(&proxy.endpoint(), KeyMode::PerRecord);
    cfg.aggregation_max_bytes = 8 * 1024;
    cfg.batch_max_entries = 25;
    cfg.max_retries = 1; // some records run out of retries
    let metrics = Arc::new(Metrics::new(
        MetricsConfig {
            level: Level::Detailed,
            granularity: Granularity::Shard,
            ..MetricsConfig::default()
        },
        None,
    ));
    let producer = Producer::new(cfg)
        .await
        .unwrap()
        .with_metrics(metrics.clone());
    producer.check_stream(&stream).await.unwrap();
    proxy.push(Fault::Status(500));
    proxy.always(Fault::PartialThrottle(Entries::Fraction(0.5)));
    let b = batch(3_000, Some(64));
    let o = producer
        .put(&stream, &b, &all(b.len()), &go(), &|_| {})
        .await;
    proxy.clear();
    let c = &o.counters;
    assert!(c.failed > 0 && c.delivered > 0, "{c:?}");
    metrics.sample_pending();
    let data = metrics.take();
    let get = |name: Name, dims: &[(&str, &str)]| {
        data.iter()
            .find(|d| {
                d.name == name
                    && d.dimensions.len() == dims.len()
                    && d.dimensions
                        .iter()
                        .zip(dims)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .unwrap_or_else(|| panic!("no {name:?} {dims:?}"))
            .stats
    };
    let s = [("StreamName", stream.as_str())];
    let put = get(Name::UserRecordsPut, &s);
    assert_eq!(put.sum as u64, c.delivered);
    assert_eq!(put.count as u64, c.delivered + c.failed);
    assert_eq!(get(Name::UserRecordsPut, &[]), put);
    assert_eq!(get(Name::UserRecordsReceived, &s).sum as usize, b.len());
    assert_eq!(get(Name::RetriesPerRecord, &s).count as usize, b.len());
    assert_eq!(get(Name::UserRecordsPending, &s).max, 0.0);
    let kput = get(Name::KinesisRecordsPut, &s);
    assert_eq!((kput.count - kput.sum) as u64, c.throttled_entries);
    let code = "ProvisionedThroughputExceededException";
    assert_eq!(
        get(
            Name::ErrorsByCode,
            &[("ErrorCode", code), ("StreamName", stream.as_str())]
        )
        .sum as u64,
        c.throttled_entries
    );
    assert_eq!(
        get(Name::AllErrors, &s).sum as u64,
        c.throttled_entries + c.request_errors
    );
    assert_eq!(get(Name::RequestTime, &s).count as u64, c.requests);
    // Per shard: what each shard of the stream holds.
    let client = support::client(&k.endpoint()).await;
    let mut per_shard: HashMap<String, u64> = HashMap::new();
    for r in support::read_all(&client, &stream).await {
        let users = match deaggregate(&r.data) {
            Deaggregated::Aggregate(recs) => recs.len() as u64,
            _ => 1,
        };
        *per_shard.entry(r.shard_id.clone()).or_default() += users;
    }
    assert_eq!(per_shard.len(), 4);
    for (shard, users) in &per_shard {
        let at = get(
            Name::UserRecordsPut,
            &[("StreamName", stream.as_str()), ("ShardId", shard.as_str())],
        );
        assert_eq!(at.sum as u64, *users, "{shard}");
    }
}

/// `keep_order`: with entry failures, throttling and 5xx, each key's records read back (every
/// shard in sequence order, as the KCL does) in the order of the batch; without it the same
/// faults reorder them, which shows the check can see disorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_order_keeps_each_keys_records_in_order_through_faults() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let b = batch(6_000, Some(40));
    let mut out_of_order = Vec::new();
    for keep_order in [true, false] {
        let stream = support::unique_stream_name("order");
        support::create_stream(&support::client(&k.endpoint()).await, &stream, 4).await;
        let mut cfg = config(&proxy.endpoint(), KeyMode::PerRecord);
        cfg.aggregation_max_bytes = 4 * 1024;
        cfg.batch_max_entries = 20;
        cfg.max_retries = 30;
        cfg.keep_order = keep_order;
        let producer = Producer::new(cfg).await.unwrap();
        producer.check_stream(&stream).await.unwrap();
        proxy.clear();
        proxy.sometimes(0.05, Fault::Status(500));
        proxy.sometimes(0.3, Fault::PartialThrottle(Entries::Fraction(0.3)));
        proxy.sometimes(0.3, Fault::PartialInternalFailure(Entries::Fraction(0.3)));
        let o = producer
            .put(&stream, &b, &all(b.len()), &go(), &|_| {})
            .await;
        proxy.clear();
        assert_all_delivered(&o);
        assert!(o.counters.retried_entries > 0, "{:?}", o.counters);
        // The batch index of each user record, from its data; per key, the last one seen.
        let client = support::client(&k.endpoint()).await;
        let mut last: HashMap<String, usize> = HashMap::new();
        let (mut bad, mut seen) = (0, 0);
        for r in support::read_all(&client, &stream).await {
            for u in kcl_user_records(
                &r.data,
                &r.partition_key,
                r.starting_hash_key,
                r.ending_hash_key,
            ) {
                let text = String::from_utf8(u.data).unwrap();
                let seq: usize = text["{\"seq\":".len()..text.find(',').unwrap()]
                    .parse()
                    .unwrap();
                seen += 1;
                match last.get(&u.partition_key) {
                    Some(&l) if l > seq => bad += 1,
                    _ => {
                        last.insert(u.partition_key.clone(), seq);
                    }
                }
            }
        }
        assert_eq!(seen, b.len(), "every record once");
        out_of_order.push(bad);
    }
    assert_eq!(out_of_order[0], 0, "keep_order: records out of order");
    assert!(
        out_of_order[1] > 0,
        "the same faults without keep_order reorder records"
    );
}

/// `n` records "{tag}-{i}" without keys.
fn distinct(n: usize, tag: &str) -> RecordBatch {
    let mut b = RecordBatch::default();
    for i in 0..n {
        b.push(format!("{tag}-{i}").as_bytes(), None, None);
    }
    b
}

/// Starts `batches` as consecutive deliveries (as fluentd's chunks with delayed commit: each
/// starts while the one before is still waiting for its partial call to fill), 20 ms apart.
async fn put_consecutively(
    producer: &std::sync::Arc<Producer>,
    stream: &str,
    batches: &[RecordBatch],
) -> Vec<tokio::task::JoinHandle<BatchOutcome>> {
    let mut running = Vec::new();
    for b in batches {
        let (p, s, b) = (producer.clone(), stream.to_string(), b.clone());
        running.push(tokio::spawn(async move {
            p.put(&s, &b, &all(b.len()), &go(), &|_| {}).await
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running
}

/// With `linger`, a delivery's last, partial call waits for the next delivery's records: four
/// deliveries of 250 records make two full calls of 500 instead of four half-empty ones. The
/// last partial call goes when its wait is over, or at once when a stop begins the drain. Under
/// throttling, a retried call that mixes deliveries reports each entry to its own delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_deliveries_share_calls_within_the_linger_time() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let admin = support::client(&k.endpoint()).await;
    let stream = support::unique_stream_name("linger");
    support::create_stream(&admin, &stream, 4).await;
    let mut cfg = config(&proxy.endpoint(), KeyMode::RandomPerAggregate);
    cfg.destination = Destination::Streams { aggregate: false };
    cfg.linger = Duration::from_secs(2);
    cfg.max_retries = 30;
    let producer = std::sync::Arc::new(Producer::new(cfg).await.unwrap());

    // Full calls: 4 x 250 records -> 2 calls of 500, no wait (the last call is exactly full).
    let batches: Vec<RecordBatch> = (0..4).map(|d| distinct(250, &format!("full{d}"))).collect();
    let started = std::time::Instant::now();
    let mut requests = 0;
    for h in put_consecutively(&producer, &stream, &batches).await {
        let o = h.await.unwrap();
        assert_all_delivered(&o);
        requests += o.counters.requests;
    }
    assert_eq!(
        requests, 2,
        "1,000 records of 4 deliveries in 2 calls of 500"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "no call waited");

    // A partial call waits for the linger time, then goes.
    let started = std::time::Instant::now();
    let o = producer
        .put(&stream, &distinct(100, "alone"), &all(100), &go(), &|_| {})
        .await;
    assert_all_delivered(&o);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "the partial call waited {waited:?}, not the 2 s linger time"
    );

    // Throttling: calls mixing deliveries are retried entry by entry; each entry reaches its own
    // delivery. A stop (drain) sends the last partial call without waiting.
    proxy.always(Fault::PartialThrottle(Entries::Fraction(0.3)));
    let batches: Vec<RecordBatch> = (0..5).map(|d| distinct(333, &format!("mix{d}"))).collect();
    let started = std::time::Instant::now();
    let running = put_consecutively(&producer, &stream, &batches).await;
    producer.begin_drain(Duration::from_secs(60));
    let mut throttled = 0;
    for h in running {
        let o = h.await.unwrap();
        assert_all_delivered(&o);
        throttled += o.counters.throttled_entries;
    }
    assert!(throttled > 0, "the proxy throttled nothing");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the drain did not send the waiting call at once"
    );

    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for r in support::read_all(&admin, &stream).await {
        *seen.entry(r.data).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 1_000 + 100 + 5 * 333);
    assert!(seen.values().all(|&n| n == 1), "a record arrived twice");
}

/// With `linger_max`, the wait follows how often deliveries come: chunks arriving every 1.5 s,
/// longer than the 1 s `linger`, still fill each other's calls, where a fixed 1 s wait sends
/// every chunk's partial call on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_the_next_delivery_follows_their_interval() {
    let k = Kinesalite::start();
    let admin = support::client(&k.endpoint()).await;
    let stream = support::unique_stream_name("linger-follows");
    support::create_stream(&admin, &stream, 2).await;
    let mut requests = Vec::new();
    for linger_max in [Duration::ZERO, Duration::from_secs(5)] {
        let mut cfg = config(&k.endpoint(), KeyMode::RandomPerAggregate);
        cfg.destination = Destination::Streams { aggregate: false };
        cfg.linger = Duration::from_secs(1);
        cfg.linger_max = linger_max;
        let producer = std::sync::Arc::new(Producer::new(cfg).await.unwrap());
        // 6 deliveries of 250 records, 1.5 s apart: 3 full calls of 500 if each waits for the
        // next, 6 calls of 250 if not.
        let mut running = Vec::new();
        for d in 0..6 {
            let (p, s) = (producer.clone(), stream.clone());
            let b = distinct(250, &format!("every-1.5s-{}-{d}", linger_max.as_secs()));
            running.push(tokio::spawn(async move {
                p.put(&s, &b, &all(b.len()), &go(), &|_| {}).await
            }));
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let mut n = 0;
        for h in running {
            let o = h.await.unwrap();
            assert_all_delivered(&o);
            n += o.counters.requests;
        }
        requests.push(n);
    }
    assert_eq!(requests[0], 6, "fixed 1 s: every partial call went alone");
    // The first delivery has no interval to follow yet; from the second on, calls are shared.
    assert!(
        requests[1] <= 4,
        "following the interval: {} calls",
        requests[1]
    );
}

/// The request bodies are written by the producer and put in the SDK's request before it is
/// signed: the signature must cover them, or real Kinesis refuses every call (the local servers
/// never check). The proxy recomputes each PutRecords signature from the request it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_put_records_signature_covers_the_body_sent() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let admin = support::client(&k.endpoint()).await;
    let stream = support::unique_stream_name("signed");
    support::create_stream(&admin, &stream, 2).await;

    // Aggregated, and unaggregated with escaped keys and explicit hash keys: every field the
    // body writer writes.
    let producer = Producer::new(config(&proxy.endpoint(), KeyMode::RandomPerAggregate))
        .await
        .unwrap();
    proxy.check_signatures("secret");
    let b = batch(2000, None);
    assert_all_delivered(
        &producer
            .put(&stream, &b, &all(b.len()), &go(), &|_| {})
            .await,
    );

    let mut cfg = config(&proxy.endpoint(), KeyMode::PerRecord);
    cfg.destination = Destination::Streams { aggregate: false };
    let unaggregated = Producer::new(cfg).await.unwrap();
    let mut b = RecordBatch::default();
    for i in 0..50u128 {
        let key = format!("key \"{i}\"\\ é\u{1}");
        let ehk = (i % 2 == 0).then_some(i * (u128::MAX / 50));
        b.push(format!("record {i}").as_bytes(), Some(&key), ehk);
    }
    assert_all_delivered(
        &unaggregated
            .put(&stream, &b, &all(b.len()), &go(), &|_| {})
            .await,
    );
    let s = proxy.stats();
    assert!(s.signatures_valid >= 2, "{s:?}");
    assert_eq!(s.signatures_invalid, 0, "{s:?}");

    // The check itself fails a signature made with another secret.
    proxy.check_signatures("another secret");
    let b = batch(10, None);
    assert_all_delivered(
        &producer
            .put(&stream, &b, &all(b.len()), &go(), &|_| {})
            .await,
    );
    assert!(proxy.stats().signatures_invalid >= 1);
}

/// Following the interval, each delivery that adds to the partial call gives it another wait:
/// deliveries of 150 records (less than a third of a call) 1 s apart fill calls of 500, each
/// from the tail of one delivery, all of the next two and the head of a fourth. Counted from
/// the call's first records only, the wait (1.5 s) would send each call with two deliveries'
/// records, 300, before the third came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_call_keeps_waiting_while_deliveries_keep_filling_it() {
    let k = Kinesalite::start();
    let proxy = FaultProxy::start(&k.endpoint()).await;
    let admin = support::client(&k.endpoint()).await;
    let stream = support::unique_stream_name("linger-extends");
    support::create_stream(&admin, &stream, 2).await;
    let mut cfg = config(&proxy.endpoint(), KeyMode::RandomPerAggregate);
    cfg.destination = Destination::Streams { aggregate: false };
    cfg.linger = Duration::from_millis(500);
    cfg.linger_max = Duration::from_secs(5);
    let producer = std::sync::Arc::new(Producer::new(cfg).await.unwrap());
    let mut running = Vec::new();
    for d in 0..10 {
        let (p, s) = (producer.clone(), stream.clone());
        let b = distinct(150, &format!("every-1s-{d}"));
        running.push(tokio::spawn(async move {
            p.put(&s, &b, &all(b.len()), &go(), &|_| {}).await
        }));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut requests = 0;
    for h in running {
        let o = h.await.unwrap();
        assert_all_delivered(&o);
        requests += o.counters.requests;
    }
    // The first delivery goes alone (no interval known yet); then 1,350 records: 500, 500, 350.
    assert_eq!(
        proxy.handle().stats().requests("PutRecords"),
        4,
        "calls the server saw"
    );
    assert_eq!(requests, 4, "calls the deliveries counted");
    let seen = support::read_all(&admin, &stream).await;
    assert_eq!(seen.len(), 1_500);
}
