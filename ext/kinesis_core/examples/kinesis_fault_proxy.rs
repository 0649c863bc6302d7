//! The tests' fault-injecting Kinesis proxy as a program, for tests in other languages (the Ruby
//! plugin tests drive it through test/support/fault_proxy.rb).
//!
//! `kinesis_fault_proxy UPSTREAM_URL` listens on 127.0.0.1 (a free port), prints one JSON line
//! `{"port":N,"pid":P}`, then reads commands from stdin, one per line, and answers each with one
//! JSON line (`{"ok":true}`, the stats, or `{"error":"..."}`):
//!
//! ```text
//! push N FAULT      apply FAULT to each of the next N PutRecords requests
//! sometimes P FAULT apply FAULT with probability P (0 to 1) to a PutRecords request with no
//!                   queued fault; such rules are rolled in the order given, the first hit applies
//! always FAULT      apply FAULT to every PutRecords request no queued or `sometimes` fault hit
//!                   (replaces the previous one)
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
//! FAULT is `status 500`, `throttle_request`, `partial_throttle 0.5`,
//! `partial_internal_failure 0.5` (fractions of the entries), `reset` or `delay_ms 1500`.
//! entries_throttled counts the entries over the shard limit as well. user_records_forwarded
//! counts the user records (those of a KPL aggregate, else 1 per entry) of the entries kinesalite
//! accepted. in_flight_put_entries and in_flight_user_records are gauges: the PutRecords entries,
//! and the user records in them, of the requests received and not answered yet (delayed ones and
//! those waiting for kinesalite included; a request counts until the proxy is done with it, even
//! if its client gave up). access_keys counts the requests per access key id that signed them
//! (the SigV4 Authorization header's Credential; "(unsigned)" without one), then per operation.
//! The shard limit is explained in tests/support/fault_proxy.rs (`ProxyHandle::shard_limit`).
//! The proxy exits when stdin closes.
//!
//! `cargo run -p kinesis_core --example kinesis_fault_proxy -- http://127.0.0.1:4567`

#[allow(dead_code)]
#[path = "../tests/support/fault_proxy.rs"]
mod fault_proxy;

use std::io::{BufRead, Write};
use std::time::Duration;

use fault_proxy::{Entries, Fault, FaultProxy, ProxyHandle};
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

fn command(proxy: &ProxyHandle, line: &str) -> Result<Value, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let ok = json!({"ok": true});
    match words.as_slice() {
        ["push", n, fault @ ..] => {
            let n: usize = n
                .parse()
                .map_err(|_| format!("push: {n:?} is not a count"))?;
            proxy.push_n(n, parse_fault(fault)?);
            Ok(ok)
        }
        ["sometimes", p, fault @ ..] => {
            let p: f64 = p
                .parse()
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| format!("sometimes: {p:?} is not a probability (0 to 1)"))?;
            proxy.sometimes(p, parse_fault(fault)?);
            Ok(ok)
        }
        ["always", fault @ ..] => {
            proxy.always(parse_fault(fault)?);
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
    let upstream = match std::env::args().nth(1) {
        Some(url) => url,
        None => {
            eprintln!("usage: kinesis_fault_proxy UPSTREAM_URL (e.g. http://127.0.0.1:4567)");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The proxy's tasks run on the runtime's workers; this thread only reads commands.
    let proxy = runtime.block_on(FaultProxy::start(&upstream));
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
        let answer = command(&handle, &line).unwrap_or_else(|e| json!({"error": e}));
        if writeln!(out, "{answer}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    // stdin closed: stop at once, abandoning requests still in flight (delayed ones included).
    drop(proxy);
    runtime.shutdown_background();
}
