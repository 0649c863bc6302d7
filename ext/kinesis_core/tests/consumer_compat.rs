//! Compatibility with the real consumer libraries: Python `aws_kinesis_agg` 1.2.3 and Node
//! `aws-kinesis-agg` 4.2.8, driven through `test/compat/{py_consumer.py,node_consumer.js}`
//! (JSON over stdin/stdout, data as base64).
//!
//! Forward: aggregates built by `AggregateBuilder` must come back from each library's
//! deaggregator byte-for-byte, in order, with the right keys. Reverse: aggregates built by each
//! library's own aggregator must come back from our `deaggregate` the same way.
//!
//! Missing libraries fail the tests with the command that installs them:
//! `pip install -r test/support/requirements.txt` (interpreter: `$PYTHON`, else `python3`) and
//! `npm ci --prefix test/support` (`node` on PATH).
//!
//! Known library bugs the assertions allow for, and why:
//! - Both libraries, deaggregating a batch where some records have an explicit hash key and some
//!   don't, report `explicit_hash_key_table[0]` for the records without one (they read the unset
//!   protobuf index as its default, 0). The data and partition keys are right; for those records
//!   we only check that the reported key is that table entry or nothing.
//! - Node's aggregator keeps its key tables in plain objects and emits them with `Object.keys`,
//!   which lists array-index-like keys ("0" to "4294967294") first, in numeric order, while the
//!   records keep their insertion-order indexes: such partition keys and explicit hash keys come
//!   out swapped. The reverse Node test leaves them out; `node_aggregator_reorders_integer_like_keys`
//!   shows the bug and that our decoder reads such a blob exactly as Node's own decoder does.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use kinesis_core::kpl::{
    deaggregate, AggregateBuilder, Deaggregated, UserRecord, DEFAULT_MAX_RECORD_BYTES, MAGIC,
};
use md5::{Digest, Md5};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The partition key our aggregates are sent with (as the KPL does).
const OUTER_KEY: &str = "a";

fn repo_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// One consumer library, reached through its script.
struct Library {
    name: &'static str,
    program: String,
    script: &'static str,
    version: &'static str,
    /// What to run in the repository root to install the library.
    install: String,
}

fn python() -> Library {
    let program = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    Library {
        name: "Python aws_kinesis_agg",
        script: "test/compat/py_consumer.py",
        version: "1.2.3",
        install: format!(
            "`pip install -r test/support/requirements.txt` (for the interpreter the tests use, \
             `{program} -m pip install -r test/support/requirements.txt`; set PYTHON to pick another)"
        ),
        program,
    }
}

fn node() -> Library {
    Library {
        name: "Node aws-kinesis-agg",
        program: "node".into(),
        script: "test/compat/node_consumer.js",
        version: "4.2.8",
        install: "`npm ci --prefix test/support`".into(),
    }
}

