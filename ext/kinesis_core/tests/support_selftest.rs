//! Proves the integration-test support works against a real kinesalite: stream helpers, and
//! every FaultProxy fault and its shard limit as a plain SDK client without retries sees them.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use kinesis_core::kpl::{AggregateBuilder, AGGREGATE_PARTITION_KEY, DEFAULT_MAX_RECORD_BYTES};

use support::*;

/// Hash keys per shard of a fresh 4-shard stream: shard k owns [k·QUARTER, (k+1)·QUARTER).
const QUARTER: u128 = 1 << 126;
/// The same for a fresh 2-shard stream.
const HALF: u128 = 1 << 127;
/// What one entry of the shard limit tests counts against its shard: ten fit in the 100 000
/// bytes of the limit those tests set, eleven do not.
const ENTRY_BYTES: usize = 9_900;
const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// Entry `i` carries data "{tag}-{i}" and goes to shard i % 4 (by explicit hash key).
fn entries(tag: &str, n: usize) -> Vec<PutRecordsRequestEntry> {
    (0..n)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(format!("{tag}-{i}")))
                .partition_key(format!("pk-{i}"))
                .explicit_hash_key((QUARTER * (i % 4) as u128 + i as u128).to_string())
                .build()
                .unwrap()
        })
        .collect()
}

/// An entry for hash key `hash` that counts `size` bytes against the shard limit (data plus
/// partition key): its data is `name` padded with dots (see [`names_of`]).
fn sized_entry(name: &str, hash: u128, size: usize) -> PutRecordsRequestEntry {
    let key = "pk";
    let data = format!("{name:.<width$}", width = size - key.len());
    PutRecordsRequestEntry::builder()
        .data(Blob::new(data))
        .partition_key(key)
        .explicit_hash_key(hash.to_string())
        .build()
        .unwrap()
}

/// The names of [`sized_entry`] records.
fn names_of(records: &[ReadRecord]) -> BTreeSet<String> {
    data_of(records)
        .iter()
        .map(|d| d.trim_end_matches('.').to_string())
        .collect()
}

fn throttle_message(shard: usize, stream: &str) -> String {
    format!(
        "Rate exceeded for shard {} in stream {stream} under account 000000000000.",
        shard_id(shard)
    )
}

fn shard_id(index: usize) -> String {
    format!("shardId-{index:012}")
}

async fn put(
    client: &Client,
    stream: &str,
    entries: Vec<PutRecordsRequestEntry>,
) -> Result<PutRecordsOutput, SdkError<PutRecordsError, HttpResponse>> {
    client
        .put_records()
        .stream_name(stream)
        .set_records(Some(entries))
        .send()
        .await
}

fn data_of(records: &[ReadRecord]) -> BTreeSet<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.data.clone()).unwrap())
        .collect()
}

fn tags(tag: &str, indices: impl IntoIterator<Item = usize>) -> BTreeSet<String> {
    indices.into_iter().map(|i| format!("{tag}-{i}")).collect()
}

fn http_status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// A fresh stream on the shared kinesalite, a proxy in front of it, a client without retries
/// that goes through the proxy, and one with retries that goes straight to kinesalite.
struct Setup {
    proxy: FaultProxy,
    through_proxy: Client,
    direct: Client,
    stream: String,
}

/// The setup with a 4-shard stream.
async fn setup(attempt_timeout: Option<Duration>) -> Setup {
    setup_with(4, attempt_timeout).await
}

async fn setup_with(shards: i32, attempt_timeout: Option<Duration>) -> Setup {
    let kinesalite = Kinesalite::shared();
    let direct = client(&kinesalite.endpoint()).await;
    let stream = unique_stream_name("selftest");
    create_stream(&direct, &stream, shards).await;
    let proxy = FaultProxy::start(&kinesalite.endpoint()).await;
    let through_proxy = raw_client(&proxy.endpoint(), attempt_timeout).await;
    Setup {
        proxy,
        through_proxy,
        direct,
        stream,
    }
}

#[test]
fn kinesalite_stops_when_dropped() {
    let kinesalite = Kinesalite::start();
    let addr = kinesalite
        .endpoint()
        .trim_start_matches("http://")
        .to_string();
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "kinesalite should accept on {addr}"
    );
    let pid = kinesalite.pid();
    drop(kinesalite);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "kinesalite still listening on {addr}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || cfg!(not(target_os = "linux")),
        "pid {pid} still exists"
    );
}

