//! `FaultProxy`: an HTTP/1.1 reverse proxy in front of a local Kinesis (kinesalite) or Amazon Data
//! Firehose (moto) that injects the failures the real services produce: 5xx answers, whole-call
//! and per-entry throttling, per-entry internal failures, dropped connections and slow answers.
//! Neither local server ever fails on its own.
//!
//! Faults are queued per operation (the `X-Amz-Target` suffix) and each applies to one request.
//! A request with no queued fault gets the first occasional fault (`sometimes`) whose random roll
//! hits, else the standing fault (`always`), if any; both last until `clear`. Requests without a
//! fault are forwarded untouched, except that a shard limit ([`ProxyHandle::shard_limit`]) fails
//! the PutRecords entries over their shard's write rate, as real Kinesis does under load.
//!
//! The per-entry faults work on both services' batch puts, Kinesis's PutRecords and Firehose's
//! PutRecordBatch, through one code path that a [`Service`] tells what the batch put's parts are
//! called and how the service fails a call or an entry. The service of a request is known by its
//! `X-Amz-Target` prefix.
//!
//! The stats count user records as well as entries: a PutRecords entry whose data is a KPL
//! aggregate holds the user records [`kinesis_core::kpl::deaggregate`] finds in it, any other
//! entry (every PutRecordBatch entry included) one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

use super::sigv4;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kinesis_core::kpl::{deaggregate, Deaggregated};
use md5::{Digest, Md5};
use rand::Rng;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub const PUT_RECORDS: &str = "PutRecords";
pub const PUT_RECORD_BATCH: &str = "PutRecordBatch";
/// kinesalite's account id, used in the error messages we make up.
const ACCOUNT: &str = "000000000000";
/// The ErrorMessage of a throttled Firehose entry, as Firehose words it.
const SLOW_DOWN: &str = "Slow down.";
const AMZ_JSON: &str = "application/x-amz-json-1.1";
/// How long the shard limit trusts its list of a stream's open shards: long enough not to list
/// them for every request, short enough that a test sees a reshard take effect.
const SHARD_LIST_TTL: Duration = Duration::from_secs(1);
/// The `access_keys` entry of requests without a SigV4 `Authorization` header.
pub const UNSIGNED: &str = "(unsigned)";
/// How the base64 of data starting with the KPL magic (F3 89 9A C2) starts: only entries whose
/// Data starts so are decoded to count their user records.
const MAGIC_BASE64: &str = "84ma";

/// A service whose batch put the proxy fails entries of, described for the one code path both
/// services' batch puts go through: what the batch put's parts are called, how many user records
/// an entry holds, and how the service answers a throttled or failed call or entry. An entry that
/// fails internally is answered with ErrorCode InternalFailure by both services.
struct Service {
    /// The `X-Amz-Target` prefix of the service's operations.
    target_prefix: &'static str,
    /// The batch put operation.
    batch_put: &'static str,
    /// The batch put request's array of entries.
    request_entries: &'static str,
    /// The answer's array of entry answers (one per entry, in order) and its count of failed ones.
    answer_entries: &'static str,
    failed_count: &'static str,
    /// The other fields of an answer the proxy makes up itself (when no entry was forwarded).
    answer_base: &'static str,
    /// The ErrorCode of a throttled entry, also the error type of a throttled call, which is
    /// answered with HTTP `throttle_status`.
    throttle_code: &'static str,
    throttle_status: u16,
    /// The error type of an HTTP 503 answer.
    unavailable_type: &'static str,
    /// The user records in an entry.
    user_records: fn(&Value) -> u64,
    /// Whether entries go to shards (Kinesis): then a throttle message names the stream and the
    /// entry's shard, looked up on the upstream, and the shard limit applies. Otherwise throttle
    /// messages say [`SLOW_DOWN`].
    sharded: bool,
}

const KINESIS: Service = Service {
    target_prefix: "Kinesis_20131202",
    batch_put: PUT_RECORDS,
    request_entries: "Records",
    answer_entries: "Records",
    failed_count: "FailedRecordCount",
    answer_base: "{}",
    throttle_code: "ProvisionedThroughputExceededException",
    throttle_status: 400,
    unavailable_type: "ServiceUnavailable",
    user_records: kpl_user_records,
    sharded: true,
};

/// Firehose throttles with ServiceUnavailableException, for a whole call and per entry (entry
/// message "Slow down."). Firehose's API reference lists it under PutRecordBatch's errors with
/// "HTTP Status Code: 500", not 503
/// (docs.aws.amazon.com/firehose/latest/APIReference/API_PutRecordBatch.html), and the Kinesis
/// Agent logs real throttled calls so ("Errors from firehose ...: ServiceUnavailableException:
/// 500", awslabs/amazon-kinesis-agent issue 29). A 503 answer (`status 503`) carries the same
/// error type: Firehose's SDKs know no other for "back off and retry".
const FIREHOSE: Service = Service {
    target_prefix: "Firehose_20150804",
    batch_put: PUT_RECORD_BATCH,
    request_entries: "Records",
    answer_entries: "RequestResponses",
    failed_count: "FailedPutCount",
    answer_base: r#"{"Encrypted":false}"#,
    throttle_code: "ServiceUnavailableException",
    throttle_status: 500,
    unavailable_type: "ServiceUnavailableException",
    user_records: one_user_record,
    sharded: false,
};