impl Library {
    /// Runs the jobs through the script; one result per job.
    fn run(&self, jobs: Vec<Value>) -> Vec<Value> {
        let root = repo_root();
        let mut child = Command::new(&self.program)
            .arg(root.join(self.script))
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{}` for the {} tests ({e}): install it, then run {} in {}",
                    self.program,
                    self.name,
                    self.install,
                    root.display()
                )
            });
        let request = serde_json::to_vec(&json!({ "jobs": jobs })).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Written from another thread, so that neither process blocks on a full pipe while the
        // other waits for it; a script that exits early (library missing) just breaks the pipe.
        let writer = std::thread::spawn(move || stdin.write_all(&request));
        let output = child.wait_with_output().expect("script output");
        let write_result = writer.join().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() == Some(3) {
            panic!(
                "{} {} is not installed: run {} in {}\n{stderr}",
                self.name,
                self.version,
                self.install,
                root.display()
            );
        }
        assert!(
            output.status.success(),
            "{} failed ({}):\n{stderr}",
            self.script,
            output.status
        );
        write_result.expect("writing the request");
        let response: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{} printed no JSON ({e}):\n{stderr}", self.script));
        let found = response["version"].as_str().unwrap_or("unknown");
        assert_eq!(
            found, self.version,
            "{} {found} is installed but the tests pin {}: run {}",
            self.name, self.version, self.install
        );
        response["results"].as_array().expect("results").clone()
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Rec {
    pk: String,
    ehk: Option<u128>,
    data: Vec<u8>,
}

impl Rec {
    fn user_record(&self) -> UserRecord {
        UserRecord {
            partition_key: self.pk.clone(),
            explicit_hash_key: self.ehk.map(|h| h.to_string()),
            data: self.data.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "partition_key": self.pk,
            "explicit_hash_key": self.ehk.map(|h| h.to_string()),
            "data": BASE64.encode(&self.data),
        })
    }
}

/// A named set of user records, aggregated under `max_bytes`.
struct Case {
    name: String,
    records: Vec<Rec>,
    max_bytes: usize,
}

/// One aggregate of ours and the records in it.
struct Aggregate {
    case: usize,
    bytes: Vec<u8>,
    records: Vec<Rec>,
}

#[derive(Clone, Copy, Debug)]
enum KeyMode {
    One,
    Pool,
    Distinct,
    Multibyte,
    Long256,
    IntegerLike,
}

#[derive(Clone, Copy, Debug)]
enum HashKeyMode {
    None,
    All,
    Mixed,
}

#[derive(Clone, Copy, Debug)]
enum DataMode {
    Empty,
    Text,
    Binary,
    AllBytes,
    Large,
}

const MULTIBYTE: &[char] = &[
    'a', 'Z', '9', '-', 'é', 'ß', 'ж', '日', '本', '語', '🎉', '𝄞', ' ', '"', '\\',
];

fn random_string(rng: &mut StdRng, chars: usize) -> String {
    (0..chars)
        .map(|_| MULTIBYTE[rng.gen_range(0..MULTIBYTE.len())])
        .collect()
}

fn partition_key(rng: &mut StdRng, mode: KeyMode, pool: &[String]) -> String {
    match mode {
        KeyMode::One => pool[0].clone(),
        KeyMode::Pool => pool[rng.gen_range(0..pool.len())].clone(),
        KeyMode::Distinct => format!("{:032x}", rng.gen::<u128>()),
        KeyMode::Multibyte => {
            let n = rng.gen_range(1..=40);
            random_string(rng, n)
        }
        KeyMode::Long256 => random_string(rng, 256),
        KeyMode::IntegerLike => rng.gen_range(0..1000u32).to_string(),
    }
}

/// A random hash key; with `small`, sometimes a one-digit one.
fn hash_key(rng: &mut StdRng, small: bool) -> u128 {
    match rng.gen_range(0..4) {
        0 if small => rng.gen_range(0..10),
        1 => u128::MAX - rng.gen_range(0..3),
        _ => rng.gen(),
    }
}

fn data(rng: &mut StdRng, mode: DataMode) -> Vec<u8> {
    match mode {
        DataMode::Empty => Vec::new(),
        DataMode::Text => {
            let n = rng.gen_range(0..300);
            format!(
                "{{\"message\":\"{}\",\"n\":{}}}\n",
                random_string(rng, n),
                rng.gen::<u32>()
            )
            .into_bytes()
        }
        DataMode::Binary => {
            let n = rng.gen_range(0..2000);
            (0..n).map(|_| rng.gen()).collect()
        }
        DataMode::AllBytes => (0..=255u8).collect(),
        DataMode::Large => {
            let n = rng.gen_range(10_000..100_000);
            (0..n).map(|_| rng.gen()).collect()
        }
    }
}

fn random_case(rng: &mut StdRng, i: usize) -> Case {
    let keys = [
        KeyMode::One,
        KeyMode::Pool,
        KeyMode::Distinct,
        KeyMode::Multibyte,
        KeyMode::Long256,
        KeyMode::IntegerLike,
    ];
    let hash_keys = [HashKeyMode::None, HashKeyMode::All, HashKeyMode::Mixed];
    let datas = [
        DataMode::Empty,
        DataMode::Text,
        DataMode::Binary,
        DataMode::AllBytes,
        DataMode::Large,
    ];
    let key_mode = keys[rng.gen_range(0..keys.len())];
    let hash_key_mode = hash_keys[rng.gen_range(0..hash_keys.len())];
    let small_hash_keys = rng.gen_bool(0.3);
    let pool: Vec<String> = (0..5)
        .map(|_| partition_key(rng, KeyMode::Multibyte, &[]))
        .collect();
    let count = rng.gen_range(1..200);
    let records: Vec<Rec> = (0..count)
        .map(|_| {
            // Mostly one kind of data per set, with some of every kind mixed in.
            let data_mode = if rng.gen_bool(0.8) {
                datas[i % datas.len()]
            } else {
                datas[rng.gen_range(0..datas.len())]
            };
            let data_mode = if matches!(data_mode, DataMode::Large) && rng.gen_bool(0.9) {
                DataMode::Text
            } else {
                data_mode
            };
            let ehk = match hash_key_mode {
                HashKeyMode::None => None,
                HashKeyMode::All => Some(hash_key(rng, small_hash_keys)),
                HashKeyMode::Mixed => rng.gen_bool(0.5).then(|| hash_key(rng, small_hash_keys)),
            };
            Rec {
                pk: partition_key(rng, key_mode, &pool),
                ehk,
                data: data(rng, data_mode),
            }
        })
        .collect();
    // A quarter of the sets go into small aggregates, big enough for their largest record.
    let largest = records
        .iter()
        .map(|r: &Rec| r.pk.len() + r.data.len() + 100)
        .max()
        .unwrap();
    let max_bytes = if rng.gen_bool(0.25) {
        rng.gen_range(2_000..64_000).max(largest)
    } else {
        DEFAULT_MAX_RECORD_BYTES
    };
    Case {
        name: format!("random #{i} ({key_mode:?} keys, {hash_key_mode:?} hash keys)"),
        records,
        max_bytes,
    }
}

/// The edge cases, then 40 random sets from a fixed seed.
fn cases() -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(0x4b50_4c5f_636f_6d70);
    let mut cases = Vec::new();
    let mut add = |name: &str, records: Vec<Rec>, max_bytes: usize| {
        cases.push(Case {
            name: name.to_string(),
            records,
            max_bytes,
        });
    };
    let rec = |pk: &str, ehk: Option<u128>, data: &[u8]| Rec {
        pk: pk.to_string(),
        ehk,
        data: data.to_vec(),
    };

    add(
        "one record",
        vec![rec("only", None, b"hello")],
        DEFAULT_MAX_RECORD_BYTES,
    );
    add(
        "empty data",
        (0..10)
            .map(|i| rec(&format!("k{}", i % 3), None, b""))
            .collect(),
        DEFAULT_MAX_RECORD_BYTES,
    );
    add(
        "multibyte keys",
        [
            "日本語",
            "ключ",
            "🎉🎉",
            "é",
            "a\u{0301}",
            "𝄞 clef",
            "日本語",
        ]
        .iter()
        .map(|k| rec(k, None, k.as_bytes()))
        .collect(),
        DEFAULT_MAX_RECORD_BYTES,
    );
    add(
        "256-character keys",
        vec![
            rec(&"x".repeat(256), None, b"ascii"),
            rec(&"日".repeat(256), None, b"3-byte"),
            rec(&"🎉".repeat(256), Some(7), b"4-byte"),
            rec(&"x".repeat(256), None, b"again"),
        ],
        DEFAULT_MAX_RECORD_BYTES,
    );
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let mut binary = vec![
        rec("bin", None, &all_bytes),
        rec(
            "bin",
            None,
            &all_bytes.iter().rev().copied().collect::<Vec<_>>(),
        ),
    ];
    binary.extend((0..=255u8).map(|b| rec("byte", None, &[b])));
    add("binary bytes 0..255", binary, DEFAULT_MAX_RECORD_BYTES);
    add(
        "explicit hash keys on all",
        (0..20u128)
            .map(|i| rec(&format!("p{i}"), Some(i * (u128::MAX / 19)), &[i as u8; 3]))
            .collect(),
        DEFAULT_MAX_RECORD_BYTES,
    );
    add(
        "mixed explicit hash keys",
        vec![
            rec("pk0", None, b"first has none"),
            rec("pk1", Some(0), b"zero"),
            rec("pk2", None, b"none"),
            rec("pk3", Some(u128::MAX), b"max"),
            rec("pk1", Some(0), b"zero again"),
            rec("pk4", None, b""),
        ],
        DEFAULT_MAX_RECORD_BYTES,
    );
    // Records of 1 to 8 KiB until the builder refuses: one aggregate of (almost) 1 MiB.
    let mut big = Vec::new();
    let mut builder = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, OUTER_KEY.len());
    loop {
        let n = rng.gen_range(1_000..8_000);
        let r = Rec {
            pk: format!("big-{}", rng.gen_range(0..50)),
            ehk: None,
            data: (0..n).map(|_| rng.gen()).collect(),
        };
        if !builder.try_add(&r.pk, r.ehk, &r.data) {
            break;
        }
        big.push(r);
    }
    assert!(builder.size() > DEFAULT_MAX_RECORD_BYTES - 8_000);
    add("a 1 MiB aggregate", big, DEFAULT_MAX_RECORD_BYTES);
    add(
        "split at a small limit",
        (0..300)
            .map(|i| {
                rec(
                    &format!("s{}", i % 7),
                    (i % 2 == 0).then_some(i as u128),
                    &[b'z'; 100],
                )
            })
            .collect(),
        4_096,
    );
    for i in 0..40 {
        cases.push(random_case(&mut rng, i));
    }
    cases
}

/// Aggregates every case with our builder the way a producer does: add until refused, finish,
/// start the next aggregate with the refused record.
fn our_aggregates(cases: &[Case]) -> Vec<Aggregate> {
    let mut out = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let mut builder = AggregateBuilder::new(case.max_bytes, OUTER_KEY.len());
        let mut records = Vec::new();
        for r in &case.records {
            if !builder.try_add(&r.pk, r.ehk, &r.data) {
                out.push(Aggregate {
                    case: index,
                    bytes: builder.finish(),
                    records: std::mem::take(&mut records),
                });
                assert!(
                    builder.try_add(&r.pk, r.ehk, &r.data),
                    "{}: a record fits no aggregate",
                    case.name
                );
            }
            records.push(r.clone());
        }
        let size = builder.size();
        let bytes = builder.finish();
        assert_eq!(size, bytes.len() + OUTER_KEY.len());
        out.push(Aggregate {
            case: index,
            bytes,
            records,
        });
    }
    out
}

fn kinesis_record(partition_key: &str, data: &[u8], n: usize) -> Value {
    json!({
        "partition_key": partition_key,
        "data": BASE64.encode(data),
        "sequence_number": format!("49{n:054}"),
    })
}

fn decode_b64(v: &Value) -> Vec<u8> {
    BASE64
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64")
}

/// Forward direction: the library deaggregates our aggregates.
fn library_reads_our_aggregates(library: Library) {
    let cases = cases();
    let aggregates = our_aggregates(&cases);
    assert!(
        aggregates
            .iter()
            .any(|a| a.bytes.len() > DEFAULT_MAX_RECORD_BYTES - 8_000),
        "no ~1 MiB aggregate"
    );
    assert!(
        aggregates
            .iter()
            .filter(|a| cases[a.case].max_bytes < DEFAULT_MAX_RECORD_BYTES)
            .count()
            > cases.len() / 8
    );
    let input: Vec<Value> = aggregates
        .iter()
        .enumerate()
        .map(|(n, a)| kinesis_record(OUTER_KEY, &a.bytes, n))
        .collect();
    let results = library.run(vec![json!({ "op": "deaggregate", "records": input })]);
    let per_record = results[0]
        .as_array()
        .expect("one result per Kinesis record");
    assert_eq!(per_record.len(), aggregates.len());

    let mut checked = 0;
    for (n, (aggregate, result)) in aggregates.iter().zip(per_record).enumerate() {
        let case = &cases[aggregate.case].name;
        let at = format!(
            "{}: {case}, aggregate {n} ({} bytes)",
            library.name,
            aggregate.bytes.len()
        );
        assert!(result["error"].is_null(), "{at}: {}", result["error"]);
        let users = result["user_records"].as_array().unwrap();
        assert_eq!(
            users.len(),
            aggregate.records.len(),
            "{at}: user record count"
        );
        // The first explicit hash key in the aggregate's table (first seen, first entry).
        let table_first = aggregate
            .records
            .iter()
            .find_map(|r| r.ehk)
            .map(|h| h.to_string());
        for (i, (user, expected)) in users.iter().zip(&aggregate.records).enumerate() {
            let at = format!("{at}, user record {i}");
            assert_eq!(user["aggregated"], json!(true), "{at}");
            assert_eq!(user["sub_sequence_number"], json!(i), "{at}");
            assert_eq!(
                user["partition_key"].as_str(),
                Some(expected.pk.as_str()),
                "{at}"
            );
            assert!(
                decode_b64(&user["data"]) == expected.data,
                "{at}: data differs"
            );
            let got = user["explicit_hash_key"].as_str();
            match (expected.ehk, &table_first) {
                (Some(h), _) => assert_eq!(got, Some(h.to_string().as_str()), "{at}"),
                (None, None) => assert_eq!(got, None, "{at}"),
                // The mixed-batch library bug (see the top of this file): table entry 0 or nothing.
                (None, Some(first)) => {
                    assert!(
                        got.is_none() || got == Some(first.as_str()),
                        "{at}: explicit hash key {got:?}"
                    )
                }
            }
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        cases.iter().map(|c| c.records.len()).sum::<usize>()
    );
}

/// Reverse direction: our `deaggregate` reads the library's own aggregates.
fn we_read_library_aggregates(library: Library, cases: &[Case]) {
    let jobs: Vec<Value> = cases
        .iter()
        .map(|c| json!({ "op": "aggregate", "records": c.records.iter().map(Rec::to_json).collect::<Vec<_>>() }))
        .collect();
    let results = library.run(jobs);
    assert_eq!(results.len(), cases.len());
    for (case, result) in cases.iter().zip(&results) {
        let aggregates = result["aggregates"].as_array().expect("aggregates");
        assert!(
            !aggregates.is_empty(),
            "{}: {}: no aggregate",
            library.name,
            case.name
        );
        let mut decoded = Vec::new();
        for (n, aggregate) in aggregates.iter().enumerate() {
            let bytes = decode_b64(&aggregate["data"]);
            match deaggregate(&bytes) {
                Deaggregated::Aggregate(records) => {
                    assert!(
                        !records.is_empty(),
                        "{}: {}: aggregate {n} is empty",
                        library.name,
                        case.name
                    );
                    decoded.extend(records);
                }
                Deaggregated::PassThrough => {
                    panic!(
                        "{}: {}: aggregate {n} ({} bytes) read as a plain record",
                        library.name,
                        case.name,
                        bytes.len()
                    )
                }
            }
        }
        let expected: Vec<UserRecord> = case.records.iter().map(Rec::user_record).collect();
        assert_eq!(
            decoded.len(),
            expected.len(),
            "{}: {}",
            library.name,
            case.name
        );
        for (i, (got, want)) in decoded.iter().zip(&expected).enumerate() {
            assert!(
                got == want,
                "{}: {}: user record {i}: got {got:?}, want {want:?}",
                library.name,
                case.name
            );
        }
    }
}

/// Whether JavaScript lists `key` among an object's array-index keys (canonical u32 < 2^32-1).
fn array_index_like(key: &str) -> bool {
    key.parse::<u32>()
        .is_ok_and(|n| n != u32::MAX && n.to_string() == key)
}

#[test]
fn python_reads_our_aggregates() {
    library_reads_our_aggregates(python());
}

#[test]
fn node_reads_our_aggregates() {
    library_reads_our_aggregates(node());
}

#[test]
fn we_read_python_aggregates() {
    we_read_library_aggregates(python(), &cases());
}

#[test]
fn we_read_node_aggregates() {
    // Node's aggregator reorders array-index-like keys (see the top of this file).
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| {
            !c.records.iter().any(|r| {
                array_index_like(&r.pk) || r.ehk.is_some_and(|h| array_index_like(&h.to_string()))
            })
        })
        .collect();
    assert!(
        cases.len() > 25,
        "too few cases left for Node: {}",
        cases.len()
    );
    we_read_library_aggregates(node(), &cases);
}

/// Documents the Node aggregator bug behind the filter above, and shows that our decoder reads
/// such a blob exactly as Node's own decoder does (the blob is faithful to its tables).
#[test]
fn node_aggregator_reorders_integer_like_keys() {
    let records: Vec<Rec> = [("abc", 9u128), ("7", 5), ("3", 2), ("x", 5)]
        .iter()
        .map(|&(pk, h)| Rec {
            pk: pk.into(),
            ehk: Some(h),
            data: pk.as_bytes().to_vec(),
        })
        .collect();
    let node = node();
    let built = node.run(vec![json!({ "op": "aggregate", "records": records.iter().map(Rec::to_json).collect::<Vec<_>>() })]);
    let blob = decode_b64(&built[0]["aggregates"][0]["data"]);
    let ours = match deaggregate(&blob) {
        Deaggregated::Aggregate(records) => records,
        Deaggregated::PassThrough => panic!("Node's aggregate read as a plain record"),
    };
    let theirs = node.run(vec![
        json!({ "op": "deaggregate", "records": [kinesis_record("abc", &blob, 0)] }),
    ]);
    let theirs = theirs[0][0]["user_records"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(Some(o.partition_key.as_str()), t["partition_key"].as_str());
        assert_eq!(
            o.explicit_hash_key.as_deref(),
            t["explicit_hash_key"].as_str()
        );
        assert_eq!(o.data, decode_b64(&t["data"]));
    }
    let keys: Vec<(&str, Option<&str>)> = ours
        .iter()
        .map(|r| (r.partition_key.as_str(), r.explicit_hash_key.as_deref()))
        .collect();
    // Input was (abc, 9) (7, 5) (3, 2) (x, 5): the tables came out as ["3", "7", "abc", "x"] and
    // ["2", "5", "9"] while the indexes kept insertion order.
    assert_eq!(
        keys,
        vec![("3", Some("2")), ("7", Some("5")), ("abc", Some("9")), ("x", Some("5"))],
        "aws-kinesis-agg {} no longer reorders array-index-like keys: drop the filter in we_read_node_aggregates",
        node.version
    );
}

/// What each reader makes of records that are not valid aggregates.
struct PassThroughInputs {
    plain: Vec<u8>,
    bad_digest: Vec<u8>,
    unreadable_body: Vec<u8>,
    empty_aggregate: Vec<u8>,
    binary: Vec<u8>,
}

fn pass_through_inputs() -> PassThroughInputs {
    let mut builder = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, 1);
    assert!(builder.try_add("k", None, b"payload"));
    let mut bad_digest = builder.finish();
    *bad_digest.last_mut().unwrap() ^= 1;
    // Field 1 with wire type 7, which does not exist; the digest is right.
    let garbage = [0x0fu8];
    let unreadable_body = [&MAGIC[..], &garbage, &Md5::digest(garbage)[..]].concat();
    // What an empty builder would encode (the producer never sends one): magic, empty body, digest.
    let empty_aggregate = [&MAGIC[..], &Md5::digest([])[..]].concat();
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    let inputs = PassThroughInputs {
        plain: b"{\"message\":\"just a log line\"}".to_vec(),
        bad_digest,
        unreadable_body,
        empty_aggregate,
        binary,
    };
    // Our reader (the KCL's rules): every one is a plain record except the empty aggregate.
    for data in [
        &inputs.plain,
        &inputs.bad_digest,
        &inputs.unreadable_body,
        &inputs.binary,
    ] {
        assert_eq!(deaggregate(data), Deaggregated::PassThrough);
    }
    assert_eq!(
        deaggregate(&inputs.empty_aggregate),
        Deaggregated::Aggregate(vec![])
    );
    inputs
}

fn run_pass_through(library: &Library, inputs: &PassThroughInputs) -> Vec<Value> {
    let records: Vec<Value> = [
        &inputs.plain,
        &inputs.bad_digest,
        &inputs.unreadable_body,
        &inputs.empty_aggregate,
        &inputs.binary,
    ]
    .iter()
    .enumerate()
    .map(|(n, data)| kinesis_record("outer-key", data, n))
    .collect();
    let results = library.run(vec![json!({ "op": "deaggregate", "records": records })]);
    results[0].as_array().unwrap().clone()
}

fn assert_passed_through(result: &Value, data: &[u8], what: &str) {
    assert!(result["error"].is_null(), "{what}: {}", result["error"]);
    let users = result["user_records"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{what}");
    assert_eq!(users[0]["aggregated"], json!(false), "{what}");
    assert_eq!(users[0]["partition_key"], json!("outer-key"), "{what}");
    assert!(
        decode_b64(&users[0]["data"]) == data,
        "{what}: data changed"
    );
}

/// Python agrees with the KCL on bad digests and unreadable bodies (plain records), but also
/// passes a 20-byte empty aggregate through as a plain record, where our reader sees zero user
/// records: a producer must never send an empty aggregate.
#[test]
fn python_pass_through_rules() {
    let inputs = pass_through_inputs();
    let results = run_pass_through(&python(), &inputs);
    assert_passed_through(&results[0], &inputs.plain, "plain");
    assert_passed_through(&results[1], &inputs.bad_digest, "bad digest");
    assert_passed_through(&results[2], &inputs.unreadable_body, "unreadable body");
    assert_passed_through(&results[3], &inputs.empty_aggregate, "empty aggregate");
    assert_passed_through(&results[4], &inputs.binary, "binary");
}

/// Node passes through only records without the magic: a bad digest or an unreadable body is an
/// error and delivers nothing. So a user record that starts with the magic must never be sent
/// raw, whatever its digest. An empty aggregate gives zero records.
#[test]
fn node_pass_through_rules() {
    let inputs = pass_through_inputs();
    let results = run_pass_through(&node(), &inputs);
    assert_passed_through(&results[0], &inputs.plain, "plain");
    assert_eq!(results[1]["error"], json!("Invalid record checksum"));
    assert_eq!(results[1]["user_records"], json!([]));
    assert!(
        results[2]["error"].is_string(),
        "unreadable body: {}",
        results[2]
    );
    assert_eq!(results[2]["user_records"], json!([]));
    assert!(
        results[3]["error"].is_null(),
        "empty aggregate: {}",
        results[3]
    );
    assert_eq!(results[3]["user_records"], json!([]));
    assert_passed_through(&results[4], &inputs.binary, "binary");
}
