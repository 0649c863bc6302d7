//! The producer delivering to Amazon Data Firehose (moto's, with S3 behind it, where each
//! PutRecordBatch call becomes one object), with faults injected by the project's proxy: every
//! user record reaches S3 exactly once, byte for byte, one Firehose record each or packed.

mod support;

use std::time::Duration;

use kinesis_core::batch::RecordBatch;
use kinesis_core::cancel::CancelToken;
use kinesis_core::config::{Credentials, Destination, ProducerConfig, FIREHOSE_MAX_RECORD_BYTES};
use kinesis_core::producer::{Producer, RecordStatus};
use support::{create_delivery_stream, s3_objects, Entries, Fault, FaultProxy, Moto};

const PUT_RECORD_BATCH: &str = "PutRecordBatch";

fn config(endpoint: &str, pack: bool) -> ProducerConfig {
    ProducerConfig {
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        credentials: Credentials::Static {
            access_key_id: "AKIDTEST".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        },
        destination: Destination::Firehose { pack },
        max_record_bytes: FIREHOSE_MAX_RECORD_BYTES,
        batch_max_bytes: 4 * 1024 * 1024,
        max_retries: 40,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        deadline: Duration::from_secs(60),
        ..ProducerConfig::default()
    }
}

/// Newline-terminated lines of 100 to 400 bytes, unique and recognisable.
fn lines(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{i:08} GET /item/{i} {}\n", "y".repeat(80 + i % 300)).into_bytes())
        .collect()
}

fn batch_of(lines: &[Vec<u8>]) -> RecordBatch {
    let mut b = RecordBatch::default();
    for l in lines {
        b.push(l, None, None);
    }
    b
}

fn sorted_lines(objects: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = objects
        .iter()
        .flat_map(|o| o.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec))
        .collect();
    out.sort();
    out
}

/// Throttled and failed entries (FailedPutCount > 0), throttled and failed calls and dropped
/// connections: only the entries that failed are sent again, so S3 holds every line once.
#[tokio::test]
async fn only_failed_entries_are_resent_one_record_each_and_packed() {
    let moto = Moto::shared();
    for pack in [false, true] {
        let (stream, bucket) = create_delivery_stream(moto, "producer-firehose").await;
        let proxy = FaultProxy::start(&moto.endpoint()).await;
        proxy.always_for(
            PUT_RECORD_BATCH,
            Fault::PartialThrottle(Entries::Fraction(0.3)),
        );
        proxy.sometimes_for(
            PUT_RECORD_BATCH,
            0.1,
            Fault::PartialInternalFailure(Entries::Fraction(0.5)),
        );
        proxy.sometimes_for(PUT_RECORD_BATCH, 0.1, Fault::Status(500));
        proxy.sometimes_for(PUT_RECORD_BATCH, 0.05, Fault::ThrottleRequest);
        proxy.sometimes_for(PUT_RECORD_BATCH, 0.05, Fault::Reset);
        // The bodies are the producer's own, put in before signing: the signature covers them.
        proxy.check_signatures("secret");
        let mut c = config(&proxy.endpoint(), pack);
        // Small records and calls, so a few thousand lines make many calls and packed records.
        c.max_record_bytes = 16 * 1024;
        c.batch_max_bytes = 64 * 1024;
        c.batch_max_entries = 50;
        let producer = Producer::new(c).await.unwrap();
        let sent = lines(if pack { 6000 } else { 2000 });
        let batch = batch_of(&sent);
        let idx: Vec<u32> = (0..sent.len() as u32).collect();
        let out = producer
            .put(&stream, &batch, &idx, &CancelToken::new(), &|_| {})
            .await;
        assert!(out.all_delivered(), "pack {pack}: {:?}", out.failures);
        let c = &out.counters;
        assert!(c.throttled_entries > 0 && c.retried_entries > 0 && c.request_errors > 0);
        assert_eq!(c.delivered, sent.len() as u64);
        if pack {
            assert!(c.kinesis_records < sent.len() as u64 / 20, "{c:?}");
            assert_eq!(c.aggregates, c.kinesis_records);
        } else {
            assert_eq!(c.kinesis_records, sent.len() as u64);
        }
        let objects = s3_objects(moto, &bucket);
        let mut want = sent.clone();
        want.sort();
        assert_eq!(sorted_lines(&objects), want, "pack {pack}: every line once");
        // Each call (S3 object) within the limits given.
        assert!(objects.iter().all(|o| o.len() <= 64 * 1024));
        let stats = proxy.stats();
        assert_eq!(stats.requests(PUT_RECORD_BATCH), c.requests);
        // Entries the proxy throttled one by one, plus those of whole calls it throttled.
        assert!(stats.entries_throttled > 0 && stats.entries_throttled <= c.throttled_entries);
        assert_eq!(stats.signatures_valid, c.requests, "{stats:?}");
        assert_eq!(stats.signatures_invalid, 0);
    }
}

/// A record over the Firehose record limit is refused with the reason; the others are delivered.
#[tokio::test]
async fn a_record_over_the_limit_is_refused_the_rest_delivered() {
    let moto = Moto::shared();
    let (stream, bucket) = create_delivery_stream(moto, "producer-firehose-big").await;
    let producer = Producer::new(config(&moto.endpoint(), true)).await.unwrap();
    let mut sent = lines(10);
    sent.insert(4, vec![b'z'; FIREHOSE_MAX_RECORD_BYTES + 1]);
    let batch = batch_of(&sent);
    let idx: Vec<u32> = (0..sent.len() as u32).collect();
    let out = producer
        .put(&stream, &batch, &idx, &CancelToken::new(), &|_| {})
        .await;
    assert!(matches!(out.status[4], RecordStatus::Refused(_)));
    let RecordStatus::Refused(f) = out.status[4] else {
        unreachable!()
    };
    assert!(out.failures[f as usize].message.contains("1024001 bytes"));
    assert_eq!(out.counters.delivered, 10);
    sent.remove(4);
    sent.sort();
    assert_eq!(sorted_lines(&s3_objects(moto, &bucket)), sent);
}
