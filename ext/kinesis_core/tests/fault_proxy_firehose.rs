//! FaultProxy in front of moto's Amazon Data Firehose: its faults on PutRecordBatch as a plain SDK
//! client without retries sees them, and what reached the delivery stream's S3 bucket. moto
//! writes each PutRecordBatch call it gets as one S3 object, the call's records concatenated.

mod support;

use std::collections::BTreeSet;

use aws_sdk_firehose::config::http::HttpResponse;
use aws_sdk_firehose::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_firehose::operation::put_record_batch::{PutRecordBatchError, PutRecordBatchOutput};
use aws_sdk_firehose::primitives::Blob;
use aws_sdk_firehose::types::Record;
use aws_sdk_firehose::Client;

use support::*;

const PUT_RECORD_BATCH: &str = "PutRecordBatch";
/// Firehose's error code for a throttled call or entry.
const THROTTLED: &str = "ServiceUnavailableException";

/// A fresh bucket and a delivery stream writing into it on the shared moto, a proxy in front of
/// moto, and a client that goes through the proxy.
struct Setup {
    moto: &'static Moto,
    proxy: FaultProxy,
    through_proxy: Client,
    stream: String,
    bucket: String,
}

async fn setup() -> Setup {
    let moto = Moto::shared();
    let (stream, bucket) = create_delivery_stream(moto, "fault-proxy-firehose").await;
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let through_proxy = firehose_client(&proxy.endpoint());
    Setup {
        moto,
        proxy,
        through_proxy,
        stream,
        bucket,
    }
}

/// Record `i` carries "{tag}-{i}" and a newline, which separates the records in S3.
fn records(tag: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            Record::builder()
                .data(Blob::new(format!("{tag}-{i}\n")))
                .build()
                .unwrap()
        })
        .collect()
}

fn tags(tag: &str, indices: impl IntoIterator<Item = usize>) -> Vec<String> {
    indices.into_iter().map(|i| format!("{tag}-{i}")).collect()
}

async fn put(
    client: &Client,
    stream: &str,
    records: Vec<Record>,
) -> Result<PutRecordBatchOutput, SdkError<PutRecordBatchError, HttpResponse>> {
    client
        .put_record_batch()
        .delivery_stream_name(stream)
        .set_records(Some(records))
        .send()
        .await
}

