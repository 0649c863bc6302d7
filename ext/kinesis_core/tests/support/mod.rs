//! Integration-test support: a real local Kinesis (kinesalite), an SDK client for it, stream
//! helpers, a local Amazon Data Firehose and S3 ([`Moto`]), and [`FaultProxy`], which sits between
//! a client and kinesalite or moto and injects the failures the real services produce.
//!
//! Every integration test file that does `mod support;` compiles all of this, and no file uses
//! all of it.
#![allow(dead_code, unused_imports)]

mod fault_proxy;
mod sigv4;

pub use fault_proxy::{Entries, Fault, FaultProxy, ProxyHandle, ProxyStats};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};
use aws_sdk_kinesis::Client;

/// How long stream state changes (create, split) may take before a helper gives up.
const STATE_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// A kinesalite server on 127.0.0.1, owned by this test process.
///
/// It stops when this value is dropped, and also when the test process exits in any way, because
/// the server exits when its stdin (a pipe from us) closes.
pub struct Kinesalite {
    child: Child,
    port: u16,
    pid: u32,
    // Held only so the pipe stays open while we live.
    _stdin: ChildStdin,
}

impl Kinesalite {
    /// Starts a fresh server (about 0.5–1 s). Panics, saying what to run, if Node.js or the
    /// npm packages are missing.
    pub fn start() -> Kinesalite {
        let root = repo_root();
        let support = root.join("test/support");
        let setup = format!("run `npm ci --prefix test/support` in {}", root.display());
        assert!(
            support
                .join("node_modules/kinesalite/package.json")
                .is_file(),
            "kinesalite is not installed in {}: {setup}",
            support.display()
        );
        let mut child = Command::new("node")
            .arg(support.join("kinesalite.js"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` ({e}): install Node.js 18 or newer, then {setup}")
            });
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");

        // Read the one JSON line on a thread so a hung server fails the test instead of hanging it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep draining so the server never writes into a closed pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            other => {
                let _ = child.kill();
                let status = child.wait();
                panic!("kinesalite did not start ({other:?}, exit {status:?}); if node_modules is broken, {setup}");
            }
        };
        let info: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("kinesalite printed {line:?}, not JSON: {e}"));
        let port = info["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("port in kinesalite's JSON line");
        let pid = info["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .expect("pid in kinesalite's JSON line");
        Kinesalite {
            child,
            port,
            pid,
            _stdin: stdin,
        }
    }

    /// One server per test binary, started on first use. It is never dropped: it exits with the
    /// test process when its stdin pipe closes. Give each test its own stream names
    /// ([`unique_stream_name`]).
    pub fn shared() -> &'static Kinesalite {
        static SHARED: OnceLock<Kinesalite> = OnceLock::new();
        SHARED.get_or_init(Kinesalite::start)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        // `Child::kill` signals our own child by its PID; `wait` reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A moto server (`python3 -m moto.server`, PyPI moto[server]) on 127.0.0.1, owned by this test
/// process: Firehose, S3 and the other services moto mocks, on one port.
///
/// Like [`Kinesalite`], it stops when this value is dropped, and also when the test process exits
/// in any way, because the server exits when its stdin (a pipe from us) closes.
pub struct Moto {
    child: Child,
    port: u16,
    // Held only so the pipe stays open while we live.
    _stdin: ChildStdin,
}

/// Runs moto's server (argv: -H HOST -p PORT), exiting when its stdin closes, as
/// test/support/moto_server.rb does; says so on stderr and exits if moto cannot be imported.
const MOTO_LAUNCHER: &str = r#"
import os, sys, threading

def exit_when_stdin_closes():
    sys.stdin.buffer.read()
    os._exit(0)

threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
try:
    from moto.server import main
except ImportError as e:
    sys.exit(f"moto[server] is not installed: {e}")
main(sys.argv[1:])
"#;

impl Moto {
    /// Starts a fresh server (1–2 s) on a free port, trying another if moto exits because some
    /// other process took the port first. Panics, saying what to run, if moto is missing.
    pub fn start() -> Moto {
        let setup = "pip install -r test/support/requirements.txt";
        for _ in 0..3 {
            // A port free now; moto may still lose it to another process before it binds.
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port on 127.0.0.1")
                .port();
            let mut child = Command::new("python3")
                .args(["-c", MOTO_LAUNCHER, "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run `python3` ({e}): install Python 3, then {setup}")
                });
            let stdin = child.stdin.take().expect("piped stdin");
            // Drained on a thread, so moto's request log never fills the pipe. Its start (what a
            // moto that exited said) is kept for the message.
            let mut stderr = child.stderr.take().expect("piped stderr");
            let log = std::thread::spawn(move || {
                let mut head = Vec::new();
                let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut head);
                let _ = std::io::copy(&mut stderr, &mut std::io::sink());
                String::from_utf8_lossy(&head).into_owned()
            });
            let mut moto = Moto {
                child,
                port,
                _stdin: stdin,
            };
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            loop {
                if moto.request("GET", "/moto-api/reset").is_ok() {
                    return moto;
                }
                if let Some(status) = moto.child.try_wait().expect("moto's status") {
                    let log = log.join().unwrap_or_default();
                    assert!(
                        !log.contains("moto[server] is not installed"),
                        "{}: {setup}",
                        log.trim()
                    );
                    eprintln!("moto exited ({status}) before it listened on port {port}:\n{log}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "moto did not answer on port {port} within {STARTUP_TIMEOUT:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto did not start in 3 attempts");
    }

    /// One server per test binary, started on first use. It is never dropped: it exits with the
    /// test process when its stdin pipe closes. Give each test its own resource names.
    pub fn shared() -> &'static Moto {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        SHARED.get_or_init(Moto::start)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A plain HTTP/1.0 request without a body, e.g. to S3's path-style API (`PUT /BUCKET`,
    /// `GET /BUCKET?list-type=2`, `GET /BUCKET/KEY`): the status and the body. It is not signed,
    /// but carries a signature-shaped `Authorization` header, which moto does not check: without
    /// one, moto's S3 serves only public objects.
    pub fn request(&self, method: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let authorization = "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/s3/aws4_request, \
                             SignedHeaders=host, Signature=0";
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nAuthorization: {authorization}\r\n\
             Content-Length: 0\r\n\r\n",
            self.port
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let bad = || std::io::Error::other(format!("not an HTTP answer: {answer:?}"));
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(bad)?;
        let status = std::str::from_utf8(&answer[..split])
            .ok()
            .and_then(|head| head.split(' ').nth(1)?.parse().ok())
            .ok_or_else(bad)?;
        Ok((status, answer[split + 4..].to_vec()))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client for `endpoint` (region us-east-1, dummy static credentials) with the SDK's standard
/// retries. Good for setup and verification.
pub async fn client(endpoint: &str) -> Client {
    client_with(endpoint, RetryConfig::standard(), None).await
}

/// A client that never retries, so each fault the proxy injects surfaces as it is, with an
/// optional per-attempt timeout.
pub async fn raw_client(endpoint: &str, attempt_timeout: Option<Duration>) -> Client {
    client_with(endpoint, RetryConfig::disabled(), attempt_timeout).await
}

pub async fn client_with(
    endpoint: &str,
    retry: RetryConfig,
    attempt_timeout: Option<Duration>,
) -> Client {
    let mut timeouts = TimeoutConfig::builder().connect_timeout(Duration::from_secs(2));
    if let Some(t) = attempt_timeout {
        timeouts = timeouts.operation_attempt_timeout(t);
    }
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDTEST",
            "test-secret",
            None,
            None,
            "kinesis-core-tests",
        ))
        .endpoint_url(endpoint)
        .retry_config(retry)
        .timeout_config(timeouts.build())
        .build();
    Client::from_conf(config)
}

/// A stream name no other test in this process uses.
pub fn unique_stream_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A shard as ListShards describes it, hash keys parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard_id: String,
    pub parent_shard_id: Option<String>,
    pub adjacent_parent_shard_id: Option<String>,
    pub starting_hash_key: u128,
    pub ending_hash_key: u128,
    /// false once the shard was split or merged (it has an EndingSequenceNumber).
    pub open: bool,
}

impl ShardInfo {
    pub fn contains(&self, hash_key: u128) -> bool {
        (self.starting_hash_key..=self.ending_hash_key).contains(&hash_key)
    }
}

/// A record as GetRecords returned it, with the hash range of the shard it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    pub shard_id: String,
    pub starting_hash_key: u128,
    pub ending_hash_key: u128,
    pub partition_key: String,
    /// Always None: GetRecords never returns the explicit hash key (neither does real Kinesis).
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
    pub sequence_number: String,
}

fn is_not_found(e: &impl ProvideErrorMetadata) -> bool {
    e.code() == Some("ResourceNotFoundException")
}

fn parse_hash_key(s: &str) -> u128 {
    s.parse().unwrap_or_else(|e| panic!("hash key {s:?}: {e}"))
}

/// Creates a stream with `shards` shards and returns once it is ACTIVE and answers ListShards.
/// kinesalite can say ResourceNotFound for a moment after CreateStream, even with createStreamMs 0.
pub async fn create_stream(client: &Client, name: &str, shards: i32) -> Vec<ShardInfo> {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateStream {name}: {}", DisplayErrorContext(e)));
    wait_until_active(client, name).await;
    let listed = list_shards(client, name).await;
    assert_eq!(
        listed.len(),
        shards as usize,
        "shards of new stream {name}: {listed:?}"
    );
    listed
}

/// Polls DescribeStreamSummary until the stream is ACTIVE; ResourceNotFound counts as "not yet".
pub async fn wait_until_active(client: &Client, name: &str) {
    let deadline = Instant::now() + STATE_CHANGE_TIMEOUT;
    loop {
        match client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
        {
            Ok(out) => {
                let status = out
                    .stream_description_summary()
                    .map(|s| s.stream_status().clone());
                if status == Some(StreamStatus::Active) {
                    return;
                }
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => panic!("DescribeStreamSummary {name}: {}", DisplayErrorContext(e)),
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} not ACTIVE after {STATE_CHANGE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every shard of the stream, open and closed, in ListShards order (by shard id).
pub async fn list_shards(client: &Client, stream: &str) -> Vec<ShardInfo> {
    let deadline = Instant::now() + STATE_CHANGE_TIMEOUT;
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        // A page after the first carries only the token (StreamName with it is an error). kinesalite
        // never returns a token, which matters because a token-only request crashes it.
        let request = match &next_token {
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if is_not_found(&e) && next_token.is_none() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => panic!("ListShards {stream}: {}", DisplayErrorContext(e)),
        };
        for s in out.shards() {
            let range = s.hash_key_range().expect("shard without HashKeyRange");
            shards.push(ShardInfo {
                shard_id: s.shard_id().to_string(),
                parent_shard_id: s.parent_shard_id().map(str::to_string),
                adjacent_parent_shard_id: s.adjacent_parent_shard_id().map(str::to_string),
                starting_hash_key: parse_hash_key(range.starting_hash_key()),
                ending_hash_key: parse_hash_key(range.ending_hash_key()),
                open: s
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .is_none(),
            });
        }
        match out.next_token() {
            Some(token) => next_token = Some(token.to_string()),
            None => return shards,
        }
    }
}

/// Every record in every shard (closed ones too), read from TRIM_HORIZON to the end: shards in
/// ListShards order, records in sequence order within a shard.
pub async fn read_all(client: &Client, stream: &str) -> Vec<ReadRecord> {
    let mut all = Vec::new();
    for shard in list_shards(client, stream).await {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&shard.shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GetShardIterator {stream}/{}: {}",
                    shard.shard_id,
                    DisplayErrorContext(e)
                )
            })
            .shard_iterator()
            .map(str::to_string);
        // An open shard ends at the first empty read; a closed one may also end by dropping the iterator.
        while let Some(it) = iterator {
            let out = client
                .get_records()
                .shard_iterator(it)
                .limit(10_000)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "GetRecords {stream}/{}: {}",
                        shard.shard_id,
                        DisplayErrorContext(e)
                    )
                });
            if out.records().is_empty() {
                break;
            }
            all.extend(out.records().iter().map(|r| ReadRecord {
                shard_id: shard.shard_id.clone(),
                starting_hash_key: shard.starting_hash_key,
                ending_hash_key: shard.ending_hash_key,
                partition_key: r.partition_key().unwrap_or_default().to_string(),
                explicit_hash_key: None,
                data: r.data().as_ref().to_vec(),
                sequence_number: r.sequence_number().to_string(),
            }));
            iterator = out.next_shard_iterator().map(str::to_string);
        }
    }
    all
}

/// Splits `shard_id` at `new_starting_hash_key`, waits for ACTIVE, and returns all shards (the
/// parent is now closed; the two children name it as ParentShardId).
pub async fn split_shard(
    client: &Client,
    stream: &str,
    shard_id: &str,
    new_starting_hash_key: u128,
) -> Vec<ShardInfo> {
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard_id)
        .new_starting_hash_key(new_starting_hash_key.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("SplitShard {stream}/{shard_id}: {}", DisplayErrorContext(e)));
    wait_until_active(client, stream).await;
    list_shards(client, stream).await
}

/// A Firehose client for `endpoint` (moto, or a proxy in front of it), set up as the Kinesis
/// clients here are (region us-east-1, dummy static credentials), without retries so each fault
/// a proxy injects surfaces as it is.
pub fn firehose_client(endpoint: &str) -> aws_sdk_firehose::Client {
    let config = aws_sdk_firehose::Config::builder()
        .behavior_version(aws_sdk_firehose::config::BehaviorVersion::latest())
        .region(aws_sdk_firehose::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_firehose::config::Credentials::new(
            "AKIDTEST",
            "test-secret",
            None,
            None,
            "kinesis-core-tests",
        ))
        .endpoint_url(endpoint)
        .retry_config(aws_sdk_firehose::config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_sdk_firehose::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .build(),
        )
        .build();
    aws_sdk_firehose::Client::from_conf(config)
}

/// A fresh bucket on `moto` and a direct PUT delivery stream writing into it; returns (delivery
/// stream, bucket). moto writes each PutRecordBatch call it gets as one S3 object, the call's
/// records concatenated.
pub async fn create_delivery_stream(moto: &Moto, prefix: &str) -> (String, String) {
    use aws_sdk_firehose::types::{BufferingHints, ExtendedS3DestinationConfiguration};
    let bucket = unique_stream_name(&format!("{prefix}-bucket"));
    let (status, body) = moto.request("PUT", &format!("/{bucket}")).unwrap();
    assert_eq!(
        status,
        200,
        "PUT /{bucket}: {}",
        String::from_utf8_lossy(&body)
    );
    let stream = unique_stream_name(prefix);
    let destination = ExtendedS3DestinationConfiguration::builder()
        .role_arn("arn:aws:iam::123456789012:role/firehose")
        .bucket_arn(format!("arn:aws:s3:::{bucket}"))
        // As the service reports it: moto leaves it out of its description otherwise.
        .compression_format(aws_sdk_firehose::types::CompressionFormat::Uncompressed)
        .buffering_hints(
            BufferingHints::builder()
                .size_in_mbs(1)
                .interval_in_seconds(0)
                .build(),
        )
        .build()
        .unwrap();
    firehose_client(&moto.endpoint())
        .create_delivery_stream()
        .delivery_stream_name(&stream)
        .extended_s3_destination_configuration(destination)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateDeliveryStream {stream}: {}", DisplayErrorContext(e)));
    (stream, bucket)
}

/// The bytes of every object in `bucket` on `moto`: one per PutRecordBatch call that delivered
/// something. Read with unsigned path-style GETs; the keys are found in ListObjectsV2's XML.
pub fn s3_objects(moto: &Moto, bucket: &str) -> Vec<Vec<u8>> {
    let get = |path: String| {
        let (status, body) = moto.request("GET", &path).unwrap();
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    };
    let listing = String::from_utf8(get(format!("/{bucket}?list-type=2&max-keys=1000"))).unwrap();
    assert!(
        !listing.contains("<IsTruncated>true"),
        "more than 1000 objects in {bucket}: page through them"
    );
    listing
        .split("<Key>")
        .skip(1)
        .map(|rest| {
            let key = &rest[..rest.find("</Key>").expect("</Key>")];
            get(format!("/{bucket}/{key}"))
        })
        .collect()
}