#[tokio::test]
async fn stream_helpers_create_read_and_split() {
    let client = client(&Kinesalite::shared().endpoint()).await;
    let stream = unique_stream_name("helpers");
    let shards = create_stream(&client, &stream, 4).await;
    for (k, shard) in shards.iter().enumerate() {
        assert_eq!(shard.shard_id, shard_id(k));
        assert_eq!(
            (shard.starting_hash_key, shard.ending_hash_key),
            (QUARTER * k as u128, QUARTER * k as u128 + (QUARTER - 1))
        );
        assert!(shard.open && shard.parent_shard_id.is_none());
    }

    let out = put(&client, &stream, entries("before", 8)).await.unwrap();
    assert_eq!(out.failed_record_count(), Some(0));

    let mid = QUARTER / 2;
    let shards = split_shard(&client, &stream, &shard_id(0), mid).await;
    assert_eq!(shards.len(), 6, "{shards:#?}");
    assert!(!shards[0].open, "the parent is closed");
    for (child, range) in [(4, (0, mid - 1)), (5, (mid, QUARTER - 1))] {
        let s = &shards[child];
        assert_eq!(s.shard_id, shard_id(child));
        assert_eq!(s.parent_shard_id.as_deref(), Some(shard_id(0).as_str()));
        assert_eq!((s.starting_hash_key, s.ending_hash_key), range);
        assert!(s.open);
    }

    // After the split, hash keys of the old shard 0 land in the children.
    let after: Vec<_> = [0, mid]
        .iter()
        .enumerate()
        .map(|(i, hash)| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(format!("after-{i}")))
                .partition_key("pk")
                .explicit_hash_key(hash.to_string())
                .build()
                .unwrap()
        })
        .collect();
    let out = put(&client, &stream, after).await.unwrap();
    let landed_in: Vec<_> = out
        .records()
        .iter()
        .map(|r| r.shard_id().unwrap().to_string())
        .collect();
    assert_eq!(landed_in, [shard_id(4), shard_id(5)]);

    let records = read_all(&client, &stream).await;
    assert_eq!(records.len(), 10);
    for r in &records {
        let data = String::from_utf8(r.data.clone()).unwrap();
        let (tag, i) = data.split_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        let expected_shard = if tag == "before" { i % 4 } else { 4 + i };
        assert_eq!(r.shard_id, shard_id(expected_shard), "{r:?}");
        let range = &shards[expected_shard];
        assert_eq!(
            (r.starting_hash_key, r.ending_hash_key),
            (range.starting_hash_key, range.ending_hash_key)
        );
        assert_eq!(r.explicit_hash_key, None);
        assert!(!r.sequence_number.is_empty());
        if tag == "before" {
            assert_eq!(r.partition_key, format!("pk-{i}"));
        }
    }
    // The closed parent still yields the records written before the split.
    assert_eq!(
        records.iter().filter(|r| r.shard_id == shard_id(0)).count(),
        2
    );
}

#[tokio::test]
async fn requests_without_faults_pass_through() {
    let s = setup(None).await;
    let out = put(&s.through_proxy, &s.stream, entries("plain", 6))
        .await
        .unwrap();
    assert_eq!(out.failed_record_count(), Some(0));
    let shards: Vec<_> = out
        .records()
        .iter()
        .map(|r| r.shard_id().unwrap().to_string())
        .collect();
    assert_eq!(shards, (0..6).map(|i| shard_id(i % 4)).collect::<Vec<_>>());
    assert_eq!(list_shards(&s.through_proxy, &s.stream).await.len(), 4);

    assert_eq!(
        data_of(&read_all(&s.direct, &s.stream).await),
        tags("plain", 0..6)
    );
    let stats = s.proxy.stats();
    assert_eq!(stats.requests("PutRecords"), 1);
    assert_eq!(stats.requests("ListShards"), 1);
    assert_eq!((stats.faults_injected, stats.entries_forwarded), (0, 6));
}