impl Service {
    /// The service of an `X-Amz-Target` prefix: Firehose for its own, Kinesis for any other
    /// (kinesalite's, and requests without a target).
    fn of(target_prefix: &str) -> &'static Service {
        if target_prefix == FIREHOSE.target_prefix {
            &FIREHOSE
        } else {
            &KINESIS
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer this HTTP status (500 or 503) with a JSON 1.1 error body: InternalFailure, or for
    /// 503 ServiceUnavailable (Kinesis) or ServiceUnavailableException (Firehose). Nothing is
    /// forwarded.
    Status(u16),
    /// Throttle the whole call as the service does: Kinesis answers HTTP 400
    /// ProvisionedThroughputExceededException, Firehose HTTP 500 ServiceUnavailableException.
    /// Nothing is forwarded.
    ThrottleRequest,
    /// Batch puts only (PutRecords, PutRecordBatch): the chosen entries fail as throttled
    /// (ProvisionedThroughputExceededException, Firehose ServiceUnavailableException) and never
    /// reach the upstream; the rest are forwarded. Other operations pass through.
    PartialThrottle(Entries),
    /// As `PartialThrottle`, with ErrorCode InternalFailure.
    PartialInternalFailure(Entries),
    /// Read the request, then close the connection without answering. Nothing is forwarded.
    Reset,
    /// Wait, then forward. The request is forwarded even if the client has given up by then:
    /// as with real Kinesis, a call that timed out may still have succeeded.
    Delay(Duration),
}

/// Which entries of a batch put a partial fault fails.
#[derive(Clone, Debug, PartialEq)]
pub enum Entries {
    /// round(fraction × entries) entries, at random positions.
    Fraction(f64),
    /// These 0-based positions; positions past the end are ignored.
    Indices(Vec<usize>),
}

impl Entries {
    fn pick(&self, len: usize) -> BTreeSet<usize> {
        match self {
            Entries::Fraction(f) => {
                let count = (f.clamp(0.0, 1.0) * len as f64).round() as usize;
                rand::seq::index::sample(&mut rand::thread_rng(), len, count)
                    .into_iter()
                    .collect()
            }
            Entries::Indices(ix) => ix.iter().copied().filter(|&i| i < len).collect(),
        }
    }
}

/// What the proxy has seen and done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests per operation (e.g. "PutRecords"), faulted or not.
    pub requests: BTreeMap<String, u64>,
    /// Requests a fault was applied to (the shard limit is not a fault).
    pub faults_injected: u64,
    /// Batch put (PutRecords, PutRecordBatch) entries answered as throttled
    /// (ProvisionedThroughputExceededException, Firehose ServiceUnavailableException), by a
    /// partial fault or the shard limit.
    pub entries_throttled: u64,
    /// Of `entries_throttled`, those over the shard limit.
    pub entries_over_shard_limit: u64,
    /// Batch put entries answered with InternalFailure by a partial fault.
    pub entries_internal_failure: u64,
    /// Batch put entries sent on to the upstream.
    pub entries_forwarded: u64,
    /// User records in the batch put entries sent on to the upstream and accepted there
    /// (answered without ErrorCode).
    pub user_records_forwarded: u64,
    /// Gauge: batch put entries of the requests received and not answered yet, delayed ones and
    /// those waiting for the upstream included. A request counts until the proxy is done with
    /// it, also when its client gave up (a delayed request is still forwarded). `reset_stats`
    /// leaves the gauges alone.
    pub in_flight_put_entries: u64,
    /// Gauge: the user records in `in_flight_put_entries`.
    pub in_flight_user_records: u64,
    /// Requests per access key id that signed them (the `Credential=` of a SigV4 `Authorization`
    /// header, [`UNSIGNED`] without one), then per operation: which credentials a client used.
    pub access_keys: BTreeMap<String, BTreeMap<String, u64>>,
    /// With [`ProxyHandle::check_signatures`]: batch put requests whose SigV4 signature matches
    /// their method, path, signed headers and body under the given secret key, and those whose
    /// signature does not (or that are not signed).
    pub signatures_valid: u64,
    pub signatures_invalid: u64,
}

