//! `FaultProxy`: an HTTP/1.1 reverse proxy in front of kinesalite that injects the failures real
//! Kinesis produces: 5xx answers, whole-call and per-entry throttling, per-entry internal
//! failures, dropped connections and slow answers. kinesalite never fails on its own.
//!
//! Faults are queued per operation (the `X-Amz-Target` suffix) and each applies to one request;
//! a standing fault (`always`) applies to every request of its operation until `clear`.
//! Requests without a fault are forwarded untouched.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

const PUT_RECORDS: &str = "PutRecords";
/// kinesalite's account id, used in the error messages we make up.
const ACCOUNT: &str = "000000000000";
const AMZ_JSON: &str = "application/x-amz-json-1.1";

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer this HTTP status (500 or 503) with a Kinesis JSON error body (InternalFailure,
    /// or ServiceUnavailable for 503). Nothing is forwarded.
    Status(u16),
    /// HTTP 400 ProvisionedThroughputExceededException for the whole call. Nothing is forwarded.
    ThrottleRequest,
    /// PutRecords only: the chosen entries fail with ProvisionedThroughputExceededException and
    /// never reach kinesalite; the rest are forwarded. Other operations pass through.
    PartialThrottle(Entries),
    /// As `PartialThrottle`, with ErrorCode InternalFailure.
    PartialInternalFailure(Entries),
    /// Read the request, then close the connection without answering. Nothing is forwarded.
    Reset,
    /// Wait, then forward. The request is forwarded even if the client has given up by then:
    /// as with real Kinesis, a call that timed out may still have succeeded.
    Delay(Duration),
}

/// Which PutRecords entries a partial fault fails.
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
    /// Requests a fault was applied to.
    pub faults_injected: u64,
    /// PutRecords entries answered with ProvisionedThroughputExceededException by a partial fault.
    pub entries_throttled: u64,
    /// PutRecords entries answered with InternalFailure by a partial fault.
    pub entries_internal_failure: u64,
    /// PutRecords entries sent on to kinesalite.
    pub entries_forwarded: u64,
}

impl ProxyStats {
    pub fn requests(&self, operation: &str) -> u64 {
        self.requests.get(operation).copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct Plan {
    queued: HashMap<String, VecDeque<Fault>>,
    always: HashMap<String, Fault>,
}

struct State {
    /// host:port of kinesalite.
    upstream: String,
    plan: Mutex<Plan>,
    stats: Mutex<ProxyStats>,
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
        for _ in 0..n {
            self.push(fault.clone());
        }
    }

    /// Applies `fault` to the next request of `operation` ("ListShards", "PutRecord", ...).
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

    /// Applies `fault` to every PutRecords request (after the queued ones) until `clear`.
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

    /// Drops every queued and standing fault; the counters stay.
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

    pub fn reset_stats(&self) {
        *self.0.stats.lock().unwrap() = ProxyStats::default();
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
    /// ("http://127.0.0.1:PORT"). Needs a tokio runtime, which must outlive the proxy.
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
            in_flight: watch::Sender::new(0),
        });
        let accept_loop = tokio::spawn(accept_loop(listener, state.clone()));
        FaultProxy {
            addr,
            handle: ProxyHandle(state),
            accept_loop,
        }
    }

    /// `http://127.0.0.1:PORT`: give this to the client instead of kinesalite's endpoint.
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