#[tokio::test]
async fn status_faults_answer_5xx_without_forwarding() {
    let s = setup(None).await;
    s.proxy.push(Fault::Status(500));
    s.proxy.push(Fault::Status(503));

    let e = put(&s.through_proxy, &s.stream, entries("first", 4))
        .await
        .unwrap_err();
    assert_eq!(
        (http_status(&e), e.code()),
        (Some(500), Some("InternalFailure")),
        "{e:?}"
    );
    let e = put(&s.through_proxy, &s.stream, entries("second", 4))
        .await
        .unwrap_err();
    assert_eq!(
        (http_status(&e), e.code()),
        (Some(503), Some("ServiceUnavailable")),
        "{e:?}"
    );
    put(&s.through_proxy, &s.stream, entries("third", 4))
        .await
        .unwrap();

    assert_eq!(
        data_of(&read_all(&s.direct, &s.stream).await),
        tags("third", 0..4)
    );
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.requests("PutRecords"),
            stats.faults_injected,
            stats.entries_forwarded
        ),
        (3, 2, 4)
    );
    assert_eq!(s.proxy.pending(), 0);
}

#[tokio::test]
async fn throttle_request_fails_the_whole_call() {
    let s = setup(None).await;
    s.proxy.push(Fault::ThrottleRequest);
    let e = put(&s.through_proxy, &s.stream, entries("throttled", 4))
        .await
        .unwrap_err();
    assert_eq!(http_status(&e), Some(400));
    let service_error = e.as_service_error().expect("a service error");
    assert!(
        service_error.is_provisioned_throughput_exceeded_exception(),
        "{e:?}"
    );
    let expected = format!(
        "Rate exceeded for shard {} in stream {} under account 000000000000.",
        shard_id(0),
        s.stream
    );
    assert_eq!(service_error.message(), Some(expected.as_str()));

    assert!(read_all(&s.direct, &s.stream).await.is_empty());
    assert_eq!(s.proxy.stats().entries_forwarded, 0);
}

#[tokio::test]
async fn partial_throttle_fails_chosen_entries_in_place() {
    let s = setup(None).await;
    s.proxy
        .push(Fault::PartialThrottle(Entries::Indices(vec![0, 3, 5, 99])));
    let out = put(&s.through_proxy, &s.stream, entries("p", 8))
        .await
        .unwrap();
    assert_eq!(out.failed_record_count(), Some(3));
    assert_eq!(out.records().len(), 8);
    for (i, r) in out.records().iter().enumerate() {
        if [0, 3, 5].contains(&i) {
            assert_eq!(
                r.error_code(),
                Some("ProvisionedThroughputExceededException"),
                "entry {i}"
            );
            let expected = format!(
                "Rate exceeded for shard {} in stream {} under account 000000000000.",
                shard_id(i % 4),
                s.stream
            );
            assert_eq!(r.error_message(), Some(expected.as_str()));
            assert!(r.sequence_number().is_none());
        } else {
            assert_eq!(r.error_code(), None, "entry {i}");
            assert_eq!(
                r.shard_id(),
                Some(shard_id(i % 4).as_str()),
                "entry {i} kept its position"
            );
            assert!(r.sequence_number().is_some());
        }
    }

    assert_eq!(
        data_of(&read_all(&s.direct, &s.stream).await),
        tags("p", [1, 2, 4, 6, 7])
    );
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.faults_injected,
            stats.entries_throttled,
            stats.entries_forwarded
        ),
        (1, 3, 5)
    );
}

#[tokio::test]
async fn partial_internal_failure_by_fraction() {
    let s = setup(None).await;
    s.proxy
        .push(Fault::PartialInternalFailure(Entries::Fraction(0.5)));
    let out = put(&s.through_proxy, &s.stream, entries("f", 10))
        .await
        .unwrap();
    assert_eq!(out.failed_record_count(), Some(5));
    let failed: BTreeSet<usize> = out
        .records()
        .iter()
        .enumerate()
        .filter(|(_, r)| r.error_code().is_some())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(failed.len(), 5);
    for &i in &failed {
        assert_eq!(out.records()[i].error_code(), Some("InternalFailure"));
    }

    let landed = data_of(&read_all(&s.direct, &s.stream).await);
    assert_eq!(landed, tags("f", (0..10).filter(|i| !failed.contains(i))));
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.entries_internal_failure,
            stats.entries_throttled,
            stats.entries_forwarded
        ),
        (5, 0, 5)
    );
}