impl ProxyStats {
    pub fn requests(&self, operation: &str) -> u64 {
        self.requests.get(operation).copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct Plan {
    queued: HashMap<String, VecDeque<Fault>>,
    /// (probability, fault) rules per operation, rolled in order before `always`.
    sometimes: HashMap<String, Vec<(f64, Fault)>>,
    always: HashMap<String, Fault>,
    shard_limit: Option<ShardLimiter>,
}

/// (shard id, starting hash key, ending hash key) of an open shard.
type OpenShard = (String, u128, u128);

/// The shard limit with the state it keeps: each stream's open shards and each shard's buckets.
struct ShardLimiter {
    bytes_per_sec: u64,
    records_per_sec: u64,
    /// Open shards per stream, and when kinesalite listed them.
    shards: HashMap<String, (Instant, Vec<OpenShard>)>,
    /// Per (stream, shard id); a shard seen for the first time starts full.
    buckets: HashMap<(String, String), ShardBuckets>,
}

impl ShardLimiter {
    fn new(bytes_per_sec: u64, records_per_sec: u64) -> ShardLimiter {
        ShardLimiter {
            bytes_per_sec,
            records_per_sec,
            shards: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// The open shards of `stream`, unless they were listed too long ago (or never).
    fn listed_shards(&self, stream: &str) -> Option<Vec<OpenShard>> {
        self.shards
            .get(stream)
            .filter(|(listed_at, _)| listed_at.elapsed() < SHARD_LIST_TTL)
            .map(|(_, shards)| shards.clone())
    }

    /// Takes `bytes` and one record from the shard's buckets if both hold enough.
    fn take(&mut self, stream: &str, shard: &str, bytes: u64) -> bool {
        let now = Instant::now();
        let (bytes_per_sec, records_per_sec) = (self.bytes_per_sec, self.records_per_sec);
        self.buckets
            .entry((stream.to_string(), shard.to_string()))
            .or_insert_with(|| ShardBuckets {
                bytes: Bucket::full(bytes_per_sec, now),
                records: Bucket::full(records_per_sec, now),
            })
            .take(bytes, now)
    }
}

struct ShardBuckets {
    bytes: Bucket,
    records: Bucket,
}

impl ShardBuckets {
    fn take(&mut self, bytes: u64, now: Instant) -> bool {
        self.bytes.refill(now);
        self.records.refill(now);
        // A record larger than a second's worth (a 1 MiB aggregate on a shard limited below
        // 1 MiB/s) fits a full bucket and leaves it in debt, so it is admitted at the limit's
        // average rate instead of never.
        let need = (bytes as f64).min(self.bytes.rate);
        let fits = self.bytes.tokens >= need && self.records.tokens >= 1.0;
        if fits {
            self.bytes.tokens -= bytes as f64;
            self.records.tokens -= 1.0;
        }
        fits
    }
}

/// A token bucket earning `rate` tokens a second, continuously, and holding at most `rate`
/// (it may go below zero: see [`ShardBuckets::take`]).
struct Bucket {
    tokens: f64,
    rate: f64,
    refilled_at: Instant,
}

impl Bucket {
    fn full(rate: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate as f64,
            rate: rate as f64,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = self.rate * now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + earned).min(self.rate);
        self.refilled_at = now;
    }
}

struct State {
    /// host:port of the upstream (kinesalite or moto).
    upstream: String,
    plan: Mutex<Plan>,
    stats: Mutex<ProxyStats>,
    /// The secret access key batch put signatures are checked with, if they are.
    signing_secret: Mutex<Option<String>>,
    in_flight: watch::Sender<usize>,
}

/// Programs the proxy and reads its counters; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct ProxyHandle(Arc<State>);

impl ProxyHandle {
    /// Applies `fault` to the next PutRecords request.
    pub fn push(&self, fault: Fault) {
        self.push_for(PUT_RECORDS, fault);
    }

    /// Applies `fault` to each of the next `n` PutRecords requests.
    pub fn push_n(&self, n: usize, fault: Fault) {
        self.push_n_for(PUT_RECORDS, n, fault);
    }

    pub fn push_n_for(&self, operation: &str, n: usize, fault: Fault) {
        for _ in 0..n {
            self.push_for(operation, fault.clone());
        }
    }

    /// Applies `fault` to the next request of `operation` ("ListShards", "PutRecordBatch", ...).
    pub fn push_for(&self, operation: &str, fault: Fault) {
        self.0
            .plan
            .lock()
            .unwrap()
            .queued
            .entry(operation.to_string())
            .or_default()
            .push_back(fault);
    }

    /// Applies `fault` to a PutRecords request with no queued fault with probability `p` (0 to 1),
    /// until `clear`. Such rules are rolled in the order they were added and the first that hits
    /// applies; when none does, the `always` fault does, if there is one.
    pub fn sometimes(&self, p: f64, fault: Fault) {
        self.sometimes_for(PUT_RECORDS, p, fault);
    }

    pub fn sometimes_for(&self, operation: &str, p: f64, fault: Fault) {
        assert!((0.0..=1.0).contains(&p), "probability {p} is not in 0..=1");
        self.0
            .plan
            .lock()
            .unwrap()
            .sometimes
            .entry(operation.to_string())
            .or_default()
            .push((p, fault));
    }

    /// Applies `fault` to every PutRecords request that no queued or occasional fault applies to,
    /// until `clear`; replaces the previous one.
    pub fn always(&self, fault: Fault) {
        self.always_for(PUT_RECORDS, fault);
    }

    pub fn always_for(&self, operation: &str, fault: Fault) {
        self.0
            .plan
            .lock()
            .unwrap()
            .always
            .insert(operation.to_string(), fault);
    }

    /// Limits each open shard's PutRecords writes as real Kinesis does (1 MiB and 1000 records
    /// per second per shard), until `no_shard_limit` or `clear`. Each shard has a bucket of bytes
    /// and one of records, refilled continuously at these rates and holding at most one second's
    /// worth, full to begin with (also when this replaces an earlier limit). An entry takes its
    /// size (data after base64 decoding, plus the partition key) and one record; one that does not
    /// fit in both fails with ProvisionedThroughputExceededException and is not forwarded. This
    /// holds whatever fault applies, except whole-call ones; a partial fault picks its entries
    /// first, which use up nothing.
    ///
    /// Entries are routed as Kinesis routes them ([`hash_key`]) over the stream's open shards,
    /// listed on kinesalite at most [`SHARD_LIST_TTL`] ago so a reshard is followed. Entries whose
    /// shard is unknown (e.g. no such stream) are not limited; nor is any operation but PutRecords.
    pub fn shard_limit(&self, bytes_per_sec: u64, records_per_sec: u64) {
        self.0.plan.lock().unwrap().shard_limit =
            Some(ShardLimiter::new(bytes_per_sec, records_per_sec));
    }

    pub fn no_shard_limit(&self) {
        self.0.plan.lock().unwrap().shard_limit = None;
    }

    /// Drops every queued, occasional and standing fault, and the shard limit; the counters stay.
    pub fn clear(&self) {
        *self.0.plan.lock().unwrap() = Plan::default();
    }

    /// Queued faults not applied yet, over all operations.
    pub fn pending(&self) -> usize {
        self.0
            .plan
            .lock()
            .unwrap()
            .queued
            .values()
            .map(VecDeque::len)
            .sum()
    }

    pub fn stats(&self) -> ProxyStats {
        self.0.stats.lock().unwrap().clone()
    }

    /// From now on, checks the SigV4 signature of every batch put request against
    /// `secret_access_key`, counting the outcomes in `signatures_valid` and
    /// `signatures_invalid`. The local servers never check one: this is how a test learns that
    /// what the client signed is the request it sent, body included.
    pub fn check_signatures(&self, secret_access_key: &str) {
        *self.0.signing_secret.lock().unwrap() = Some(secret_access_key.to_string());
    }

    /// Zeroes the counters; the in-flight gauges stay.
    pub fn reset_stats(&self) {
        let mut stats = self.0.stats.lock().unwrap();
        *stats = ProxyStats {
            in_flight_put_entries: stats.in_flight_put_entries,
            in_flight_user_records: stats.in_flight_user_records,
            ..ProxyStats::default()
        };
    }

    /// Waits until no request is being handled, including forwards whose client gave up
    /// (see [`Fault::Delay`]).
    pub async fn settle(&self) {
        let mut rx = self.0.in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// The proxy server. Dereferences to its [`ProxyHandle`]; stops accepting and drops its
/// connections when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    handle: ProxyHandle,
    accept_loop: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `upstream_endpoint`
    /// ("http://127.0.0.1:PORT", kinesalite or moto). Needs a tokio runtime, which must outlive
    /// the proxy.
    pub async fn start(upstream_endpoint: &str) -> FaultProxy {
        let upstream = upstream_endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind FaultProxy on 127.0.0.1");
        let addr = listener.local_addr().expect("FaultProxy address");
        let state = Arc::new(State {
            upstream,
            plan: Mutex::default(),
            stats: Mutex::default(),
            signing_secret: Mutex::default(),
            in_flight: watch::Sender::new(0),
        });
        let accept_loop = tokio::spawn(accept_loop(listener, state.clone()));
        FaultProxy {
            addr,
            handle: ProxyHandle(state),
            accept_loop,
        }
    }

    /// `http://127.0.0.1:PORT`: give this to the client instead of the upstream's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Deref for FaultProxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the loop drops its JoinSet, which aborts every connection task.
        self.accept_loop.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            // Errors are clients hanging up or our own `Reset`: nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Decrements the in-flight count when the request's work is done, however it ends.
struct InFlight(Arc<State>);

impl InFlight {
    fn start(state: &Arc<State>) -> InFlight {
        state.in_flight.send_modify(|n| *n += 1);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

/// Counts a batch put request's entries and user records in the in-flight gauges until the proxy
/// is done with it.
struct PutInFlight {
    state: Arc<State>,
    entries: u64,
    user_records: u64,
}

impl PutInFlight {
    fn start(state: &Arc<State>, put: &PutBody) -> PutInFlight {
        let (entries, user_records) = (put.users.len() as u64, put.users.iter().sum());
        state.count(|s| {
            s.in_flight_put_entries += entries;
            s.in_flight_user_records += user_records;
        });
        PutInFlight {
            state: state.clone(),
            entries,
            user_records,
        }
    }
}

impl Drop for PutInFlight {
    fn drop(&mut self) {
        let (entries, user_records) = (self.entries, self.user_records);
        self.state.count(|s| {
            s.in_flight_put_entries -= entries;
            s.in_flight_user_records -= user_records;
        });
    }
}

/// A batch put request body, parsed once: an object with an array of entries (the service's
/// `request_entries`), and the number of user records in each entry.
struct PutBody {
    body: Value,
    users: Vec<u64>,
}

impl PutBody {
    /// None if the body is not a batch put request of `service` (the upstream rejects it).
    fn parse(bytes: &[u8], service: &Service) -> Option<PutBody> {
        let body: Value = serde_json::from_slice(bytes).ok()?;
        let users = body
            .get(service.request_entries)?
            .as_array()?
            .iter()
            .map(service.user_records)
            .collect();
        Some(PutBody { body, users })
    }
}

/// The access key id of a SigV4 `Authorization` header
/// (`AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, SignedHeaders=..., ...`).
fn access_key_id(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let credential = value.split_once("Credential=")?.1;
    credential.split('/').next().filter(|id| !id.is_empty())
}

/// The user records in a PutRecords entry: those of a KPL aggregate, else 1.
fn kpl_user_records(entry: &Value) -> u64 {
    let data = entry["Data"].as_str().unwrap_or_default();
    if !data.starts_with(MAGIC_BASE64) {
        return 1;
    }
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) else {
        return 1;
    };
    match deaggregate(&bytes) {
        Deaggregated::Aggregate(records) => records.len() as u64,
        Deaggregated::PassThrough => 1,
    }
}

/// A PutRecordBatch entry is one user record: Firehose does not deaggregate.
fn one_user_record(_entry: &Value) -> u64 {
    1
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> io::Result<Response<Full<Bytes>>> {
    let in_flight = InFlight::start(&state);
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (target_prefix, operation) = target.rsplit_once('.').unwrap_or(("", target));
    let service = Service::of(target_prefix);
    let operation = operation.to_string();
    let access_key = access_key_id(&parts.headers)
        .unwrap_or(UNSIGNED)
        .to_string();
    state.count(|s| {
        *s.access_keys
            .entry(access_key)
            .or_default()
            .entry(operation.clone())
            .or_default() += 1;
    });
    let put = match operation == service.batch_put {
        true => PutBody::parse(&body, service),
        false => None,
    };
    let put_in_flight = put.as_ref().map(|p| PutInFlight::start(&state, p));
    let secret = state.signing_secret.lock().unwrap().clone();
    if let (Some(secret), true) = (secret, operation == service.batch_put) {
        let valid = sigv4::verify(&parts, &body, &secret);
        state.count(|s| match valid {
            true => s.signatures_valid += 1,
            false => s.signatures_invalid += 1,
        });
    }
    let fault = state.next_fault(&operation);
    // A task of its own, so a client that hangs up (a timeout) does not cancel a forward.
    let work = tokio::spawn(async move {
        let _in_flight = (in_flight, put_in_flight);
        respond(
            &state,
            service,
            &operation,
            fault,
            Request::from_parts(parts, body),
            put,
        )
        .await
    });
    let response = work.await.map_err(io::Error::other)??;
    Ok(response.map(Full::new))
}

impl State {
    fn next_fault(&self, operation: &str) -> Option<Fault> {
        *self
            .stats
            .lock()
            .unwrap()
            .requests
            .entry(operation.to_string())
            .or_default() += 1;
        let mut plan = self.plan.lock().unwrap();
        if let Some(fault) = plan.queued.get_mut(operation).and_then(VecDeque::pop_front) {
            return Some(fault);
        }
        let mut rng = rand::thread_rng();
        let by_chance = plan
            .sometimes
            .get(operation)
            .into_iter()
            .flatten()
            .find(|(p, _)| rng.gen_bool(*p));
        by_chance
            .map(|(_, fault)| fault)
            .or_else(|| plan.always.get(operation))
            .cloned()
    }

    /// Which of `records` (positions not in `failed` already) are over their shard's limit, with
    /// that shard; the others use up their shard's capacity. Empty without a shard limit.
    async fn over_shard_limit(
        &self,
        stream: &str,
        records: &[Value],
        failed: &BTreeMap<usize, Value>,
    ) -> Vec<(usize, String)> {
        let listed = {
            let plan = self.plan.lock().unwrap();
            match &plan.shard_limit {
                None => return Vec::new(),
                Some(limiter) => limiter.listed_shards(stream),
            }
        };
        let (shards, fresh) = match listed {
            Some(shards) => (shards, false),
            // Not cached if kinesalite cannot list them: the entries then go unlimited.
            None => match list_open_shards(self, stream).await {
                Some(shards) => (shards, true),
                None => return Vec::new(),
            },
        };
        let mut plan = self.plan.lock().unwrap();
        // The limit may have been lifted or replaced while we listed the shards.
        let Some(limiter) = plan.shard_limit.as_mut() else {
            return Vec::new();
        };
        if fresh {
            limiter
                .shards
                .insert(stream.to_string(), (Instant::now(), shards.clone()));
        }
        records
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains_key(i))
            .filter_map(|(i, entry)| {
                let shard = shard_of(&shards, entry)?;
                (!limiter.take(stream, shard, entry_bytes(entry))).then(|| (i, shard.to_string()))
            })
            .collect()
    }

    fn count(&self, update: impl FnOnce(&mut ProxyStats)) {
        update(&mut self.stats.lock().unwrap());
    }
}

/// The response for one request; `Err` closes the connection without one.
async fn respond(
    state: &State,
    service: &Service,
    operation: &str,
    fault: Option<Fault>,
    req: Request<Bytes>,
    put: Option<PutBody>,
) -> io::Result<Response<Bytes>> {
    // Partial faults only make sense for a batch put; anything else passes through.
    let fault = match fault {
        Some(Fault::PartialThrottle(_) | Fault::PartialInternalFailure(_))
            if operation != service.batch_put =>
        {
            None
        }
        other => other,
    };
    if fault.is_some() {
        state.count(|s| s.faults_injected += 1);
    }
    match fault {
        None => Ok(pass_on(state, service, operation, req, put).await),
        Some(Fault::Status(code)) => {
            let kind = if code == 503 {
                service.unavailable_type
            } else {
                "InternalFailure"
            };
            Ok(error_response(
                code,
                kind,
                &format!("{kind} injected by FaultProxy"),
            ))
        }
        Some(Fault::ThrottleRequest) => {
            let body: Value = serde_json::from_slice(req.body()).unwrap_or_default();
            let stream = stream_name(&body);
            let shard = if service.sharded {
                let first = body[service.request_entries].get(0).unwrap_or(&body);
                shards_of(state, &stream, &[first]).await.pop().flatten()
            } else {
                None
            };
            let message = throttle_message(service, &stream, shard.as_deref());
            Ok(error_response(
                service.throttle_status,
                service.throttle_code,
                &message,
            ))
        }
        Some(Fault::PartialThrottle(entries)) => {
            let partial = Some((entries, FailureKind::Throttle));
            Ok(put_batch(state, service, req, put, partial).await)
        }
        Some(Fault::PartialInternalFailure(entries)) => {
            let partial = Some((entries, FailureKind::Internal));
            Ok(put_batch(state, service, req, put, partial).await)
        }
        Some(Fault::Reset) => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "FaultProxy: Reset",
        )),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(pass_on(state, service, operation, req, put).await)
        }
    }
}

/// Forwards a request no whole-call fault stopped: a batch put through [`put_batch`] (for the
/// shard limit), anything else untouched.
async fn pass_on(
    state: &State,
    service: &Service,
    operation: &str,
    req: Request<Bytes>,
    put: Option<PutBody>,
) -> Response<Bytes> {
    if operation == service.batch_put {
        put_batch(state, service, req, put, None).await
    } else {
        forward_counted(state, req, 0).await
    }
}

#[derive(Clone, Copy, PartialEq)]
enum FailureKind {
    Throttle,
    Internal,
}

/// Fails the batch put entries a partial fault picks, then (Kinesis only) those over the shard
/// limit, forwards the rest, and splices the failures back into the upstream's answer at their
/// original positions. A request with no entry to fail is forwarded untouched. `put` is the
/// request's body, parsed.
async fn put_batch(
    state: &State,
    service: &Service,
    req: Request<Bytes>,
    put: Option<PutBody>,
    partial: Option<(Entries, FailureKind)>,
) -> Response<Bytes> {
    let Some(PutBody { mut body, users }) = put else {
        return forward_counted(state, req, 0).await; // let the upstream reject it
    };
    let records = std::mem::take(
        body[service.request_entries]
            .as_array_mut()
            .expect("checked by PutBody::parse"),
    );
    let total = records.len();
    let stream = stream_name(&body);

    // Position → the entry's answer, for every entry that is not forwarded.
    let mut failures = BTreeMap::new();
    let (mut throttled, mut internal) = (0, 0);
    if let Some((entries, kind)) = partial {
        let picked = entries.pick(total);
        match kind {
            FailureKind::Throttle => {
                let shards = if service.sharded {
                    let picked_records: Vec<&Value> = picked.iter().map(|&i| &records[i]).collect();
                    shards_of(state, &stream, &picked_records).await
                } else {
                    vec![None; picked.len()]
                };
                failures.extend(
                    picked.iter().zip(&shards).map(|(&i, shard)| {
                        (i, throttled_entry(service, &stream, shard.as_deref()))
                    }),
                );
                throttled = picked.len();
            }
            FailureKind::Internal => {
                let failure = json!({"ErrorCode": "InternalFailure", "ErrorMessage": "Internal service failure."});
                failures.extend(picked.iter().map(|&i| (i, failure.clone())));
                internal = picked.len();
            }
        }
    }
    let over_limit = match service.sharded {
        true => state.over_shard_limit(&stream, &records, &failures).await,
        false => Vec::new(),
    };
    let over_limit_count = over_limit.len();
    failures.extend(
        over_limit
            .into_iter()
            .map(|(i, shard)| (i, throttled_entry(service, &stream, Some(&shard)))),
    );
    if failures.is_empty() {
        let upstream = forward_counted(state, req, total).await;
        count_accepted(state, service, &users, &upstream);
        return upstream;
    }

    let (kept, kept_users): (Vec<Value>, Vec<u64>) = records
        .into_iter()
        .zip(users)
        .enumerate()
        .filter(|(i, _)| !failures.contains_key(i))
        .map(|(_, kept)| kept)
        .unzip();
    // With nothing left to send, answer as the service would: 200, every entry failed.
    let (mut head, mut answer, landed) = if kept.is_empty() {
        let answer = serde_json::from_str(service.answer_base).expect("answer_base is JSON");
        (Response::new(()).into_parts().0, answer, Vec::new())
    } else {
        let sent = kept.len();
        body[service.request_entries] = Value::Array(kept);
        let (parts, _) = req.into_parts();
        let upstream = forward_counted(
            state,
            Request::from_parts(parts, Bytes::from(body.to_string())),
            sent,
        )
        .await;
        if upstream.status() != StatusCode::OK {
            return upstream; // the upstream refused the rest (validation etc.): pass that on
        }
        let (head, upstream_body) = upstream.into_parts();
        let mut answer: Value = serde_json::from_slice(&upstream_body).unwrap_or_default();
        let landed = answer[service.answer_entries]
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        if landed.len() != sent {
            let text = String::from_utf8_lossy(&upstream_body);
            return plain_response(
                StatusCode::BAD_GATEWAY,
                format!(
                    "FaultProxy: unexpected {} answer: {text}",
                    service.batch_put
                ),
            );
        }
        (head, answer, landed)
    };

    let accepted: u64 = landed
        .iter()
        .zip(&kept_users)
        .filter(|(answer, _)| accepted_entry(answer))
        .map(|(_, users)| users)
        .sum();
    let mut landed = landed.into_iter();
    let spliced: Vec<Value> = (0..total)
        .map(|i| {
            failures
                .remove(&i)
                .or_else(|| landed.next())
                .expect("one entry per position")
        })
        .collect();
    let failed_count = spliced
        .iter()
        .filter(|e| e.get("ErrorCode").is_some())
        .count();
    answer[service.failed_count] = json!(failed_count);
    answer[service.answer_entries] = Value::Array(spliced);
    state.count(|s| {
        s.entries_throttled += (throttled + over_limit_count) as u64;
        s.entries_over_shard_limit += over_limit_count as u64;
        s.entries_internal_failure += internal as u64;
        s.user_records_forwarded += accepted;
    });

    let body = Bytes::from(answer.to_string());
    head.status = StatusCode::OK;
    head.headers
        .insert(CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
    head.headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(head, body)
}

/// Counts the user records of the entries the upstream accepted in its answer to a batch put
/// forwarded untouched; `users` has the user records of each entry.
fn count_accepted(state: &State, service: &Service, users: &[u64], upstream: &Response<Bytes>) {
    if upstream.status() != StatusCode::OK {
        return;
    }
    const ERROR_CODE: &[u8] = b"\"ErrorCode\"";
    let body = upstream.body();
    // Answers without a failed entry (nearly all) are not parsed.
    let accepted: u64 = if !body.windows(ERROR_CODE.len()).any(|w| w == ERROR_CODE) {
        users.iter().sum()
    } else {
        let answer: Value = serde_json::from_slice(body).unwrap_or_default();
        let answers = answer[service.answer_entries]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if answers.len() != users.len() {
            return;
        }
        answers
            .iter()
            .zip(users)
            .filter(|(answer, _)| accepted_entry(answer))
            .map(|(_, users)| users)
            .sum()
    };
    state.count(|s| s.user_records_forwarded += accepted);
}

/// Whether a batch put answer entry is a success (has no ErrorCode).
fn accepted_entry(answer: &Value) -> bool {
    matches!(answer.get("ErrorCode"), None | Some(Value::Null))
}

/// A batch put answer entry for an entry that was throttled.
fn throttled_entry(service: &Service, stream: &str, shard: Option<&str>) -> Value {
    json!({
        "ErrorCode": service.throttle_code,
        "ErrorMessage": throttle_message(service, stream, shard),
    })
}

fn plain_response(status: StatusCode, text: String) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .body(Bytes::from(text))
        .expect("valid response")
}

/// A JSON 1.1 error answer, as both services give.
fn error_response(status: u16, kind: &str, message: &str) -> Response<Bytes> {
    let body = Bytes::from(json!({"__type": kind, "message": message}).to_string());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, AMZ_JSON)
        .header(CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid error response")
}

fn throttle_message(service: &Service, stream: &str, shard: Option<&str>) -> String {
    match (service.sharded, shard) {
        (false, _) => SLOW_DOWN.to_string(),
        (true, Some(shard)) => {
            format!("Rate exceeded for shard {shard} in stream {stream} under account {ACCOUNT}.")
        }
        (true, None) => format!("Rate exceeded for stream {stream} under account {ACCOUNT}."),
    }
}

/// StreamName, or the name part of StreamARN.
fn stream_name(body: &Value) -> String {
    match (body["StreamName"].as_str(), body["StreamARN"].as_str()) {
        (Some(name), _) => name.to_string(),
        (None, Some(arn)) => arn.rsplit('/').next().unwrap_or(arn).to_string(),
        (None, None) => String::new(),
    }
}

/// The hash key Kinesis routes an entry by: ExplicitHashKey, else MD5 of the partition key.
fn hash_key(entry: &Value) -> Option<u128> {
    if let Some(ehk) = entry["ExplicitHashKey"].as_str() {
        return ehk.parse().ok();
    }
    let digest = Md5::digest(entry["PartitionKey"].as_str()?.as_bytes());
    Some(u128::from_be_bytes(digest.into()))
}

/// What an entry counts against its shard's byte rate: the data (base64 in the request, counted
/// decoded) and the partition key.
fn entry_bytes(entry: &Value) -> u64 {
    let data = entry["Data"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches('=');
    let key = entry["PartitionKey"].as_str().unwrap_or_default();
    (data.len() * 3 / 4 + key.len()) as u64
}

/// The open shard whose hash key range holds the entry's hash key.
fn shard_of<'a>(shards: &'a [OpenShard], entry: &Value) -> Option<&'a str> {
    let hash = hash_key(entry)?;
    shards
        .iter()
        .find(|(_, start, end)| (*start..=*end).contains(&hash))
        .map(|(id, _, _)| id.as_str())
}

/// The open shard each entry would go to, looked up with one ListShards call (for error
/// messages only; None where unknown).
async fn shards_of(state: &State, stream: &str, entries: &[&Value]) -> Vec<Option<String>> {
    let shards = list_open_shards(state, stream).await.unwrap_or_default();
    entries
        .iter()
        .map(|e| shard_of(&shards, e).map(str::to_string))
        .collect()
}

async fn list_open_shards(state: &State, stream: &str) -> Option<Vec<OpenShard>> {
    let req = Request::post("/")
        .header("host", &state.upstream)
        .header(CONTENT_TYPE, AMZ_JSON)
        .header("x-amz-target", "Kinesis_20131202.ListShards")
        .header("x-amz-date", "20240101T000000Z")
        // kinesalite wants a signature-shaped header but never checks it.
        .header("authorization", "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0")
        .body(Bytes::from(json!({"StreamName": stream}).to_string()))
        .ok()?;
    let resp = forward(state, req).await.ok()?;
    let body: Value = serde_json::from_slice(resp.body()).ok()?;
    let shards = body["Shards"].as_array()?;
    Some(
        shards
            .iter()
            .filter(|s| s["SequenceNumberRange"]["EndingSequenceNumber"].is_null())
            .filter_map(|s| {
                let range = &s["HashKeyRange"];
                Some((
                    s["ShardId"].as_str()?.to_string(),
                    range["StartingHashKey"].as_str()?.parse().ok()?,
                    range["EndingHashKey"].as_str()?.parse().ok()?,
                ))
            })
            .collect(),
    )
}

/// Forwards, counting `entries` batch put entries as forwarded; an unreachable upstream becomes
/// a 502.
async fn forward_counted(state: &State, req: Request<Bytes>, entries: usize) -> Response<Bytes> {
    state.count(|s| s.entries_forwarded += entries as u64);
    match forward(state, req).await {
        Ok(resp) => resp,
        Err(e) => plain_response(
            StatusCode::BAD_GATEWAY,
            format!("FaultProxy: upstream {}: {e}", state.upstream),
        ),
    }
}

/// One request on a fresh upstream connection; bodies are buffered whole.
async fn forward(state: &State, req: Request<Bytes>) -> io::Result<Response<Bytes>> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let stream = TcpStream::connect(&state.upstream).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    let resp = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(io::Error::other)?;
    let (mut parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [CONNECTION, TRANSFER_ENCODING] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}