fn http_status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// The bucket's objects, each as its records (lines): one object per PutRecordBatch call moto
/// got.
fn objects(s: &Setup) -> Vec<Vec<String>> {
    s3_objects(s.moto, &s.bucket)
        .into_iter()
        .map(|o| {
            String::from_utf8(o)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn requests_without_faults_pass_through_to_s3() {
    let s = setup().await;
    // A fault queued for PutRecords (what `push` targets) leaves PutRecordBatch alone.
    s.proxy.push(Fault::Status(500));
    let out = put(&s.through_proxy, &s.stream, records("plain", 5))
        .await
        .unwrap();
    assert_eq!(out.failed_put_count(), 0);
    assert_eq!(out.encrypted(), Some(false));
    assert_eq!(out.request_responses().len(), 5);
    assert!(
        out.request_responses()
            .iter()
            .all(|r| r.record_id().is_some() && r.error_code().is_none()),
        "{out:?}"
    );

    assert_eq!(objects(&s), vec![tags("plain", 0..5)]);
    let stats = s.proxy.stats();
    assert_eq!(stats.requests(PUT_RECORD_BATCH), 1);
    assert_eq!(stats.access_keys["AKIDTEST"][PUT_RECORD_BATCH], 1);
    assert_eq!(
        (
            stats.faults_injected,
            stats.entries_forwarded,
            stats.user_records_forwarded
        ),
        (0, 5, 5)
    );
    assert_eq!(s.proxy.pending(), 1);
}

#[tokio::test]
async fn partial_throttle_fails_chosen_entries_in_place() {
    let s = setup().await;
    s.proxy.push_for(
        PUT_RECORD_BATCH,
        Fault::PartialThrottle(Entries::Fraction(0.5)),
    );
    let out = put(&s.through_proxy, &s.stream, records("half", 20))
        .await
        .unwrap();
    assert_eq!(out.failed_put_count(), 10);
    assert_eq!(out.encrypted(), Some(false));
    let answers = out.request_responses();
    assert_eq!(answers.len(), 20);
    let (failed, landed): (Vec<usize>, Vec<usize>) =
        (0..20).partition(|&i| answers[i].error_code().is_some());
    assert_eq!(failed.len(), 10, "{out:?}");
    for &i in &failed {
        assert_eq!(answers[i].error_code(), Some(THROTTLED), "{out:?}");
        assert_eq!(answers[i].error_message(), Some("Slow down."), "{out:?}");
        assert_eq!(answers[i].record_id(), None, "{out:?}");
    }
    assert!(landed.iter().all(|&i| answers[i].record_id().is_some()));

    // The other ten went on to moto in one call, so S3 holds them in one object.
    let objects = objects(&s);
    assert_eq!(objects.len(), 1, "{objects:?}");
    let in_s3: BTreeSet<String> = objects.concat().into_iter().collect();
    assert_eq!(in_s3, tags("half", landed).into_iter().collect());
    s.proxy.settle().await;
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.faults_injected,
            stats.entries_throttled,
            stats.entries_over_shard_limit,
            stats.entries_internal_failure,
            stats.entries_forwarded,
            stats.user_records_forwarded
        ),
        (1, 10, 0, 0, 10, 10)
    );
    assert_eq!(
        (stats.in_flight_put_entries, stats.in_flight_user_records),
        (0, 0)
    );
}

#[tokio::test]
async fn throttle_request_answers_service_unavailable_without_forwarding() {
    let s = setup().await;
    s.proxy.push_for(PUT_RECORD_BATCH, Fault::ThrottleRequest);
    let e = put(&s.through_proxy, &s.stream, records("throttled", 4))
        .await
        .unwrap_err();
    assert_eq!(
        (http_status(&e), e.code()),
        (Some(500), Some(THROTTLED)),
        "{}",
        DisplayErrorContext(&e)
    );
    let service_error = e.as_service_error().expect("a service error");
    assert!(service_error.is_service_unavailable_exception(), "{e:?}");

    assert!(objects(&s).is_empty());
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.requests(PUT_RECORD_BATCH),
            stats.faults_injected,
            stats.entries_forwarded
        ),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn partial_internal_failure_of_every_entry_answers_200_without_forwarding() {
    let s = setup().await;
    s.proxy.push_for(
        PUT_RECORD_BATCH,
        Fault::PartialInternalFailure(Entries::Fraction(1.0)),
    );
    let out = put(&s.through_proxy, &s.stream, records("lost", 7))
        .await
        .unwrap();
    assert_eq!(out.failed_put_count(), 7);
    assert_eq!(out.encrypted(), Some(false));
    assert_eq!(out.request_responses().len(), 7);
    assert!(
        out.request_responses()
            .iter()
            .all(|r| r.error_code() == Some("InternalFailure") && r.record_id().is_none()),
        "{out:?}"
    );

    assert!(objects(&s).is_empty());
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.entries_internal_failure,
            stats.entries_forwarded,
            stats.user_records_forwarded
        ),
        (7, 0, 0)
    );
}

#[tokio::test]
async fn status_faults_answer_firehose_error_types_without_forwarding() {
    let s = setup().await;
    s.proxy.push_n_for(PUT_RECORD_BATCH, 1, Fault::Status(500));
    s.proxy.push_for(PUT_RECORD_BATCH, Fault::Status(503));

    let e = put(&s.through_proxy, &s.stream, records("first", 3))
        .await
        .unwrap_err();
    assert_eq!(
        (http_status(&e), e.code()),
        (Some(500), Some("InternalFailure")),
        "{e:?}"
    );
    let e = put(&s.through_proxy, &s.stream, records("second", 3))
        .await
        .unwrap_err();
    assert_eq!(
        (http_status(&e), e.code()),
        (Some(503), Some(THROTTLED)),
        "{e:?}"
    );
    put(&s.through_proxy, &s.stream, records("third", 3))
        .await
        .unwrap();

    assert_eq!(objects(&s), vec![tags("third", 0..3)]);
    let stats = s.proxy.stats();
    assert_eq!(
        (
            stats.requests(PUT_RECORD_BATCH),
            stats.faults_injected,
            stats.entries_forwarded
        ),
        (3, 2, 3)
    );
}