#[tokio::test]
async fn partial_fault_of_every_entry_answers_200_without_forwarding() {
    let s = setup(None).await;
    s.proxy.push(Fault::PartialThrottle(Entries::Fraction(1.0)));
    let out = put(&s.through_proxy, &s.stream, entries("all", 4))
        .await
        .unwrap();
    assert_eq!(out.failed_record_count(), Some(4));
    assert!(out
        .records()
        .iter()
        .all(|r| r.error_code() == Some("ProvisionedThroughputExceededException")));

    assert!(read_all(&s.direct, &s.stream).await.is_empty());
    let stats = s.proxy.stats();
    assert_eq!((stats.entries_throttled, stats.entries_forwarded), (4, 0));
}

#[tokio::test]
async fn reset_closes_the_connection_without_an_answer() {
    let s = setup(None).await;
    s.proxy.push(Fault::Reset);
    let e = put(&s.through_proxy, &s.stream, entries("lost", 4))
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::DispatchFailure(_)), "{e:?}");
    put(&s.through_proxy, &s.stream, entries("next", 4))
        .await
        .unwrap();

    assert_eq!(
        data_of(&read_all(&s.direct, &s.stream).await),
        tags("next", 0..4)
    );
    assert_eq!(s.proxy.stats().faults_injected, 1);
}

#[tokio::test]
async fn delay_trips_the_client_timeout_but_the_records_still_land() {
    let s = setup(Some(Duration::from_millis(300))).await;
    s.proxy.push(Fault::Delay(Duration::from_millis(1200)));
    let e = put(&s.through_proxy, &s.stream, entries("late", 4))
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::TimeoutError(_)), "{e:?}");

    s.proxy.settle().await;
    assert_eq!(
        data_of(&read_all(&s.direct, &s.stream).await),
        tags("late", 0..4)
    );
    put(&s.through_proxy, &s.stream, entries("on-time", 4))
        .await
        .unwrap();
}

/// Entries "{tag}-0" and "{tag}-2" with one KPL aggregate of four user records between them.
fn entries_with_aggregate(tag: &str) -> Vec<PutRecordsRequestEntry> {
    let mut builder =
        AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, AGGREGATE_PARTITION_KEY.len());
    for u in 0..4 {
        assert!(builder.try_add(
            &format!("user-{u}"),
            None,
            format!("{tag}-1.{u}").as_bytes()
        ));
    }
    let aggregate = PutRecordsRequestEntry::builder()
        .data(Blob::new(builder.finish()))
        .partition_key(AGGREGATE_PARTITION_KEY)
        .build()
        .unwrap();
    let mut batch = entries(tag, 3);
    batch[1] = aggregate;
    batch
}

#[tokio::test]
async fn stats_gauge_the_entries_and_user_records_in_flight() {
    let s = setup(None).await;
    s.proxy.push(Fault::Delay(Duration::from_millis(1500)));
    let started = Instant::now();
    let call = tokio::spawn({
        let client = s.through_proxy.clone();
        let stream = s.stream.clone();
        async move { put(&client, &stream, entries_with_aggregate("agg")).await }
    });
    let in_flight = loop {
        let stats = s.proxy.stats();
        if stats.in_flight_put_entries > 0 || started.elapsed() > Duration::from_millis(1000) {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "not seen while delayed"
    );
    assert_eq!(
        (
            in_flight.in_flight_put_entries,
            in_flight.in_flight_user_records,
            in_flight.user_records_forwarded
        ),
        (3, 6, 0)
    );
    // Still there (the delay is not over), and resetting the counters leaves the gauges.
    s.proxy.reset_stats();
    let stats = s.proxy.stats();
    assert_eq!(
        (stats.in_flight_put_entries, stats.in_flight_user_records),
        (3, 6)
    );

    let out = call.await.unwrap().unwrap();
    assert_eq!(out.failed_record_count(), Some(0));
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.in_flight_put_entries,
            stats.in_flight_user_records,
            stats.entries_forwarded,
            stats.user_records_forwarded
        ),
        (0, 0, 3, 6)
    );

    // Entries that fail count no user records forwarded: here the aggregate.
    s.proxy
        .push(Fault::PartialThrottle(Entries::Indices(vec![1])));
    let out = put(&s.through_proxy, &s.stream, entries_with_aggregate("again"))
        .await
        .unwrap();
    assert_eq!(out.failed_record_count(), Some(1));
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.in_flight_put_entries,
            stats.in_flight_user_records,
            stats.entries_forwarded,
            stats.user_records_forwarded
        ),
        (0, 0, 5, 8)
    );
}

