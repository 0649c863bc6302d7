//! CPU per record of the write path: fluentd chunk → JSON user records → KPL aggregates.
//!
//! `cargo bench -p kinesis_core --bench write_path` builds a chunk of Apache access log events
//! as fluentd's apache2 parser and file buffer leave them (MessagePack `[EventTime, record]`
//! pairs), formats it with the default JSON spec (`format_chunk`), then plans the records into
//! aggregates the way the producer does with random per-aggregate keys (`batch::plan`,
//! `finish()` and its MD5 included). It prints µs per record for format, aggregation and both,
//! best of `BENCH_RUNS` (default 5), for the default spec and for one with inject
//! (hostname, tag, time string). Times are this thread's CPU time (Linux), so other processes
//! on a busy machine disturb them less than they would wall time.
//!
//! It also prints a digest of every output byte (formatted records, and aggregates planned
//! with a fixed key so they are reproducible): a change to the code that alters any output
//! byte changes the digest.
//!
//! Environment: `BENCH_RECORDS` (events per chunk, default 100000), `BENCH_RUNS`.

use std::hash::{DefaultHasher, Hasher};
use std::hint::black_box;
use std::time::Duration;

use kinesis_core::batch::{plan, PlanLimits};
use kinesis_core::chunk::{
    format_chunk, ruby_time_format, Compression, DataFormat, FormatSpec, FormattedChunk, Inject,
    InvalidUtf8, TimeType, TimeZoneSpec,
};
use kinesis_core::config::KeyMode;
use kinesis_core::kpl::DEFAULT_MAX_RECORD_BYTES;
use kinesis_core::msgpack_write::{self, pack_uint};
use kinesis_core::shard_map::ShardMap;

const HOSTS: [&str; 7] = [
    "203.0.113.7",
    "198.51.100.23",
    "192.0.2.45",
    "203.0.113.99",
    "198.51.100.4",
    "192.0.2.200",
    "10.1.7.31",
];
const USERS: [&str; 5] = ["-", "-", "-", "alice", "bob"];
const PATHS: [&str; 6] = [
    "/",
    "/index.html",
    "/products/42",
    "/cart/checkout",
    "/api/v1/items?page=",
    "/static/app.js",
];
const CODES: [u64; 6] = [200, 200, 200, 304, 404, 500];
const REFERERS: [&str; 3] = [
    "https://www.example.com/",
    "-",
    "https://www.example.com/products?sort=price",
];
const AGENTS: [&str; 3] = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "curl/8.5.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 Safari/605.1.15",
];
/// 2026-11-25T10:00:00Z, test/support/apache_log.rb's START.
const START: u32 = 1_795_600_800;

fn pack_str(out: &mut Vec<u8>, s: &str) {
    msgpack_write::pack_str(out, s.as_bytes());
}

fn pack_nullable(out: &mut Vec<u8>, s: &str) {
    if s == "-" {
        out.push(0xc0);
    } else {
        pack_str(out, s);
    }
}

/// Event `i` as fluentd's apache2 parser leaves it: "-" becomes nil, code and size integers.
fn apache_event(out: &mut Vec<u8>, i: usize) {
    out.extend_from_slice(&[0x92, 0xd7, 0x00]);
    out.extend_from_slice(&(START + (i / 1000) as u32).to_be_bytes());
    out.extend_from_slice(&((i % 1000) as u32 * 1_000_000).to_be_bytes());
    out.push(0x88);
    pack_str(out, "host");
    pack_str(out, HOSTS[i % HOSTS.len()]);
    pack_str(out, "user");
    pack_nullable(out, USERS[i % USERS.len()]);
    pack_str(out, "method");
    pack_str(out, "GET");
    pack_str(out, "path");
    pack_str(out, &format!("{}#{i}", PATHS[i % PATHS.len()]));
    pack_str(out, "code");
    pack_uint(out, CODES[i % CODES.len()]);
    pack_str(out, "size");
    pack_uint(out, 200 + (i as u64 * 37) % 50_000);
    pack_str(out, "referer");
    pack_nullable(out, REFERERS[i % REFERERS.len()]);
    pack_str(out, "agent");
    pack_str(out, AGENTS[i % AGENTS.len()]);
}

