//! The tests' fault-injecting proxy for Kinesis and Amazon Data Firehose as a program, for tests
//! in other languages (the Ruby plugin tests drive it through test/support/fault_proxy.rb).
//!
//! `kinesis_fault_proxy UPSTREAM_URL [OPERATION]` listens on 127.0.0.1 (a free port) in front of
//! UPSTREAM_URL (kinesalite, or moto for Firehose), prints one JSON line `{"port":N,"pid":P}`,
//! then reads commands from stdin, one per line, and answers each with one JSON line
//! (`{"ok":true}`, the stats, or `{"error":"..."}`). OPERATION is the proxy's operation, the one
//! `push`, `sometimes` and `always` apply faults to: PutRecords (Kinesis, the default) or
//! PutRecordBatch (Firehose).
//!
//! ```text
//! push N FAULT      apply FAULT to each of the next N requests of the proxy's operation
//! sometimes P FAULT apply FAULT with probability P (0 to 1) to a request of the proxy's
//!                   operation with no queued fault; such rules are rolled in the order given, the
//!                   first hit applies
//! always FAULT      apply FAULT to every request of the proxy's operation no queued or
//!                   `sometimes` fault hit (replaces the previous one)
//! shard_limit B R   limit each open shard to B bytes and R records per second, as Kinesis does
//!                   (`shard_limit 1048576 1000`): PutRecords entries over it fail with
//!                   ProvisionedThroughputExceededException and are not forwarded
//! shard_limit off   lift the shard limit
//! clear             drop queued, `sometimes` and `always` faults and the shard limit
//!                   (counters stay)
//! stats             {"requests":{"PutRecords":n,...},"faults_injected":n,"entries_throttled":n,
//!                    "entries_over_shard_limit":n,"entries_internal_failure":n,
//!                    "entries_forwarded":n,"user_records_forwarded":n,
//!                    "in_flight_put_entries":n,"in_flight_user_records":n,"pending":n,
//!                    "access_keys":{"AKID":{"PutRecords":n,...},...}}
//! ```
//!
//! FAULT is `status 500` (or 503), `throttle_request`, `partial_throttle 0.5`,
//! `partial_internal_failure 0.5` (fractions of the entries), `reset` or `delay_ms 1500`. Each
//! fails as the service does: `throttle_request` answers PutRecords HTTP 400
//! ProvisionedThroughputExceededException and PutRecordBatch HTTP 500
//! ServiceUnavailableException; `partial_throttle` fails entries with those error codes and
//! `partial_internal_failure` with InternalFailure, forwarding the other entries only.
//!
//! The entry counts are of both batch puts, PutRecords and PutRecordBatch. entries_throttled
//! counts the entries over the shard limit as well. user_records_forwarded counts the user records
//! (those of a KPL aggregate in PutRecords, else 1 per entry) of the entries the upstream accepted.
//! in_flight_put_entries and in_flight_user_records are gauges: the batch put entries, and the
//! user records in them, of the requests received and not answered yet (delayed ones and those
//! waiting for the upstream included; a request counts until the proxy is done with it, even if
//! its client gave up). access_keys counts the requests per access key id that signed them (the
//! SigV4 Authorization header's Credential; "(unsigned)" without one), then per operation. The
//! shard limit (PutRecords only) is explained in tests/support/fault_proxy.rs
//! (`ProxyHandle::shard_limit`). The proxy exits when stdin closes.
//!
//! `cargo run -p kinesis_core --example kinesis_fault_proxy -- http://127.0.0.1:4567`
//! `cargo run -p kinesis_core --example kinesis_fault_proxy -- http://127.0.0.1:5000 PutRecordBatch`

#[allow(dead_code)]
#[path = "../tests/support/fault_proxy.rs"]
mod fault_proxy;
#[path = "../tests/support/sigv4.rs"]
mod sigv4;

use std::io::{BufRead, Write};
use std::time::Duration;

use fault_proxy::{Entries, Fault, FaultProxy, ProxyHandle, PUT_RECORDS, PUT_RECORD_BATCH};
use serde_json::{json, Value};