#[tokio::test]
async fn faults_target_one_operation_and_standing_faults_last_until_cleared() {
    let s = setup(None).await;
    s.proxy.push_for("ListShards", Fault::Status(503));
    s.proxy
        .push_for("ListShards", Fault::PartialThrottle(Entries::Fraction(1.0)));
    put(&s.through_proxy, &s.stream, entries("a", 4))
        .await
        .unwrap();
    let e = s
        .through_proxy
        .list_shards()
        .stream_name(&s.stream)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        (http_status(&e), e.code()),
        (Some(503), Some("ServiceUnavailable"))
    );
    // A partial fault on an operation other than PutRecords passes through.
    let out = s
        .through_proxy
        .list_shards()
        .stream_name(&s.stream)
        .send()
        .await
        .unwrap();
    assert_eq!(out.shards().len(), 4);
    assert_eq!(s.proxy.stats().faults_injected, 1);

    s.proxy.always(Fault::ThrottleRequest);
    for _ in 0..3 {
        let e = put(&s.through_proxy, &s.stream, entries("b", 4))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("ProvisionedThroughputExceededException"));
    }
    s.proxy.clear();
    put(&s.through_proxy, &s.stream, entries("c", 4))
        .await
        .unwrap();

    let mut expected = tags("a", 0..4);
    expected.extend(tags("c", 0..4));
    assert_eq!(data_of(&read_all(&s.direct, &s.stream).await), expected);
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.requests("PutRecords"),
            stats.requests("ListShards"),
            stats.faults_injected
        ),
        (5, 2, 4)
    );
}

