//! Producer benchmark against a local Kinesis (kinesalite on 127.0.0.1, started here): prints
//! user records/s, PutRecords calls and how full they were, PUT payload units against the
//! minimum, and this process's CPU time per user record (the server's CPU is not counted).
//!
//! `cargo bench -p kinesis_core --bench producer` (needs `npm ci --prefix test/support`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kinesis_core::batch::RecordBatch;
use kinesis_core::cancel::CancelToken;
use kinesis_core::config::{Credentials, KeyMode, ProducerConfig};
use kinesis_core::metrics::{Granularity, Level, Metrics, MetricsConfig};
use kinesis_core::producer::Producer;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc_rusage = unsafe { std::mem::zeroed() };
    unsafe { getrusage(0, &mut u) };
    let tv = |t: Timeval| t.sec as f64 + t.usec as f64 / 1e6;
    tv(u.utime) + tv(u.stime)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
struct libc_rusage {
    utime: Timeval,
    stime: Timeval,
    rest: [i64; 14],
}

extern "C" {
    fn getrusage(who: i32, usage: *mut libc_rusage) -> i32;
}

fn apache_line(i: usize) -> String {
    format!(
        "{{\"host\":\"192.168.{}.{}\",\"user\":\"-\",\"method\":\"GET\",\"path\":\"/item/{i}\",\"code\":\"200\",\"size\":\"{}\",\"referer\":\"-\",\"agent\":\"Mozilla/5.0 (X11; Linux x86_64)\"}}\n",
        i % 256,
        (i / 256) % 256,
        1000 + i % 5000
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let k = support::Kinesalite::start();
    let shards = 4;
    let modes = [
        (
            "random key per aggregate",
            KeyMode::RandomPerAggregate,
            None,
        ),
        (
            "partition_key per record (200 keys)",
            KeyMode::PerRecord,
            Some(200),
        ),
    ];
    // Each mode without metrics, then with the KPL metrics at their most detailed (recorded,
    // not uploaded: what the write path pays).
    for (label, mode, keys, metrics) in modes
        .iter()
        .flat_map(|(l, m, k)| [(l, m.clone(), *k, false), (l, m.clone(), *k, true)])
    {
        let n = 200_000;
        let mut batch = RecordBatch::default();
        for i in 0..n {
            let key = keys.map(|k| format!("10.0.{}.{}", i % k / 256, i % k % 256));
            batch.push(apache_line(i).as_bytes(), key.as_deref(), None);
        }
        let payload = batch.data_bytes();
        let cfg = ProducerConfig {
            region: Some("us-east-1".into()),
            endpoint: Some(k.endpoint()),
            credentials: Credentials::Static {
                access_key_id: "AKIDBENCH".into(),
                secret_access_key: "x".into(),
                session_token: None,
            },
            key_mode: mode,
            rate_limit_percent: 0,
            ..ProducerConfig::default()
        };
        let (o, wall, cpu) = rt.block_on(async {
            let stream = support::unique_stream_name("bench");
            support::create_stream(&support::client(&k.endpoint()).await, &stream, shards).await;
            let mut producer = Producer::new(cfg).await.unwrap();
            if metrics {
                producer = producer.with_metrics(Arc::new(Metrics::new(
                    MetricsConfig {
                        level: Level::Detailed,
                        granularity: Granularity::Shard,
                        ..MetricsConfig::default()
                    },
                    None,
                )));
            }
            producer.check_stream(&stream).await.unwrap();
            let idx: Vec<u32> = (0..n as u32).collect();
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let o = producer
                .put(&stream, &batch, &idx, &CancelToken::new(), &|_| {})
                .await;
            (o, t0.elapsed(), cpu_seconds() - cpu0)
        });
        assert!(o.all_delivered(), "{:?}", o.failures);
        let c = &o.counters;
        let min_units = payload.div_ceil(25 * 1024);
        println!(
            "== {label}{}: {n} user records, {:.1} MB payload, {shards} shards",
            if metrics {
                ", metrics detailed per shard"
            } else {
                ""
            },
            payload as f64 / 1e6
        );
        println!(
            "  user records/s           {:>12.0}   (wall {:.2} s, bounded by the local server)",
            n as f64 / wall.as_secs_f64(),
            wall.as_secs_f64()
        );
        println!(
            "  PutRecords calls         {:>12}   Kinesis records {}   aggregates {}",
            c.requests, c.kinesis_records, c.aggregates
        );
        println!(
            "  entries per call         {:>12.1}   of 500",
            c.kinesis_records as f64 / c.requests as f64
        );
        println!(
            "  bytes per call           {:>12.0}   {:.1}% of 5 MiB",
            c.bytes_delivered as f64 / c.requests as f64,
            100.0 * c.bytes_delivered as f64 / c.requests as f64 / (5.0 * 1024.0 * 1024.0)
        );
        println!(
            "  PUT payload units        {:>12}   minimum {} ({:.3}x)",
            c.put_payload_units,
            min_units,
            c.put_payload_units as f64 / min_units as f64
        );
        println!(
            "  producer CPU per record  {:>12.3} µs (total {:.2} s CPU)",
            cpu / n as f64 * 1e6,
            cpu
        );
        let _ = Duration::ZERO;
    }
}