fn parse_fault(words: &[&str]) -> Result<Fault, String> {
    let number = |what: &str| -> Result<f64, String> {
        let text = words
            .get(1)
            .ok_or_else(|| format!("{} needs {what}", words[0]))?;
        text.parse::<f64>()
            .map_err(|_| format!("{}: {text:?} is not {what}", words[0]))
    };
    let fault = match words {
        ["status", _] => {
            let code = number("an HTTP status")?;
            Fault::Status(code as u16)
        }
        ["throttle_request"] => Fault::ThrottleRequest,
        ["partial_throttle", _] => Fault::PartialThrottle(Entries::Fraction(number("a fraction")?)),
        ["partial_internal_failure", _] => Fault::PartialInternalFailure(Entries::Fraction(number("a fraction")?)),
        ["reset"] => Fault::Reset,
        ["delay_ms", _] => Fault::Delay(Duration::from_millis(number("milliseconds")? as u64)),
        _ => return Err(format!("unknown fault {:?}: status CODE, throttle_request, partial_throttle F, partial_internal_failure F, reset, delay_ms MS", words.join(" "))),
    };
    Ok(fault)
}

fn stats(proxy: &ProxyHandle) -> Value {
    let s = proxy.stats();
    json!({
        "requests": s.requests,
        "faults_injected": s.faults_injected,
        "entries_throttled": s.entries_throttled,
        "entries_over_shard_limit": s.entries_over_shard_limit,
        "entries_internal_failure": s.entries_internal_failure,
        "entries_forwarded": s.entries_forwarded,
        "user_records_forwarded": s.user_records_forwarded,
        "in_flight_put_entries": s.in_flight_put_entries,
        "in_flight_user_records": s.in_flight_user_records,
        "access_keys": s.access_keys,
        "pending": proxy.pending(),
    })
}

/// Runs one command; `push`, `sometimes` and `always` apply to `operation`.
fn command(proxy: &ProxyHandle, operation: &str, line: &str) -> Result<Value, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let ok = json!({"ok": true});
    match words.as_slice() {
        ["push", n, fault @ ..] => {
            let n: usize = n
                .parse()
                .map_err(|_| format!("push: {n:?} is not a count"))?;
            proxy.push_n_for(operation, n, parse_fault(fault)?);
            Ok(ok)
        }
        ["sometimes", p, fault @ ..] => {
            let p: f64 = p
                .parse()
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| format!("sometimes: {p:?} is not a probability (0 to 1)"))?;
            proxy.sometimes_for(operation, p, parse_fault(fault)?);
            Ok(ok)
        }
        ["always", fault @ ..] => {
            proxy.always_for(operation, parse_fault(fault)?);
            Ok(ok)
        }
        ["shard_limit", "off"] => {
            proxy.no_shard_limit();
            Ok(ok)
        }
        ["shard_limit", bytes, records] => {
            let rate = |text: &str, what: &str| {
                text.parse::<u64>()
                    .map_err(|_| format!("shard_limit: {text:?} is not {what} per second"))
            };
            proxy.shard_limit(rate(bytes, "bytes")?, rate(records, "records")?);
            Ok(ok)
        }
        ["clear"] => {
            proxy.clear();
            Ok(ok)
        }
        ["stats"] => Ok(stats(proxy)),
        _ => Err(format!(
            "unknown command {line:?}: push N FAULT, sometimes P FAULT, always FAULT, shard_limit B R, shard_limit off, clear, stats"
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (upstream, operation) = match args.as_slice() {
        [url] => (url, PUT_RECORDS),
        [url, op] if op == PUT_RECORDS || op == PUT_RECORD_BATCH => (url, op.as_str()),
        _ => {
            eprintln!(
                "usage: kinesis_fault_proxy UPSTREAM_URL [OPERATION] (e.g. http://127.0.0.1:4567; \
                 OPERATION, the one faults apply to: {PUT_RECORDS}, the default, or {PUT_RECORD_BATCH})"
            );
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The proxy's tasks run on the runtime's workers; this thread only reads commands.
    let proxy = runtime.block_on(FaultProxy::start(upstream));
    let handle = proxy.handle();
    let port = proxy
        .endpoint()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();

    let mut out = std::io::stdout().lock();
    let hello = json!({"port": port.parse::<u16>().expect("port"), "pid": std::process::id()});
    writeln!(out, "{hello}")
        .and_then(|_| out.flush())
        .expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let answer = command(&handle, operation, &line).unwrap_or_else(|e| json!({"error": e}));
        if writeln!(out, "{answer}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    // stdin closed: stop at once, abandoning requests still in flight (delayed ones included).
    drop(proxy);
    runtime.shutdown_background();
}
