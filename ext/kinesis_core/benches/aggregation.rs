//! Aggregation throughput against MD5 alone over the same bytes.
//!
//! `cargo bench -p kinesis_core --bench aggregation` prints, per record size and key mode, how
//! fast `AggregateBuilder` turns user records into finished 1 MiB aggregates (`finish()`
//! included: it computes the MD5 trailer), how fast MD5 alone digests the same payload in 1 MiB
//! pieces, and the ratio of the two (goal: ≥ 0.5). If Python's `aws_kinesis_agg` is installed it
//! also times the same workload, scaled down, through its `RecordAggregator`.
//!
//! Environment: `BENCH_MIB` (payload per run, default 64), `BENCH_RUNS` (best of, default 3),
//! `PYTHON` (default `python3`).

use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kinesis_core::kpl::{self, AggregateBuilder, DEFAULT_MAX_RECORD_BYTES};
use kinesis_core::md5x;
use md5::{Digest, Md5};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

#[derive(Clone, Copy)]
enum Keys {
    /// A random 32-hex-digit key for each aggregate (the plugin's default without
    /// `fixed_partition_key`); the aggregate is sent with that key.
    OnePerAggregate,
    /// A distinct random key for every record: the key table grows with every add.
    PerRecord,
}

impl Keys {
    fn label(self) -> &'static str {
        match self {
            Keys::OnePerAggregate => "one per aggregate",
            Keys::PerRecord => "distinct per record",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Keys::OnePerAggregate => "aggregate",
            Keys::PerRecord => "record",
        }
    }
}

fn hex_keys(rng: &mut StdRng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| format!("{:032x}", rng.gen::<u128>()))
        .collect()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Workload {
    record_bytes: usize,
    keys: Keys,
    payload: Vec<u8>,
    record_keys: Vec<String>,
}

impl Workload {
    fn new(record_bytes: usize, keys: Keys, total_bytes: usize, rng: &mut StdRng) -> Self {
        let count = total_bytes / record_bytes;
        let mut payload = vec![0u8; count * record_bytes];
        rng.fill_bytes(&mut payload);
        let record_keys = match keys {
            // Far more than the number of aggregates.
            Keys::OnePerAggregate => hex_keys(rng, 4096),
            Keys::PerRecord => hex_keys(rng, count),
        };
        Workload {
            record_bytes,
            keys,
            payload,
            record_keys,
        }
    }

    fn count(&self) -> usize {
        self.payload.len() / self.record_bytes
    }

    /// Aggregates every record into full 1 MiB aggregates; returns (aggregates, bytes out).
    fn aggregate(&self) -> (usize, usize) {
        let outer = match self.keys {
            Keys::OnePerAggregate => 32,
            Keys::PerRecord => 1,
        };
        let mut builder = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, outer);
        let (mut aggregates, mut bytes_out) = (0, 0);
        for (i, data) in self.payload.chunks_exact(self.record_bytes).enumerate() {
            let key = |aggregates: usize| match self.keys {
                Keys::OnePerAggregate => &self.record_keys[aggregates % self.record_keys.len()],
                Keys::PerRecord => &self.record_keys[i],
            };
            if !builder.try_add(key(aggregates), None, data) {
                let finished = black_box(builder.finish());
                bytes_out += finished.len();
                aggregates += 1;
                assert!(builder.try_add(key(aggregates), None, data));
            }
        }
        let finished = black_box(builder.finish());
        (aggregates + 1, bytes_out + finished.len())
    }

    /// MD5 of the same payload in 1 MiB pieces.
    fn md5_only(&self) {
        for piece in self.payload.chunks(DEFAULT_MAX_RECORD_BYTES) {
            black_box(Md5::digest(black_box(piece)));
        }
    }
}