#[tokio::test]
async fn sometimes_faults_hit_at_random_before_the_standing_one() {
    let s = setup(None).await;
    s.proxy.sometimes(0.5, Fault::Status(500));
    let mut failed = 0;
    for call in 0..40 {
        match put(&s.through_proxy, &s.stream, entries(&format!("r{call}"), 1)).await {
            Ok(out) => assert_eq!(out.failed_record_count(), Some(0)),
            Err(e) => {
                assert_eq!(http_status(&e), Some(500), "{e:?}");
                failed += 1;
            }
        }
    }
    // Outside 5..=35 about once in a million runs.
    assert!((5..=35).contains(&failed), "{failed} of 40 calls failed");
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.requests("PutRecords"),
            stats.faults_injected,
            stats.entries_forwarded
        ),
        (40, failed, 40 - failed)
    );

    // A queued fault comes first, then the first `sometimes` rule that hits, then `always`.
    s.proxy.clear();
    s.proxy.sometimes(0.0, Fault::Status(500));
    s.proxy.sometimes(1.0, Fault::Status(503));
    s.proxy.always(Fault::ThrottleRequest);
    s.proxy.push(Fault::Reset);
    let e = put(&s.through_proxy, &s.stream, entries("x", 1))
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::DispatchFailure(_)), "{e:?}");
    for _ in 0..2 {
        let e = put(&s.through_proxy, &s.stream, entries("x", 1))
            .await
            .unwrap_err();
        assert_eq!(http_status(&e), Some(503), "{e:?}");
    }
    s.proxy.clear();
    s.proxy.sometimes(0.0, Fault::Status(500));
    s.proxy.always(Fault::ThrottleRequest);
    let e = put(&s.through_proxy, &s.stream, entries("x", 1))
        .await
        .unwrap_err();
    assert_eq!((http_status(&e), e.code()), (Some(400), Some(THROTTLED)));
    s.proxy.clear();
    put(&s.through_proxy, &s.stream, entries("y", 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn shard_limit_throttles_the_entries_over_a_shards_rate() {
    let s = setup_with(2, None).await;
    s.proxy.shard_limit(100_000, 1000);

    // About 600 KB for shard 0 in six quick calls, each with a small entry for shard 1 too.
    let started = Instant::now();
    let (mut accepted, mut throttled) = (BTreeSet::new(), BTreeSet::new());
    for call in 0..6 {
        let mut names: Vec<String> = (0..10).map(|i| format!("hot-{call}-{i}")).collect();
        names.push(format!("cold-{call}"));
        let batch = names
            .iter()
            .enumerate()
            .map(|(i, name)| match name.starts_with("hot") {
                true => sized_entry(name, i as u128, ENTRY_BYTES),
                false => sized_entry(name, HALF, 100),
            })
            .collect();
        let out = put(&s.through_proxy, &s.stream, batch).await.unwrap();
        for (name, r) in names.into_iter().zip(out.records()) {
            if r.error_code().is_none() {
                accepted.insert(name);
                continue;
            }
            assert_eq!(r.error_code(), Some(THROTTLED), "{name}");
            let expected = throttle_message(0, &s.stream);
            assert_eq!(r.error_message(), Some(expected.as_str()), "{name}");
            throttled.insert(name);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    assert!(
        throttled.iter().all(|n| n.starts_with("hot")),
        "shard 1 stayed under its limit: {throttled:?}"
    );
    let hot = accepted.iter().filter(|n| n.starts_with("hot")).count();
    // A second's worth to begin with (the whole first call), then what refilled meanwhile.
    assert!(
        hot >= 10 && (hot * ENTRY_BYTES) as f64 <= 100_000.0 * (1.0 + elapsed),
        "{hot} entries for shard 0 accepted in {elapsed:.2} s"
    );
    assert!(!throttled.is_empty(), "nothing throttled in {elapsed:.2} s");
    assert_eq!(names_of(&read_all(&s.direct, &s.stream).await), accepted);
    let stats = s.proxy.stats();
    let over = throttled.len() as u64;
    assert_eq!(
        (
            stats.faults_injected,
            stats.entries_throttled,
            stats.entries_over_shard_limit,
            stats.entries_forwarded
        ),
        (0, over, over, accepted.len() as u64)
    );

    // A second later shard 0's buckets are full again: ten entries fit, the eleventh does not.
    // A partial fault picks its entries first, and they use up nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.proxy
        .push(Fault::PartialInternalFailure(Entries::Indices(vec![0])));
    let batch = (0..12)
        .map(|i| sized_entry(&format!("refilled-{i}"), i, ENTRY_BYTES))
        .collect();
    let out = put(&s.through_proxy, &s.stream, batch).await.unwrap();
    let codes: Vec<_> = out.records().iter().map(|r| r.error_code()).collect();
    let mut expected = vec![Some("InternalFailure")];
    expected.extend([None; 10]);
    expected.push(Some(THROTTLED));
    assert_eq!(codes, expected);
    assert_eq!(out.failed_record_count(), Some(2));

    // `clear` lifts the limit: twice a second's worth goes through at once.
    s.proxy.clear();
    let batch = (0..20)
        .map(|i| sized_entry(&format!("free-{i}"), i, ENTRY_BYTES))
        .collect();
    let out = put(&s.through_proxy, &s.stream, batch).await.unwrap();
    assert_eq!(out.failed_record_count(), Some(0));

    let mut landed = accepted;
    landed.extend((1..=10).map(|i| format!("refilled-{i}")));
    landed.extend((0..20).map(|i| format!("free-{i}")));
    assert_eq!(names_of(&read_all(&s.direct, &s.stream).await), landed);
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.entries_over_shard_limit,
            stats.entries_internal_failure
        ),
        (over + 1, 1)
    );
}

#[tokio::test]
async fn shard_limit_follows_a_reshard() {
    let s = setup_with(2, None).await;
    s.proxy.shard_limit(100_000, 1000);
    // The proxy lists the two shards now, and trusts that list for a second.
    put(
        &s.through_proxy,
        &s.stream,
        vec![sized_entry("before", 0, 100)],
    )
    .await
    .unwrap();
    let shards = split_shard(&s.direct, &s.stream, &shard_id(0), HALF / 2).await;
    assert_eq!(shards[3].starting_hash_key, HALF / 2, "{shards:#?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The upper child (shard 3) has buckets of its own, and the errors name it.
    let batch = (0..11)
        .map(|i| sized_entry(&format!("child-{i}"), HALF / 2 + i, ENTRY_BYTES))
        .collect();
    let out = put(&s.through_proxy, &s.stream, batch).await.unwrap();
    assert_eq!(out.failed_record_count(), Some(1));
    let last = out.records().last().unwrap();
    let expected = throttle_message(3, &s.stream);
    assert_eq!(
        (last.error_code(), last.error_message()),
        (Some(THROTTLED), Some(expected.as_str()))
    );
    assert!(out.records()[..10]
        .iter()
        .all(|r| r.shard_id() == Some(shard_id(3).as_str())));
}