async fn handle(state: Arc<State>, req: Request<Incoming>) -> io::Result<Response<Full<Bytes>>> {
    let in_flight = InFlight::start(&state);
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let operation = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
        .unwrap_or_default();
    let fault = state.next_fault(&operation);
    // A task of its own, so a client that hangs up (a timeout) does not cancel a forward.
    let work = tokio::spawn(async move {
        let _in_flight = in_flight;
        respond(&state, &operation, fault, Request::from_parts(parts, body)).await
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
        match plan.queued.get_mut(operation).and_then(VecDeque::pop_front) {
            Some(fault) => Some(fault),
            None => plan.always.get(operation).cloned(),
        }
    }

    fn count(&self, update: impl FnOnce(&mut ProxyStats)) {
        update(&mut self.stats.lock().unwrap());
    }
}

/// The response for one request; `Err` closes the connection without one.
async fn respond(
    state: &State,
    operation: &str,
    fault: Option<Fault>,
    req: Request<Bytes>,
) -> io::Result<Response<Bytes>> {
    // Partial faults only make sense for PutRecords; anything else passes through.
    let fault = match fault {
        Some(Fault::PartialThrottle(_) | Fault::PartialInternalFailure(_))
            if operation != PUT_RECORDS =>
        {
            None
        }
        other => other,
    };
    if fault.is_some() {
        state.count(|s| s.faults_injected += 1);
    }
    match fault {
        None => Ok(forward_counted(state, operation, req).await),
        Some(Fault::Status(code)) => {
            let kind = if code == 503 {
                "ServiceUnavailable"
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
            let first = body["Records"].get(0).unwrap_or(&body);
            let shard = shards_of(state, &stream, std::slice::from_ref(first))
                .await
                .pop()
                .flatten();
            let message = throttle_message(&stream, shard.as_deref());
            Ok(error_response(
                400,
                "ProvisionedThroughputExceededException",
                &message,
            ))
        }
        Some(Fault::PartialThrottle(entries)) => {
            Ok(partial_failure(state, req, &entries, FailureKind::Throttle).await)
        }
        Some(Fault::PartialInternalFailure(entries)) => {
            Ok(partial_failure(state, req, &entries, FailureKind::Internal).await)
        }
        Some(Fault::Reset) => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "FaultProxy: Reset",
        )),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(forward_counted(state, operation, req).await)
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum FailureKind {
    Throttle,
    Internal,
}

/// Fails the chosen PutRecords entries, forwards the rest, and splices the failures back into
/// kinesalite's answer at their original positions.
async fn partial_failure(
    state: &State,
    req: Request<Bytes>,
    entries: &Entries,
    kind: FailureKind,
) -> Response<Bytes> {
    let mut body: Value = match serde_json::from_slice(req.body()) {
        Ok(body @ Value::Object(_)) if body["Records"].is_array() => body,
        _ => return forward_counted(state, PUT_RECORDS, req).await, // let kinesalite reject it
    };
    let records = std::mem::take(body["Records"].as_array_mut().expect("checked above"));
    let total = records.len();
    let failed = entries.pick(total);
    let (removed, kept): (Vec<_>, Vec<_>) = records
        .into_iter()
        .enumerate()
        .partition(|(i, _)| failed.contains(i));
    let stream = stream_name(&body);
    let failures: Vec<Value> = match kind {
        FailureKind::Throttle => {
            let removed: Vec<Value> = removed.into_iter().map(|(_, r)| r).collect();
            let shards = shards_of(state, &stream, &removed).await;
            shards
                .iter()
                .map(|shard| {
                    let message = throttle_message(&stream, shard.as_deref());
                    json!({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": message})
                })
                .collect()
        }
        FailureKind::Internal => {
            let failure = json!({"ErrorCode": "InternalFailure", "ErrorMessage": "Internal service failure."});
            vec![failure; removed.len()]
        }
    };

    // With nothing left to send, answer as Kinesis would: 200, every entry failed.
    let (mut head, mut answer, landed) = if kept.is_empty() {
        (Response::new(()).into_parts().0, json!({}), Vec::new())
    } else {
        body["Records"] = kept.into_iter().map(|(_, r)| r).collect();
        let (parts, _) = req.into_parts();
        let upstream = forward_counted(
            state,
            PUT_RECORDS,
            Request::from_parts(parts, Bytes::from(body.to_string())),
        )
        .await;
        if upstream.status() != StatusCode::OK {
            return upstream; // kinesalite refused the rest (validation etc.): pass that on
        }
        let (head, upstream_body) = upstream.into_parts();
        let mut answer: Value = serde_json::from_slice(&upstream_body).unwrap_or_default();
        let landed = answer["Records"]
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        if landed.len() != body["Records"].as_array().map_or(0, Vec::len) {
            let text = String::from_utf8_lossy(&upstream_body);
            return plain_response(
                StatusCode::BAD_GATEWAY,
                format!("FaultProxy: unexpected PutRecords answer: {text}"),
            );
        }
        (head, answer, landed)
    };

    let (mut landed, mut failures) = (landed.into_iter(), failures.into_iter());
    let spliced: Vec<Value> = (0..total)
        .map(|i| {
            if failed.contains(&i) {
                failures.next()
            } else {
                landed.next()
            }
        })
        .map(|entry| entry.expect("one entry per position"))
        .collect();
    let failed_count = spliced
        .iter()
        .filter(|e| e.get("ErrorCode").is_some())
        .count();
    answer["FailedRecordCount"] = json!(failed_count);
    answer["Records"] = Value::Array(spliced);
    state.count(|s| match kind {
        FailureKind::Throttle => s.entries_throttled += failed.len() as u64,
        FailureKind::Internal => s.entries_internal_failure += failed.len() as u64,
    });

    let body = Bytes::from(answer.to_string());
    head.status = StatusCode::OK;
    head.headers
        .insert(CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
    head.headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(head, body)
}

fn plain_response(status: StatusCode, text: String) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .body(Bytes::from(text))
        .expect("valid response")
}

fn error_response(status: u16, kind: &str, message: &str) -> Response<Bytes> {
    let body = Bytes::from(json!({"__type": kind, "message": message}).to_string());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, AMZ_JSON)
        .header(CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid error response")
}

fn throttle_message(stream: &str, shard: Option<&str>) -> String {
    match shard {
        Some(shard) => {
            format!("Rate exceeded for shard {shard} in stream {stream} under account {ACCOUNT}.")
        }
        None => format!("Rate exceeded for stream {stream} under account {ACCOUNT}."),
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

/// The open shard each entry would go to, looked up with one ListShards call (for error
/// messages only; None where unknown).
async fn shards_of(state: &State, stream: &str, entries: &[Value]) -> Vec<Option<String>> {
    let shards = list_open_shards(state, stream).await.unwrap_or_default();
    entries
        .iter()
        .map(|e| {
            let hash = hash_key(e)?;
            shards
                .iter()
                .find(|(_, start, end)| (*start..=*end).contains(&hash))
                .map(|(id, _, _)| id.clone())
        })
        .collect()
}

async fn list_open_shards(state: &State, stream: &str) -> Option<Vec<(String, u128, u128)>> {
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

/// Forwards and counts PutRecords entries; an unreachable upstream becomes a 502.
async fn forward_counted(state: &State, operation: &str, req: Request<Bytes>) -> Response<Bytes> {
    if operation == PUT_RECORDS {
        let entries = serde_json::from_slice::<Value>(req.body())
            .ok()
            .and_then(|b| b["Records"].as_array().map(Vec::len))
            .unwrap_or(0);
        state.count(|s| s.entries_forwarded += entries as u64);
    }
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