/// The digests of a chunk's aggregates (1 MiB each): the `md-5` crate, AWS-LC one at a time (the
/// path for a lone aggregate), and `md5_many`'s lanes (a chunk's aggregates together).
fn md5_paths(total: usize, runs: usize, rng: &mut StdRng) {
    let mut payload = vec![0u8; total];
    rng.fill_bytes(&mut payload);
    let pieces: Vec<&[u8]> = payload.chunks(DEFAULT_MAX_RECORD_BYTES).collect();
    let mb = |d: Duration| per_second(total, d) / 1e6;
    let portable = best_of(runs, || {
        for p in &pieces {
            black_box(Md5::digest(black_box(p)));
        }
    });
    let one = best_of(runs, || {
        for p in &pieces {
            black_box(kpl::md5(black_box(p)));
        }
    });
    let lanes = best_of(runs, || {
        for group in pieces.chunks(md5x::LANES) {
            black_box(md5x::md5_many(black_box(group)));
        }
    });
    println!(
        "md5 of 1 MiB aggregates, MB/s: md-5 crate {:.0}, AWS-LC one at a time {:.0}, md5_many in groups of {} {:.0} ({:.2}x)",
        mb(portable),
        mb(one),
        md5x::LANES,
        mb(lanes),
        one.as_secs_f64() / lanes.as_secs_f64()
    );
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap()
}

fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Times Python's RecordAggregator on the same kind of workload; None if it cannot run.
fn python_records_per_second(
    record_bytes: usize,
    keys: Keys,
    count: usize,
) -> Result<(f64, f64), String> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/compat/py_aggregate_bench.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .arg(&script)
        .args([
            "--records",
            &count.to_string(),
            "--size",
            &record_bytes.to_string(),
            "--keys",
            keys.arg(),
        ])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    // The script prints one line: `records_per_s <n> mb_per_s <n>`.
    let text = String::from_utf8_lossy(&output.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    match words[..] {
        ["records_per_s", r, "mb_per_s", m] => Ok((
            r.parse().map_err(|_| text.to_string())?,
            m.parse().map_err(|_| text.to_string())?,
        )),
        _ => Err(format!("unexpected output: {text}")),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let total = env_usize("BENCH_MIB", 64) * 1024 * 1024;
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let mut rng = StdRng::seed_from_u64(42);
    println!(
        "aggregation vs md5: {} MiB of random user data per run, best of {runs}, full 1 MiB aggregates (finish() included); MB = 10^6 bytes of user data",
        total / (1024 * 1024)
    );
    println!(
        "{:>7}  {:<20} {:>12} {:>9} {:>9} {:>7} {:>10}",
        "record", "keys", "records/s", "agg MB/s", "md5 MB/s", "ratio", "aggregates"
    );
    md5_paths(total, runs, &mut rng);
    let mut python_rows = Vec::new();
    for record_bytes in [100, 1024] {
        for keys in [Keys::OnePerAggregate, Keys::PerRecord] {
            let workload = Workload::new(record_bytes, keys, total, &mut rng);
            let count = workload.count();
            let (aggregates, bytes_out) = workload.aggregate();
            assert!(bytes_out >= workload.payload.len());
            let aggregation = best_of(runs, || {
                black_box(workload.aggregate());
            });
            let md5 = best_of(runs, || workload.md5_only());
            let agg_mb = per_second(workload.payload.len(), aggregation) / 1e6;
            let md5_mb = per_second(workload.payload.len(), md5) / 1e6;
            println!(
                "{:>5} B  {:<20} {:>12.0} {:>9.1} {:>9.1} {:>7.3} {:>10}",
                record_bytes,
                keys.label(),
                per_second(count, aggregation),
                agg_mb,
                md5_mb,
                agg_mb / md5_mb,
                aggregates
            );
            python_rows.push((record_bytes, keys, count));
        }
    }

    println!("python aws_kinesis_agg RecordAggregator (same workload, 1/16 of the records):");
    for (record_bytes, keys, count) in python_rows {
        match python_records_per_second(record_bytes, keys, (count / 16).max(1)) {
            Ok((records, mb)) => {
                println!(
                    "{:>5} B  {:<20} {:>12.0} {:>9.1}",
                    record_bytes,
                    keys.label(),
                    records,
                    mb
                )
            }
            Err(why) => {
                println!("python: skipped ({why})");
                break;
            }
        }
    }
}