fn default_spec() -> FormatSpec {
    FormatSpec {
        format: DataFormat::Json { add_newline: true },
        data_key: None,
        chomp_record: false,
        append_newline: false,
        compression: Compression::None,
        inject: Inject::default(),
        partition_key_field: None,
        explicit_hash_key_field: None,
        max_data_bytes: DEFAULT_MAX_RECORD_BYTES,
        invalid_utf8: InvalidUtf8::Replace,
    }
}

fn inject_spec() -> FormatSpec {
    let mut s = default_spec();
    s.inject = Inject {
        hostname: Some(("hostname".into(), "ip-10-0-1-17.ec2.internal".into())),
        worker_id: None,
        tag_key: Some("tag".into()),
        time: Some((
            "time".into(),
            TimeType::String {
                items: ruby_time_format("%Y-%m-%dT%H:%M:%S.%N%z").unwrap(),
                zone: TimeZoneSpec::Utc,
            },
        )),
    };
    s
}

const TAG: &str = "apache.access";

fn format(spec: &FormatSpec, chunk: &[u8]) -> FormattedChunk {
    format_chunk(spec, chunk, Some(TAG), &|_| false).expect("the fast path formats the chunk")
}

fn limits() -> PlanLimits {
    PlanLimits {
        max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        aggregation_max_bytes: DEFAULT_MAX_RECORD_BYTES,
        ordered: false,
        aggregate: true,
    }
}

/// Aggregates the formatted records as the producer does; returns the aggregates' bytes.
fn aggregate(f: &FormattedChunk, mode: &KeyMode, map: &ShardMap) -> (usize, usize) {
    let indexes: Vec<u32> = (0..f.batch.len() as u32).collect();
    let (records, refused) = plan(&f.batch, &indexes, mode, map, &limits());
    assert!(refused.is_empty());
    (records.len(), records.iter().map(|r| r.data.len()).sum())
}

/// Digest of every output byte, with aggregates planned under a fixed key.
fn output_digest(spec: &FormatSpec, chunk: &[u8], map: &ShardMap) -> (u64, u64) {
    let f = format(spec, chunk);
    let mut h = DefaultHasher::new();
    for i in 0..f.batch.len() {
        h.write(f.batch.data(i));
    }
    let formatted = h.finish();
    let indexes: Vec<u32> = (0..f.batch.len() as u32).collect();
    let mode = KeyMode::Fixed("fixed-key".into());
    let (records, _) = plan(&f.batch, &indexes, &mode, map, &limits());
    let mut h = DefaultHasher::new();
    for r in &records {
        h.write(&r.data);
    }
    (formatted, h.finish())
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime only writes into the struct we pass.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(t.sec as u64, t.nsec as u32)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn us_per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("BENCH_RECORDS", 100_000);
    let runs = env_usize("BENCH_RUNS", 5).max(1);
    let mut chunk = Vec::with_capacity(n * 200);
    for i in 0..n {
        apache_event(&mut chunk, i);
    }
    let map = ShardMap::whole("shardId-000000000000");
    println!(
        "write path: {n} Apache log events ({} bytes of chunk), best of {runs}, CPU µs per record",
        chunk.len()
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>10} {:>10}  output digest",
        "spec", "format", "aggregate", "total", "JSON B/rec", "aggregates"
    );
    for (label, spec) in [("default", default_spec()), ("inject", inject_spec())] {
        let (mut fmt, mut agg, mut total) = (Duration::MAX, Duration::MAX, Duration::MAX);
        let mut shape = (0, 0, 0);
        for _ in 0..runs {
            let t0 = thread_cpu();
            let f = black_box(format(&spec, black_box(&chunk)));
            let t1 = thread_cpu();
            let (aggregates, bytes) = black_box(aggregate(&f, &KeyMode::RandomPerAggregate, &map));
            let t2 = thread_cpu();
            fmt = fmt.min(t1 - t0);
            agg = agg.min(t2 - t1);
            total = total.min(t2 - t0);
            assert_eq!(f.batch.len(), n);
            shape = (f.batch.data_bytes() / n, aggregates, bytes);
            drop(f);
        }
        let (formatted, aggregated) = output_digest(&spec, &chunk, &map);
        println!(
            "{label:<10} {:>9.3} {:>9.3} {:>9.3} {:>10} {:>10}  {formatted:016x} {aggregated:016x}",
            us_per(fmt, n),
            us_per(agg, n),
            us_per(total, n),
            shape.0,
            shape.1,
        );
    }
}
