//! Delivers a batch of user records: to a Kinesis data stream (plan aggregates per predicted
//! shard, or one Kinesis record each; pack PutRecords requests; send several at once within
//! per-shard rate limits; recover from a stale shard map), or to a Firehose delivery stream (one
//! Firehose record each, or packed; PutRecordBatch requests). Both retry failed entries, by their
//! position in the answer, with backoff, under one deadline, and report the fate of every user
//! record.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesis::types::{ShardFilter, ShardFilterType};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::{Notify, Semaphore};

use crate::batch::{plan, plan_firehose, KinesisRecord, PlanLimits, RecordBatch, Refused};
use crate::cancel::CancelToken;
use crate::config::{Destination, KeyMode, ProducerConfig, FIREHOSE_BILLING_UNIT_BYTES};
use crate::error::{
    classify_code_for, classify_sdk_error, classify_sdk_error_for, Failure, FailureKind, Service,
};
use crate::hashkey::partition_key_hash;
use crate::metrics::{Metrics, Name, Observations, Stats};
use crate::pipe::{CallLimits, Held, Pipe};
use crate::rate_limit::ShardRateLimiter;
use crate::request_body;
use crate::shard_map::{Shard, ShardMap};

/// What became of one user record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    /// Not part of this delivery (not in the indexes given).
    Skipped,
    /// Still being delivered (only seen if the delivery was cut short).
    Pending,
    Delivered,
    /// Not delivered: index into [`BatchOutcome::failures`].
    Failed(u32),
    /// Can never be sent as it is (too large, bad key): index into [`BatchOutcome::failures`].
    Refused(u32),
}

/// Counters of one delivery; the plugin adds them up over its lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub user_records: u64,
    pub delivered: u64,
    pub failed: u64,
    pub refused: u64,
    /// User records whose JSON had invalid UTF-8 replaced with U+FFFD (`invalid_utf8 replace`).
    pub scrubbed: u64,
    /// Kinesis records sent (aggregates and raw singles), first attempts only.
    pub kinesis_records: u64,
    pub aggregates: u64,
    pub requests: u64,
    pub request_errors: u64,
    /// Entries sent again after a failed attempt.
    pub retried_entries: u64,
    pub throttled_entries: u64,
    /// Bytes (data plus partition keys) of successful entries.
    pub bytes_delivered: u64,
    /// PUT payload units (25 KB each, rounded up per record) of successful entries (Kinesis).
    pub put_payload_units: u64,
    /// Ingestion billing units (5 KB each, rounded up per record) of successful entries (Firehose).
    pub firehose_billed_units: u64,
    /// Aggregates that landed on another shard than predicted.
    pub wrong_shard: u64,
    /// User records sent again because their aggregate landed where a KCL consumer drops it.
    pub resent_user_records: u64,
    pub shard_map_refreshes: u64,
    /// Time spent waiting on the per-shard rate limiter, in milliseconds.
    pub rate_limited_ms: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        macro_rules! sum { ($($f:ident),*) => { $( self.$f += o.$f; )* } }
        sum!(
            user_records,
            delivered,
            failed,
            refused,
            scrubbed,
            kinesis_records,
            aggregates,
            requests,
            request_errors,
            retried_entries,
            throttled_entries,
            bytes_delivered,
            put_payload_units,
            firehose_billed_units,
            wrong_shard,
            resent_user_records,
            shard_map_refreshes,
            rate_limited_ms
        );
    }

    /// Name/value pairs, for monitoring output.
    pub fn pairs(&self) -> [(&'static str, u64); 18] {
        [
            ("user_records", self.user_records),
            ("delivered", self.delivered),
            ("failed", self.failed),
            ("refused", self.refused),
            ("scrubbed", self.scrubbed),
            ("kinesis_records", self.kinesis_records),
            ("aggregates", self.aggregates),
            ("requests", self.requests),
            ("request_errors", self.request_errors),
            ("retried_entries", self.retried_entries),
            ("throttled_entries", self.throttled_entries),
            ("bytes_delivered", self.bytes_delivered),
            ("put_payload_units", self.put_payload_units),
            ("firehose_billed_units", self.firehose_billed_units),
            ("wrong_shard", self.wrong_shard),
            ("resent_user_records", self.resent_user_records),
            ("shard_map_refreshes", self.shard_map_refreshes),
            ("rate_limited_ms", self.rate_limited_ms),
        ]
    }
}

/// The result of one delivery: a status per user record of the batch, the distinct failures
/// they point to, and counters.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    pub status: Vec<RecordStatus>,
    pub failures: Vec<Failure>,
    pub counters: Counters,
}

impl BatchOutcome {
    fn new(len: usize) -> Self {
        BatchOutcome {
            status: vec![RecordStatus::Skipped; len],
            failures: Vec::new(),
            counters: Counters::default(),
        }
    }

    fn failure_index(&mut self, f: &Failure) -> u32 {
        if let Some(i) = self.failures.iter().position(|x| x == f) {
            return i as u32;
        }
        self.failures.push(f.clone());
        (self.failures.len() - 1) as u32
    }

    fn fail(&mut self, members: &[u32], f: &Failure) {
        let i = self.failure_index(f);
        for &m in members {
            self.status[m as usize] = RecordStatus::Failed(i);
        }
    }

    fn deliver(&mut self, members: &[u32]) {
        for &m in members {
            self.status[m as usize] = RecordStatus::Delivered;
        }
    }

    /// Fills in the per-record counters from the statuses.
    fn finish(mut self) -> Self {
        let (mut d, mut f, mut r) = (0, 0, 0);
        for s in &self.status {
            match s {
                RecordStatus::Delivered => d += 1,
                RecordStatus::Failed(_) | RecordStatus::Pending => f += 1,
                RecordStatus::Refused(_) => r += 1,
                RecordStatus::Skipped => {}
            }
        }
        self.counters.delivered = d;
        self.counters.failed = f;
        self.counters.refused = r;
        self
    }

    pub fn all_delivered(&self) -> bool {
        self.status
            .iter()
            .all(|s| matches!(s, RecordStatus::Delivered | RecordStatus::Skipped))
    }
}

/// A stream's shard map and when it may be listed again.
struct StreamState {
    map: Mutex<(Arc<ShardMap>, u64)>,
    refresh: tokio::sync::Mutex<RefreshGate>,
}

struct RefreshGate {
    next_allowed: Instant,
    backoff: Duration,
}

const REFRESH_BACKOFF_MIN: Duration = Duration::from_secs(1);
const REFRESH_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Rounds of re-planning after aggregates landed on unexpected shards.
const MAX_RESEND_ROUNDS: usize = 3;
/// Shard id used when the shard map cannot be listed (shared-key modes only).
const UNKNOWN_SHARD: &str = "(unlisted)";

/// Sends user records to Kinesis or Firehose. Cheap to share: one per plugin instance.
pub struct Producer {
    client: aws_sdk_kinesis::Client,
    /// The Firehose client, for a Firehose destination.
    firehose: Option<aws_sdk_firehose::Client>,
    config: ProducerConfig,
    streams: Mutex<HashMap<String, Arc<StreamState>>>,
    limiter: Option<ShardRateLimiter>,
    /// Set when fluentd shuts down: until then, deliveries keep retrying past `max_retries`
    /// and their own deadline, so a stop drains what is buffered (see [`Producer::begin_drain`]).
    drain_until: Mutex<Option<Instant>>,
    /// CloudWatch metrics, when `metrics_level` is not none.
    metrics: Option<Arc<Metrics>>,
    /// Each destination's open (partial) batch call, shared by consecutive deliveries.
    pipes: Mutex<HashMap<String, Arc<Pipe<Entry>>>>,
    /// When each stream's deliveries last handed records to its pipe, and the smoothed
    /// interval between them (for `linger_max`).
    arrivals: Mutex<HashMap<String, Arrivals>>,
    /// When entries last waited in the producer for their shard (the rate limiter let none of
    /// an attempt's entries go) or were throttled: while shards are at their limit, a partial
    /// call waits no longer than `linger`, since filling it would only keep records from shards
    /// that can take them. (A call waiting up to 0.5 s for a shard that takes all its entries
    /// then does not count: two aggregates for one shard in a row do that.)
    held_back: Mutex<Option<Instant>>,
    /// Batch calls in flight at once, across deliveries (`concurrency`).
    call_slots: Semaphore,
    /// Wakes deliveries waiting for their partial call to fill: a stop sends it at once.
    drain_started: Notify,
    /// Wakes deliveries to send their open calls now ([`Producer::send_open_calls`]).
    open_calls_wanted: Notify,
}

/// Called with the user records (batch indexes) each PutRecords response confirmed, as soon as
/// it is read: the caller keeps a chunk's progress with it.
pub type OnDelivered<'a> = &'a (dyn Fn(&[u32]) + Send + Sync);

/// What a batch call answered for one entry: delivered (with the shard it landed on, for
/// Kinesis), or failed and why.
type EntryAnswer = Result<Option<String>, Failure>;

impl Producer {
    /// Builds the client. Must run on a tokio runtime (see [`crate::runtime::runtime`]).
    pub async fn new(config: ProducerConfig) -> Result<Self, String> {
        config.validate()?;
        let clients = crate::client::build_clients(&config).await?;
        let metrics = clients.cloudwatch.map(|cw| {
            let m = Arc::new(Metrics::new(config.metrics.clone(), Some(cw)));
            m.spawn_uploader();
            m
        });
        let mut producer = Self::with_client(clients.kinesis, config);
        producer.metrics = metrics;
        producer.firehose = clients.firehose;
        Ok(producer)
    }

    /// Measures into `metrics` (tests; [`Producer::new`] sets them up from the config).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    pub fn with_client(client: aws_sdk_kinesis::Client, config: ProducerConfig) -> Self {
        // Firehose has no shards: its limits are the delivery stream's, answered by throttling.
        let slots = config.concurrency.max(1);
        let limiter = if config.destination.is_firehose() {
            None
        } else {
            ShardRateLimiter::new(config.rate_limit_percent)
        };
        Producer {
            client,
            firehose: None,
            config,
            streams: Mutex::new(HashMap::new()),
            limiter,
            drain_until: Mutex::new(None),
            metrics: None,
            pipes: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(HashMap::new()),
            held_back: Mutex::new(None),
            call_slots: Semaphore::new(slots),
            drain_started: Notify::new(),
            open_calls_wanted: Notify::new(),
        }
    }

    /// Shutdown: from now until `budget` has passed, deliveries (those running and those started
    /// later) retry failed records without counting attempts or their own deadline, so
    /// everything buffered is delivered unless the budget runs out first.
    pub fn begin_drain(&self, budget: Duration) {
        *self.drain_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + budget);
        self.drain_started.notify_waiters();
    }

    /// Sends, now, the open (partial) calls that deliveries in progress hold for more records
    /// while nothing else of theirs is outstanding: no more records come soon (fluentd hands
    /// over no next chunk while as many chunks as it allows are being delivered). Deliveries
    /// that still wait on calls in flight keep theirs open.
    pub fn send_open_calls(&self) {
        self.open_calls_wanted.notify_waiters();
    }

    /// The later of a delivery's own deadline and the end of the shutdown budget.
    fn deadline_with_drain(&self, deadline: Instant) -> Instant {
        match *self.drain_until.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(d) if d > deadline => d,
            _ => deadline,
        }
    }

    fn draining(&self) -> bool {
        self.drain_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub fn config(&self) -> &ProducerConfig {
        &self.config
    }

    /// Aggregates of per-record keys must land on their predicted shard (the KCL's range check);
    /// anything else lands safely anywhere and only uses the map for rate limits and metrics.
    fn needs_exact_shard_map(&self) -> bool {
        self.config.key_mode == KeyMode::PerRecord
            && self.config.destination == (Destination::Streams { aggregate: true })
    }

    async fn list_open_shards(&self, stream: &str) -> Result<ShardMap, Failure> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self.client.list_shards();
            req = match &token {
                // With a token, the stream name must not be sent again.
                Some(t) => req.next_token(t),
                None => req.stream_name(stream).shard_filter(
                    ShardFilter::builder()
                        .r#type(ShardFilterType::AtLatest)
                        .build()
                        .map_err(|e| {
                            Failure::new(FailureKind::Invalid, "ShardFilter", e.to_string())
                        })?,
                ),
            };
            let resp = req.send().await.map_err(|e| classify_sdk_error(&e))?;
            for s in resp.shards() {
                // Servers that ignore ShardFilter also return closed shards: keep the open ones.
                if s.sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .is_some()
                {
                    continue;
                }
                let range = s.hash_key_range();
                let parse = |v: Option<&str>| v.and_then(|t| t.parse::<u128>().ok());
                let (Some(start), Some(end)) = (
                    parse(range.map(|r| r.starting_hash_key())),
                    parse(range.map(|r| r.ending_hash_key())),
                ) else {
                    return Err(Failure::new(
                        FailureKind::Transient,
                        "BadShardListing",
                        format!("shard {} has no readable hash key range", s.shard_id()),
                    ));
                };
                shards.push(Shard {
                    id: s.shard_id().to_string(),
                    start,
                    end,
                });
            }
            match resp.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        ShardMap::new(shards).map_err(|e| {
            Failure::new(
                FailureKind::Transient,
                "ShardMapIncomplete",
                format!("{e} (the stream is being resharded; retry)"),
            )
        })
    }

    /// Lists the stream's shards and caches the map; errors say what to fix.
    pub async fn check_stream(&self, stream: &str) -> Result<Arc<ShardMap>, Failure> {
        let map = Arc::new(self.list_open_shards(stream).await?);
        let state = self.state(stream, Some(map.clone()));
        let mut m = state.map.lock().unwrap_or_else(|p| p.into_inner());
        m.0 = map.clone();
        m.1 += 1;
        Ok(map)
    }

    /// Checks that the destination can take records and describes it for the log: a stream's open
    /// shards (the map is cached), or a delivery stream's status. Errors say what to fix.
    pub async fn check_destination(&self, name: &str) -> Result<String, Failure> {
        let Some(firehose) = &self.firehose else {
            let map = self.check_stream(name).await?;
            return Ok(format!("is reachable with {} open shard(s)", map.len()));
        };
        let resp = firehose
            .describe_delivery_stream()
            .delivery_stream_name(name)
            .send()
            .await
            .map_err(|e| classify_sdk_error_for(Service::Firehose, &e))?;
        let Some(d) = resp.delivery_stream_description() else {
            return Err(Failure::new(
                FailureKind::Transient,
                "EmptyAnswer",
                "DescribeDeliveryStream answered without a description",
            ));
        };
        let kind = d.delivery_stream_type().as_str();
        if kind == "KinesisStreamAsSource" {
            return Err(classify_code_for(
                Service::Firehose,
                "InvalidSourceException",
                None,
                &format!("delivery stream {name:?} reads from a Kinesis data stream."),
            ));
        }
        let status = d.delivery_stream_status().as_str();
        if status != "ACTIVE" {
            return Err(classify_code_for(
                Service::Firehose,
                "ResourceInUseException",
                None,
                &format!("delivery stream {name:?} is {status}."),
            ));
        }
        Ok(format!("is ACTIVE ({kind})"))
    }

    fn state(&self, stream: &str, initial: Option<Arc<ShardMap>>) -> Arc<StreamState> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .entry(stream.to_string())
            .or_insert_with(|| {
                Arc::new(StreamState {
                    map: Mutex::new((initial.unwrap_or_else(|| Arc::new(ShardMap::default())), 0)),
                    refresh: tokio::sync::Mutex::new(RefreshGate {
                        next_allowed: Instant::now(),
                        backoff: REFRESH_BACKOFF_MIN,
                    }),
                })
            })
            .clone()
    }

    /// The cached map (listing it the first time) and its generation.
    async fn shard_map(&self, stream: &str) -> Result<(Arc<ShardMap>, u64), Failure> {
        let state = self.state(stream, None);
        {
            let m = state.map.lock().unwrap_or_else(|p| p.into_inner());
            if !m.0.is_empty() {
                return Ok((m.0.clone(), m.1));
            }
        }
        self.refresh_map(stream, 0, None).await
    }

    /// Lists the shards again unless a listing newer than `seen_generation` exists, no sooner
    /// than the refresh backoff allows (1 s growing ×1.5 to 30 s while listings find nothing new).
    async fn refresh_map(
        &self,
        stream: &str,
        seen_generation: u64,
        deadline: Option<Instant>,
    ) -> Result<(Arc<ShardMap>, u64), Failure> {
        let state = self.state(stream, None);
        let mut gate = state.refresh.lock().await;
        {
            let m = state.map.lock().unwrap_or_else(|p| p.into_inner());
            if m.1 > seen_generation && !m.0.is_empty() {
                return Ok((m.0.clone(), m.1));
            }
        }
        let now = Instant::now();
        if gate.next_allowed > now {
            let until = deadline.map_or(gate.next_allowed, |d| d.min(gate.next_allowed));
            tokio::time::sleep_until(until.into()).await;
        }
        let listed = match self.list_open_shards(stream).await {
            Ok(map) => map,
            // Shared-key modes do not need the map to be correct; without ListShards permission
            // they go on without per-shard rate limiting.
            Err(f)
                if !self.needs_exact_shard_map()
                    && f.kind == FailureKind::NeedsAttention
                    && f.code != "ResourceNotFoundException" =>
            {
                ShardMap::whole(UNKNOWN_SHARD)
            }
            Err(f) => return Err(f),
        };
        let mut m = state.map.lock().unwrap_or_else(|p| p.into_inner());
        let unchanged = m.0.shards() == listed.shards();
        gate.backoff = if unchanged {
            (gate.backoff.mul_f64(1.5)).min(REFRESH_BACKOFF_MAX)
        } else {
            REFRESH_BACKOFF_MIN
        };
        gate.next_allowed = Instant::now() + gate.backoff;
        m.0 = Arc::new(listed);
        m.1 += 1;
        Ok((m.0.clone(), m.1))
    }

    /// Delivers the user records `indexes` of `batch` to `stream`, calling `on_delivered` as
    /// responses confirm records. When `stop` fires, no new request is started (nor a retry,
    /// nor a wait for the rate limiter): requests already sent still finish and what they
    /// delivered is reported; what was not sent is reported as cancelled.
    pub async fn put(
        &self,
        stream: &str,
        batch: &RecordBatch,
        indexes: &[u32],
        stop: &CancelToken,
        on_delivered: OnDelivered<'_>,
    ) -> BatchOutcome {
        self.put_buffered_since(
            stream,
            Arc::new(batch.clone()),
            indexes,
            stop,
            on_delivered,
            SystemTime::now(),
        )
        .await
    }

    /// [`Producer::put`] for records that arrived in the buffer at `arrived` (the chunk's
    /// creation): the `BufferingTime` metric measures from there to delivery. The batch is
    /// shared with the calls carrying its records, which may carry other deliveries' records too.
    pub async fn put_buffered_since(
        &self,
        stream: &str,
        batch: Arc<RecordBatch>,
        indexes: &[u32],
        stop: &CancelToken,
        on_delivered: OnDelivered<'_>,
        arrived: SystemTime,
    ) -> BatchOutcome {
        let mut outcome = BatchOutcome::new(batch.len());
        for &i in indexes {
            outcome.status[i as usize] = RecordStatus::Pending;
        }
        outcome.counters.user_records = indexes.len() as u64;
        let metrics = self.metrics.clone();
        let sizes = metrics
            .as_ref()
            .filter(|m| m.wants(Name::UserRecordsDataPut))
            .map(|_| {
                (0..batch.len())
                    .map(|i| batch.data(i).len() as u32)
                    .collect()
            });
        if let Some(m) = &metrics {
            let mut obs = Observations::default();
            obs.add(
                Name::UserRecordsReceived,
                None,
                None,
                Stats::repeated(1.0, indexes.len()),
            );
            m.record(stream, &obs);
            m.pending(stream, indexes.len() as i64);
        }
        let sink = Arc::new(Sink {
            outcome: Mutex::new(outcome),
            metrics,
            stream: stream.to_string(),
            sizes,
            arrived,
            deadline: Instant::now() + self.config.deadline,
            stop: CancelToken::new(),
            confirmed: Mutex::new(Vec::new()),
            outstanding: AtomicUsize::new(0),
            settled: Notify::new(),
            misrouted: Mutex::new(Vec::new()),
        });
        // The caller's stop reaches the calls carrying this delivery's records through the sink.
        let forward_stop = async {
            stop.cancelled().await;
            sink.stop.cancel();
            sink.settled.notify_waiters();
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = self.deliver(stream, &sink, batch, indexes, on_delivered) => {}
            _ = forward_stop => {}
        }
        sink.pass_confirmed(on_delivered);
        // Records never sent (the delivery was stopped before their turn).
        let unsent: Vec<u32> = {
            let mut o = sink.lock();
            let unsent: Vec<u32> = (0..o.status.len() as u32)
                .filter(|&i| o.status[i as usize] == RecordStatus::Pending)
                .collect();
            if !unsent.is_empty() {
                let i = o.failure_index(&cancelled());
                for &u in &unsent {
                    o.status[u as usize] = RecordStatus::Failed(i);
                }
            }
            unsent
        };
        sink.observe_failed(&unsent, None, 0);
        if let Some(m) = &sink.metrics {
            m.pending(stream, -(indexes.len() as i64));
        }
        // Calls that carried these records may still hold the sink for a moment: take the outcome.
        let outcome = std::mem::take(&mut *sink.lock());
        outcome.finish()
    }

    /// Plans the `indexes` of `batch` and sends them. The batch is let go as soon as no record
    /// can need planning again (none can land on another shard than predicted and be dropped
    /// there): the planned records carry their own copy of the data while in flight.
    async fn deliver(
        &self,
        stream: &str,
        sink: &Arc<Sink>,
        batch: Arc<RecordBatch>,
        indexes: &[u32],
        on_delivered: OnDelivered<'_>,
    ) {
        let aggregate = match self.config.destination {
            Destination::Firehose { pack } => {
                return self
                    .deliver_firehose(stream, batch, indexes, pack, sink, on_delivered)
                    .await
            }
            Destination::Streams { aggregate } => aggregate,
        };
        let limits = PlanLimits {
            max_record_bytes: self.config.max_record_bytes,
            aggregation_max_bytes: self.config.aggregation_max_bytes,
            ordered: self.config.keep_order,
            aggregate,
        };
        let mut pending: Vec<u32> = indexes.to_vec();
        let mut map = match self.shard_map(stream).await {
            Ok(m) => m,
            Err(f) => return sink.fail(&pending, &f, None, 0),
        };
        let mut batch = Some(batch);
        for round in 0.. {
            let planned_from = batch
                .as_deref()
                .expect("kept while records may be planned again");
            let (records, refused) = plan(
                planned_from,
                &pending,
                &self.config.key_mode,
                &map.0,
                &limits,
            );
            sink.planned(&records, refused);
            if records.iter().all(|r| r.lands_safely_anywhere) {
                // Nothing can come back misrouted (and keep_order holds records back only
                // after a misroute): the formatted records are not needed any more.
                batch = None;
            }
            // Records of shards whose queue a misroute stopped (keep_order): never sent, planned
            // again with the new map.
            let held = if self.config.keep_order {
                self.send_in_order(stream, records, &map.0, sink).await
            } else {
                self.send_packed(stream, records, &map.0, sink, on_delivered)
                    .await;
                Vec::new()
            };
            sink.pass_confirmed(on_delivered);
            let misrouted = sink.take_misrouted();
            if misrouted.is_empty() {
                return;
            }
            sink.lock().counters.wrong_shard += misrouted.len() as u64;
            let refreshed = self
                .refresh_map(stream, map.1, Some(self.deadline_with_drain(sink.deadline)))
                .await;
            if refreshed.is_ok() {
                sink.lock().counters.shard_map_refreshes += 1;
            }
            let held_count = held.len();
            pending = held;
            let mut confirmed = Vec::new();
            let mut obs = Observations::default();
            for (record, landed) in &misrouted {
                let shard = refreshed
                    .as_ref()
                    .ok()
                    .and_then(|m| m.0.by_id(landed).cloned());
                let batch = batch
                    .as_deref()
                    .expect("kept while records may land on another shard");
                if shard.is_some_and(|s| all_within(batch, &record.members, &s)) {
                    confirmed.extend_from_slice(&record.members);
                    sink.observe_delivered(&mut obs, &record.members, Some(landed), 0);
                } else {
                    pending.extend_from_slice(&record.members);
                }
            }
            sink.record(&obs);
            sink.delivered(&confirmed);
            sink.pass_confirmed(on_delivered);
            // Planned again in batch order (keep_order relies on it).
            pending.sort_unstable();
            match refreshed {
                Ok(m) => map = m,
                Err(f) => return sink.fail(&pending, &f, None, 0),
            }
            if pending.is_empty() {
                return;
            }
            if sink.stop.is_cancelled() {
                return sink.fail(&pending, &cancelled(), None, 0);
            }
            if round + 1 >= MAX_RESEND_ROUNDS
                || Instant::now() >= self.deadline_with_drain(sink.deadline)
            {
                let f = Failure::new(FailureKind::Transient, "ShardMapChanged", format!("aggregates kept landing on unexpected shards after {} re-plans (the stream is being resharded); retry later", round + 1));
                return sink.fail(&pending, &f, None, 0);
            }
            sink.lock().counters.resent_user_records += (pending.len() - held_count) as u64;
        }
    }

    /// Firehose: plan (one record each, or packed), then PutRecordBatch requests of at most
    /// `batch_max_entries` records and `batch_max_bytes`, several at once. No shards: nothing
    /// to predict, rate-limit or re-plan.
    async fn deliver_firehose(
        &self,
        stream: &str,
        batch: Arc<RecordBatch>,
        indexes: &[u32],
        pack_records: bool,
        sink: &Arc<Sink>,
        on_delivered: OnDelivered<'_>,
    ) {
        let (records, refused) =
            plan_firehose(&batch, indexes, pack_records, self.config.max_record_bytes);
        // Planned once: the records carry their data from here.
        drop(batch);
        sink.planned(&records, refused);
        let map = Arc::new(ShardMap::whole(UNKNOWN_SHARD));
        // Firehose records land anywhere: nothing comes back misrouted.
        self.send_packed(stream, records, &map, sink, on_delivered)
            .await;
    }

    fn pipe(&self, stream: &str) -> Arc<Pipe<Entry>> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|p| p.into_inner());
        pipes.entry(stream.to_string()).or_default().clone()
    }

    /// Puts `records` in the destination's calls behind those of earlier deliveries and sends
    /// every call that is full, at most `concurrency` calls at once across all deliveries, each
    /// retried on its own. The last, partial call waits for the next delivery's records (see
    /// [`Producer::open_call_due`]; not at all with `linger` 0, while draining, or once
    /// stopped); this delivery sends it then, unless another filled and sent it first. Returns
    /// once every record is settled: delivered, failed, or (in `sink.misrouted`) landed on
    /// another shard than predicted.
    async fn send_packed(
        &self,
        stream: &str,
        records: Vec<KinesisRecord>,
        map: &Arc<ShardMap>,
        sink: &Arc<Sink>,
        on_delivered: OnDelivered<'_>,
    ) {
        let pipe = self.pipe(stream);
        self.arrived(stream);
        let entries = records
            .into_iter()
            .map(|r| Entry::new(r, map.clone(), sink.clone()));
        let close = self.config.linger.is_zero() || self.draining() || sink.stop.is_cancelled();
        let limits = CallLimits {
            max_entries: self.config.batch_max_entries,
            max_bytes: self.config.batch_max_bytes,
        };
        let full = pipe.push(entries, |e| e.record.billed_size(), limits, close);
        let sends =
            futures::future::join_all(full.into_iter().map(|call| self.send_pooled(stream, call)));
        futures::join!(sends, self.wait_settled(stream, &pipe, sink, on_delivered));
    }

    /// When the partial call `held` of `stream` goes: `linger` after its first entry came in,
    /// or, with `linger_max`, 1.5 times the recent interval between the stream's deliveries
    /// after its latest entries came in, when that is at most `linger_max` (never less than
    /// `linger`, never more than `linger_max` after the first entry, and just `linger` after it
    /// while shards are at their limit, see `held_back`); in every case at most a quarter of the
    /// delivery deadline after the first entry, so that the wait never eats the retries.
    fn open_call_due(&self, stream: &str, held: &Held) -> Instant {
        let interval = self
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .and_then(|a| a.interval);
        let held_back = *self.held_back.lock().unwrap_or_else(|p| p.into_inner());
        let at_limit =
            held_back.is_some_and(|t| t.elapsed() < self.config.linger_max.max(LIMIT_MEMORY));
        open_call_due(&self.config, interval.filter(|_| !at_limit), held)
    }

    /// Notes that entries wait for their shard, or were throttled.
    fn note_held_back(&self) {
        *self.held_back.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Notes that a delivery of `stream` hands its records to the pipe now.
    fn arrived(&self, stream: &str) {
        let now = Instant::now();
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        match arrivals.get_mut(stream) {
            Some(a) => a.arrived(now),
            None => {
                arrivals.insert(
                    stream.to_string(),
                    Arrivals {
                        last: now,
                        interval: None,
                    },
                );
            }
        }
    }

    /// Sends one call of the pipe, each attempt holding one of the `concurrency` call slots.
    async fn send_pooled(&self, stream: &str, entries: Vec<Entry>) {
        self.send_request(stream, entries, &self.call_slots).await;
    }

    /// Waits until every record of `sink` handed to calls is settled, passing confirmed records
    /// to `on_delivered` as they come, and sends the open call once the wait for it is over if it
    /// still holds records of this delivery.
    async fn wait_settled(
        &self,
        stream: &str,
        pipe: &Pipe<Entry>,
        sink: &Arc<Sink>,
        on_delivered: OnDelivered<'_>,
    ) {
        // Open calls this delivery took and is sending: confirmations keep flowing meanwhile.
        let mut taken = futures::stream::FuturesUnordered::new();
        loop {
            let settled = sink.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            sink.pass_confirmed(on_delivered);
            if sink.outstanding.load(Ordering::SeqCst) == 0 {
                return;
            }
            let mut take = None;
            // When the open call goes is computed on every pass: a delivery that added to the
            // call since moved it.
            let open = pipe
                .holds(|e| Arc::ptr_eq(&e.sink, sink))
                .map(|held| (self.open_call_due(stream, &held), held));
            match open {
                Some((_, held)) if self.draining() || sink.stop.is_cancelled() => {
                    take = Some(held.generation)
                }
                Some((due, held)) if Instant::now() >= due => take = Some(held.generation),
                Some((due, held)) => {
                    let drain = self.drain_started.notified();
                    let wanted = self.open_calls_wanted.notified();
                    // Asked to send open calls, a delivery sends this one only when nothing
                    // else of it is outstanding: one still waiting on calls in flight finishes
                    // without it, and fluentd then hands over the chunk that fills it.
                    let only_the_open_call = sink.outstanding.load(Ordering::SeqCst) == held.mine;
                    tokio::select! {
                        _ = &mut settled => {}
                        _ = taken.next(), if !taken.is_empty() => {}
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = drain => take = Some(held.generation),
                        _ = wanted, if only_the_open_call => take = Some(held.generation),
                        _ = sink.stop.cancelled() => take = Some(held.generation),
                    }
                }
                None => {
                    tokio::select! {
                        _ = &mut settled => {}
                        _ = taken.next(), if !taken.is_empty() => {}
                    }
                }
            }
            if let Some(call) = take.and_then(|g| pipe.take(g)) {
                taken.push(self.send_pooled(stream, call));
            }
        }
    }

    /// One batch call with the `todo` entries of `records`: PutRecords, or PutRecordBatch for
    /// Firehose. An answer per entry, in order, or the whole call's failure. The call is never
    /// cancelled once sent.
    async fn call(
        &self,
        stream: &str,
        records: &[Entry],
        todo: &[usize],
    ) -> Result<Vec<EntryAnswer>, Failure> {
        if let Some(firehose) = &self.firehose {
            let body = request_body::put_record_batch(
                stream,
                todo.iter().map(|&e| records[e].record.data.as_slice()),
            );
            // The records travel in `body`, written by us; the SDK serializes an empty list.
            let resp = firehose
                .put_record_batch()
                .delivery_stream_name(stream)
                .set_records(Some(Vec::new()))
                .customize()
                .mutate_request(with_body(body))
                .send()
                .await
                .map_err(|e| classify_sdk_error_for(Service::Firehose, &e))?;
            return Ok(answers(Service::Firehose, resp.request_responses(), |r| {
                (r.error_code(), r.error_message(), None)
            }));
        }
        let body = request_body::put_records(stream, todo.iter().map(|&e| &records[e].record));
        let resp = self
            .client
            .put_records()
            .stream_name(stream)
            .set_records(Some(Vec::new()))
            .customize()
            .mutate_request(with_body(body))
            .send()
            .await
            .map_err(|e| classify_sdk_error(&e))?;
        Ok(answers(Service::Kinesis, resp.records(), |r| {
            (r.error_code(), r.error_message(), r.shard_id())
        }))
    }

    /// keep_order: each shard's Kinesis records one at a time, in plan order, each retried until
    /// it lands or fails for good; shards in parallel, at most `concurrency` calls at once.
    /// Records that landed on an unexpected shard go to `sink.misrouted`; returns the members of
    /// the records their shards then held back (never sent), for re-planning with a new map.
    async fn send_in_order(
        &self,
        stream: &str,
        records: Vec<KinesisRecord>,
        map: &Arc<ShardMap>,
        sink: &Arc<Sink>,
    ) -> Vec<u32> {
        let mut queues: BTreeMap<usize, Vec<KinesisRecord>> = BTreeMap::new();
        for r in records {
            queues.entry(r.shard).or_default().push(r);
        }
        let calls = Semaphore::new(self.config.concurrency);
        let shards = queues
            .into_values()
            .map(|queue| self.send_shard_in_order(stream, queue, map, sink, &calls));
        futures::future::join_all(shards)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// One shard's queue (see [`Producer::send_in_order`]). After a record that was not
    /// delivered, the later ones are not sent: they fail too, and fluentd sends them again with
    /// the chunk, after the failed one. After a misroute, they are handed back unsent.
    async fn send_shard_in_order(
        &self,
        stream: &str,
        queue: Vec<KinesisRecord>,
        map: &Arc<ShardMap>,
        sink: &Arc<Sink>,
        calls: &Semaphore,
    ) -> Vec<u32> {
        let mut queue = queue.into_iter();
        while let Some(record) = queue.next() {
            let first = record.members[0] as usize;
            let entry = Entry::new(record, map.clone(), sink.clone());
            self.send_request(stream, vec![entry], calls).await;
            match sink.lock().status[first] {
                RecordStatus::Delivered => continue,
                // Neither delivered nor failed: it landed on another shard (in sink.misrouted).
                RecordStatus::Pending => return queue.flat_map(|r| r.members).collect(),
                _ => {}
            }
            let f = if sink.stop.is_cancelled() {
                cancelled()
            } else {
                Failure::new(
                    FailureKind::Transient,
                    "HeldForOrder",
                    "not sent: an earlier record of its shard was not delivered, and keep_order sends nothing after it (fluentd sends both again with the chunk, in order)",
                )
            };
            for r in queue {
                sink.fail(&r.members, &f, known_shard(map, r.shard), 0);
            }
            return Vec::new();
        }
        Vec::new()
    }

    /// Sends one batch call and retries its failed entries. The entries may belong to several
    /// deliveries: each entry's outcome goes to its own delivery's sink, and each delivery's
    /// stop and deadline apply to its own entries. `calls`: the limit on calls in flight, held
    /// only while a call is, not while its entries wait for their shard or a backoff.
    ///
    /// With the rate limiter, each attempt carries the entries whose shard can take them now
    /// (in order; a shard's later entries wait behind its first); the others wait here for
    /// their shard, without counting as an attempt. Entries Kinesis throttled go again once
    /// their shard had a short refill (the limiter paces them); other failures back off.
    async fn send_request(&self, stream: &str, records: Vec<Entry>, calls: &Semaphore) {
        let mut todo: Vec<usize> = (0..records.len()).collect();
        // Per entry: the calls it went in, and when it may go again (after a backoff).
        let mut tries: Vec<u32> = vec![0; records.len()];
        let mut ready_at: Vec<Instant> = vec![Instant::now(); records.len()];
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        // Entries whose delivery was stopped are not sent (again): they fail as cancelled.
        let drop_stopped = |todo: &mut Vec<usize>, tries: &[u32]| {
            todo.retain(|&e| {
                let x = &records[e];
                if !x.sink.stop.is_cancelled() {
                    return true;
                }
                x.sink.fail(
                    &x.record.members,
                    &cancelled(),
                    known_shard(&x.map, x.record.shard),
                    tries[e].saturating_sub(1),
                );
                false
            });
        };
        loop {
            drop_stopped(&mut todo, &tries);
            if todo.is_empty() {
                return;
            }
            let now = Instant::now();
            let (send, go_after, wake) = self.admit(&records, &todo, &ready_at, now);
            if send.is_empty() {
                let (until, for_limiter) = wake;
                if for_limiter {
                    self.note_held_back();
                    records[todo[0]].sink.lock().counters.rate_limited_ms +=
                        until.saturating_duration_since(now).as_millis() as u64;
                }
                sleep_unless_all_stopped(&records, &mut todo, until, &tries, &drop_stopped).await;
                continue;
            }
            if !go_after.is_zero() {
                records[send[0]].sink.lock().counters.rate_limited_ms +=
                    go_after.as_millis() as u64;
                let until = now + go_after;
                sleep_unless_all_stopped(&records, &mut todo, until, &tries, &drop_stopped).await;
            }
            // Waiting for the shards or a call slot may take a while: what was stopped meanwhile
            // stays unsent, and gives back what it took from its shard.
            let permit = calls
                .acquire()
                .await
                .expect("the semaphore is never closed");
            // Fail the stopped entries first, then leave out of the call whatever is stopped by
            // then: one stopped in between stays in `todo` and fails on the next pass.
            if send.iter().any(|&e| records[e].sink.stop.is_cancelled()) {
                drop_stopped(&mut todo, &tries);
            }
            let (send, stopped): (Vec<usize>, Vec<usize>) = send
                .into_iter()
                .partition(|&e| !records[e].sink.stop.is_cancelled());
            if !stopped.is_empty() {
                if let Some(limiter) = &self.limiter {
                    limiter.refund(shard_usage(&records, stopped.into_iter()));
                }
                if send.is_empty() {
                    continue;
                }
            }
            let lead = &records[send[0]].sink;
            lead.lock().counters.requests += 1;
            for &e in &send {
                if tries[e] > 0 {
                    records[e].sink.lock().counters.retried_entries += 1;
                }
                tries[e] += 1;
            }
            let mut failed: Vec<(usize, Failure)> = Vec::new();
            let mut any_success = false;
            let mut whole_call_failed = false;
            let sent_at = Instant::now();
            // Sent requests are never cancelled: their outcome is always read and kept.
            let response = self.call(stream, &records, &send).await;
            drop(permit);
            let mut obs = Observations::default();
            let measured = self.metrics.is_some();
            if measured {
                let elapsed_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
                obs.add(Name::RequestTime, None, None, Stats::one(elapsed_ms));
                obs.add(
                    Name::KinesisRecordsPerPutRecordsRequest,
                    None,
                    None,
                    Stats::one(send.len() as f64),
                );
                let users: usize = send.iter().map(|&e| records[e].record.members.len()).sum();
                obs.add(
                    Name::UserRecordsPerPutRecordsRequest,
                    None,
                    None,
                    Stats::one(users as f64),
                );
                for &e in &send {
                    let x = &records[e];
                    obs.add(
                        Name::UserRecordsPerKinesisRecord,
                        None,
                        known_shard(&x.map, x.record.shard),
                        Stats::one(x.record.members.len() as f64),
                    );
                }
            }
            match response {
                Ok(results) => {
                    for (pos, &e) in send.iter().enumerate() {
                        let x = &records[e];
                        let r = &x.record;
                        let Some(res) = results.get(pos) else {
                            failed.push((
                                e,
                                Failure::new(
                                    FailureKind::Transient,
                                    "MissingResult",
                                    "PutRecords answered fewer entries than were sent",
                                ),
                            ));
                            continue;
                        };
                        let predicted = known_shard(&x.map, r.shard);
                        let landed = match res {
                            Ok(landed) => landed.as_deref().unwrap_or(""),
                            Err(f) => {
                                if f.kind == FailureKind::Throttled {
                                    x.sink.lock().counters.throttled_entries += 1;
                                }
                                if measured {
                                    obs.add(
                                        Name::KinesisRecordsPut,
                                        None,
                                        predicted,
                                        Stats::one(0.0),
                                    );
                                    obs.add(
                                        Name::ErrorsByCode,
                                        Some(&f.code),
                                        predicted,
                                        Stats::one(1.0),
                                    );
                                    obs.add(Name::AllErrors, None, predicted, Stats::one(1.0));
                                }
                                failed.push((e, f.clone()));
                                continue;
                            }
                        };
                        any_success = true;
                        if measured {
                            obs.add(Name::KinesisRecordsPut, None, predicted, Stats::one(1.0));
                            obs.add(
                                Name::KinesisRecordsDataPut,
                                None,
                                predicted,
                                Stats::one(r.data.len() as f64),
                            );
                            obs.add(Name::AllErrors, None, predicted, Stats::one(0.0));
                        }
                        if !r.lands_safely_anywhere && landed != shard_id(&x.map, r.shard) {
                            x.sink.misrouted(r.clone(), landed.to_string());
                        } else {
                            x.sink.observe_delivered(
                                &mut obs,
                                &r.members,
                                Some(landed).filter(|l| !l.is_empty()).or(predicted),
                                tries[e] - 1,
                            );
                            let mut o = x.sink.lock();
                            o.counters.bytes_delivered += r.billed_size() as u64;
                            if self.firehose.is_some() {
                                o.counters.firehose_billed_units +=
                                    r.billed_size().div_ceil(FIREHOSE_BILLING_UNIT_BYTES) as u64;
                            } else {
                                o.counters.put_payload_units +=
                                    r.billed_size().div_ceil(25 * 1024) as u64;
                            }
                            drop(o);
                            x.sink.delivered(&r.members);
                        }
                    }
                    lead.record(&obs);
                }
                Err(f) => {
                    if measured {
                        obs.add(Name::ErrorsByCode, Some(&f.code), None, Stats::one(1.0));
                        obs.add(Name::AllErrors, None, None, Stats::one(1.0));
                        lead.record(&obs);
                    }
                    lead.lock().counters.request_errors += 1;
                    if f.kind == FailureKind::Throttled {
                        for &e in &send {
                            records[e].sink.lock().counters.throttled_entries += 1;
                        }
                    }
                    whole_call_failed = true;
                    failed = send.iter().map(|&e| (e, f.clone())).collect();
                }
            }
            // Sent entries leave `todo`; what failed and may be retried comes back below.
            let mut sent = vec![false; records.len()];
            for &e in &send {
                sent[e] = true;
            }
            todo.retain(|&e| !sent[e]);
            if let Some(limiter) = &self.limiter {
                // A shard that took entries is not throttling; one that throttled some has
                // reached its limit; anything else that failed used none of its capacity.
                let mut throttled = Vec::new();
                let mut other = Vec::new();
                for (e, f) in &failed {
                    sent[*e] = false;
                    if !whole_call_failed && f.kind == FailureKind::Throttled {
                        throttled.push(*e);
                    } else {
                        other.push(*e);
                    }
                }
                let took = send.iter().copied().filter(|&e| sent[e]);
                limiter.accepted(shard_usage(&records, took));
                limiter.throttled(shard_usage(&records, throttled.into_iter()));
                limiter.refund(shard_usage(&records, other.into_iter()));
            }
            if failed.is_empty() {
                continue;
            }
            if failed.iter().any(|(_, f)| f.kind == FailureKind::Throttled) {
                self.note_held_back();
            }
            // Records that retrying cannot help fail now; the rest wait and go again.
            let (retry, hopeless): (Vec<_>, Vec<_>) = failed
                .into_iter()
                .partition(|(_, f)| f.kind.is_retryable_now());
            for (e, f) in hopeless {
                let x = &records[e];
                x.sink.fail(
                    &x.record.members,
                    &f,
                    known_shard(&x.map, x.record.shard),
                    tries[e] - 1,
                );
            }
            if retry.is_empty() {
                continue;
            }
            if any_success && self.config.reset_backoff_if_success {
                backoff.reset();
            }
            // Throttled entries are paced by the limiter (their shard's refill); the rest, and
            // all without a limiter, back off.
            let paced = |f: &Failure| {
                self.limiter.is_some() && !whole_call_failed && f.kind == FailureKind::Throttled
            };
            let now = Instant::now();
            let delay = if retry.iter().any(|(_, f)| !paced(f)) {
                backoff.next()
            } else {
                Duration::ZERO
            };
            // While fluentd shuts down, the shutdown budget replaces the attempt count and the
            // delivery's own deadline.
            let draining = self.draining();
            for (e, f) in retry {
                let x = &records[e];
                let attempt = tries[e];
                let retry_at = if paced(&f) {
                    now + crate::rate_limit::THROTTLE_REFILL
                } else {
                    now + delay
                };
                let give_up = if draining {
                    (retry_at > self.deadline_with_drain(x.sink.deadline)).then(|| {
                        format!("after {attempt} attempts, at the end of the shutdown budget")
                    })
                } else if attempt > self.config.max_retries {
                    Some(format!("after {attempt} attempts"))
                } else if retry_at > x.sink.deadline {
                    Some(format!(
                        "after {attempt} attempts, at the {:?} delivery deadline",
                        self.config.deadline
                    ))
                } else {
                    None
                };
                match give_up {
                    Some(why) => {
                        let f = Failure::new(f.kind, f.code, format!("{} ({why})", f.message));
                        x.sink.fail(
                            &x.record.members,
                            &f,
                            known_shard(&x.map, x.record.shard),
                            attempt - 1,
                        );
                    }
                    None => {
                        if !paced(&f) {
                            ready_at[e] = retry_at;
                        }
                        todo.push(e);
                    }
                }
            }
            todo.sort_unstable();
        }
    }

    /// The entries of `todo` that go in the next call, in order, with how long the call waits
    /// for their shards (at most [`ADMIT_AHEAD`]); and when nothing can go, when to look again
    /// (and whether that wait is the rate limiter's). An entry goes once its backoff is over
    /// and, with the limiter, its shard can take it; one whose delivery deadline (or the
    /// shutdown budget) has come goes regardless of the limiter.
    fn admit(
        &self,
        records: &[Entry],
        todo: &[usize],
        ready_at: &[Instant],
        now: Instant,
    ) -> (Vec<usize>, Duration, (Instant, bool)) {
        let ready = |e: usize| ready_at[e] <= now;
        let (admitted, go_after, limiter_wait) = match &self.limiter {
            Some(limiter) => {
                let a = limiter.admit(
                    todo.iter().map(|&e| {
                        let x = &records[e];
                        crate::rate_limit::Offer {
                            shard: shard_id(&x.map, x.record.shard),
                            records: 1,
                            bytes: x.record.billed_size(),
                            ready: ready(e),
                        }
                    }),
                    ADMIT_AHEAD,
                );
                (a.admitted, a.go_after, a.next)
            }
            None => (
                todo.iter().map(|&e| ready(e)).collect(),
                Duration::ZERO,
                None,
            ),
        };
        let deadlines: Vec<Instant> = todo
            .iter()
            .map(|&e| self.deadline_with_drain(records[e].sink.deadline))
            .collect();
        let send: Vec<usize> = todo
            .iter()
            .zip(&admitted)
            .zip(&deadlines)
            .filter(|&((&e, &go), &deadline)| go || (ready(e) && now >= deadline))
            .map(|((&e, _), _)| e)
            .collect();
        let backoff_over = todo.iter().map(|&e| ready_at[e]).filter(|&t| t > now).min();
        let deadline = deadlines.iter().copied().min();
        let limiter_at = limiter_wait.map(|w| now + w);
        let wake = [backoff_over, deadline, limiter_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + self.config.backoff_base);
        let for_limiter = limiter_at.is_some_and(|t| t <= wake);
        (send, go_after, (wake.max(now), for_limiter))
    }
}

/// How far ahead the rate limiter admits an entry into a call: a call waits this long at most
/// for its shards to refill, rather than leave entries for a later, partial call (at the
/// default 150 %, a shard's second 1 MiB aggregate in a row comes a third of a second after
/// its first; at 100 %, after a second, and it goes in a later call instead).
const ADMIT_AHEAD: Duration = Duration::from_millis(500);

/// Sleeps until `until`; entries whose delivery stops meanwhile leave `todo` at once (through
/// `drop_stopped`), and the sleep ends early when none is left.
async fn sleep_unless_all_stopped(
    records: &[Entry],
    todo: &mut Vec<usize>,
    until: Instant,
    tries: &[u32],
    drop_stopped: &impl Fn(&mut Vec<usize>, &[u32]),
) {
    loop {
        drop_stopped(todo, tries);
        if todo.is_empty() {
            return;
        }
        let mut stops: Vec<&Sink> = Vec::new();
        for &e in todo.iter() {
            let s = &*records[e].sink;
            if !stops.iter().any(|x| std::ptr::eq(*x, s)) {
                stops.push(s);
            }
        }
        let any_stop =
            futures::future::select_all(stops.iter().map(|s| Box::pin(s.stop.cancelled())));
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => return,
            _ = any_stop => {}
        }
    }
}

/// A Kinesis (or Firehose) record in a call, with the delivery it belongs to. Dropping it
/// settles it for that delivery (its outcome was recorded first, or it stays pending).
struct Entry {
    record: KinesisRecord,
    /// The shard map the record was planned with (`record.shard` indexes it).
    map: Arc<ShardMap>,
    sink: Arc<Sink>,
}

impl Entry {
    fn new(record: KinesisRecord, map: Arc<ShardMap>, sink: Arc<Sink>) -> Self {
        sink.outstanding.fetch_add(1, Ordering::SeqCst);
        Entry { record, map, sink }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.sink.outstanding.fetch_sub(1, Ordering::SeqCst);
        self.sink.settled.notify_waiters();
    }
}

/// Where a delivery's results go: the per-record outcome, records confirmed but not yet passed to
/// the delivery's progress callback, and records that landed on an unexpected shard. Shared with
/// the calls carrying the delivery's records.
struct Sink {
    outcome: Mutex<BatchOutcome>,
    metrics: Option<Arc<Metrics>>,
    stream: String,
    /// Each user record's size, kept only for the UserRecordsDataPut metric: the batch itself
    /// is let go once planned, unless its records may be planned again.
    sizes: Option<Vec<u32>>,
    /// When the records arrived in fluentd's buffer.
    arrived: SystemTime,
    /// When the delivery gives up retrying (unless fluentd is shutting down).
    deadline: Instant,
    /// Fired when the delivery's caller stops it.
    stop: CancelToken,
    confirmed: Mutex<Vec<u32>>,
    /// Entries of this delivery in calls (or waiting for one), and the signal when one settles
    /// or records are confirmed.
    outstanding: AtomicUsize,
    settled: Notify,
    misrouted: Mutex<Vec<(KinesisRecord, String)>>,
}

impl Sink {
    /// Records what a plan made: the refused user records, and the records to send.
    fn planned(&self, records: &[KinesisRecord], refused: Vec<Refused>) {
        let mut o = self.lock();
        for r in refused {
            let i = o.failure_index(&Failure::new(
                FailureKind::Invalid,
                "RecordRefused",
                r.reason,
            ));
            o.status[r.index as usize] = RecordStatus::Refused(i);
        }
        o.counters.kinesis_records += records.len() as u64;
        o.counters.aggregates += records.iter().filter(|r| r.members.len() > 1).count() as u64;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BatchOutcome> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks records delivered; the delivery passes them to its progress callback.
    fn delivered(&self, members: &[u32]) {
        if members.is_empty() {
            return;
        }
        self.lock().deliver(members);
        self.confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(members);
        self.settled.notify_waiters();
    }

    /// Passes the records confirmed since the last call to the delivery's progress callback.
    fn pass_confirmed(&self, on_delivered: OnDelivered<'_>) {
        let confirmed =
            std::mem::take(&mut *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()));
        if !confirmed.is_empty() {
            on_delivered(&confirmed);
        }
    }

    fn misrouted(&self, record: KinesisRecord, landed: String) {
        self.misrouted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((record, landed));
    }

    fn take_misrouted(&self) -> Vec<(KinesisRecord, String)> {
        std::mem::take(&mut *self.misrouted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Marks records failed for good, and measures them.
    fn fail(&self, members: &[u32], f: &Failure, shard: Option<&str>, retries: u32) {
        self.lock().fail(members, f);
        self.observe_failed(members, shard, retries);
    }

    fn observe_failed(&self, members: &[u32], shard: Option<&str>, retries: u32) {
        if self.metrics.is_none() || members.is_empty() {
            return;
        }
        let n = members.len();
        let mut obs = Observations::default();
        obs.add(Name::UserRecordsPut, None, shard, Stats::repeated(0.0, n));
        obs.add(
            Name::RetriesPerRecord,
            None,
            shard,
            Stats::repeated(retries as f64, n),
        );
        self.record(&obs);
    }

    /// The user-record metrics of records a response delivered to `shard`.
    fn observe_delivered<'o>(
        &self,
        obs: &mut Observations<'o>,
        members: &[u32],
        shard: Option<&'o str>,
        retries: u32,
    ) {
        if self.metrics.is_none() {
            return;
        }
        let n = members.len();
        obs.add(Name::UserRecordsPut, None, shard, Stats::repeated(1.0, n));
        if let Some(sizes) = &self.sizes {
            let sizes = members.iter().map(|&i| f64::from(sizes[i as usize]));
            if let Some(s) = Stats::of(sizes) {
                obs.add(Name::UserRecordsDataPut, None, shard, s);
            }
        }
        let buffered = SystemTime::now()
            .duration_since(self.arrived)
            .unwrap_or_default();
        obs.add(
            Name::BufferingTime,
            None,
            shard,
            Stats::repeated(buffered.as_secs_f64() * 1000.0, n),
        );
        obs.add(
            Name::RetriesPerRecord,
            None,
            shard,
            Stats::repeated(retries as f64, n),
        );
    }

    fn record(&self, obs: &Observations<'_>) {
        if let Some(m) = &self.metrics {
            m.record(&self.stream, obs);
        }
    }
}

/// The request's body becomes `body` (written by [`request_body`]) before it is signed: the
/// SDK serialized the call without its records.
fn with_body(body: Bytes) -> impl Fn(&mut HttpRequest) + Send + Sync + 'static {
    move |req| {
        req.headers_mut()
            .insert("Content-Length", body.len().to_string());
        *req.body_mut() = SdkBody::from(body.clone());
    }
}

/// A batch call's answers, one per entry in order: `fields` gives an entry's error code,
/// message and (Kinesis) shard.
fn answers<T>(
    service: Service,
    entries: &[T],
    fields: impl Fn(&T) -> (Option<&str>, Option<&str>, Option<&str>),
) -> Vec<EntryAnswer> {
    entries
        .iter()
        .map(|r| {
            let (code, message, shard) = fields(r);
            entry_answer(service, code, message, shard)
        })
        .collect()
}

/// How much longer than the interval between deliveries a partial call waits for the next one.
const LINGER_MARGIN: f64 = 1.5;

/// How long after entries last waited for their shard (or were throttled) partial calls wait
/// only `linger` (at least; `linger_max` if longer).
const LIMIT_MEMORY: Duration = Duration::from_secs(10);

/// When the open call `held` goes (see [`Producer::open_call_due`]), given the smoothed
/// interval between the stream's deliveries (`None` while unknown or while shards are at their
/// limit).
fn open_call_due(c: &ProducerConfig, interval: Option<Duration>, held: &Held) -> Instant {
    let cap = held.since + c.deadline / 4;
    if let Some(gap) = interval.filter(|_| !c.linger_max.is_zero()) {
        let wait = gap.mul_f64(LINGER_MARGIN);
        if wait <= c.linger_max {
            // Each delivery that adds to the call gives it another wait for the next one: on a
            // steady stream whose chunks are smaller than a call, a call takes the tail of one
            // chunk, all of the next and the head of the third.
            let due = (held.last + wait.max(c.linger)).min(held.since + c.linger_max.max(c.linger));
            return due.min(cap);
        }
    }
    (held.since + c.linger).min(cap)
}

/// When a stream's deliveries arrive (hand their records to the pipe).
struct Arrivals {
    last: Instant,
    /// The interval between arrivals, smoothed (half the last one, half the earlier ones).
    interval: Option<Duration>,
}

impl Arrivals {
    fn arrived(&mut self, now: Instant) {
        let gap = now.duration_since(self.last);
        self.interval = Some(match self.interval {
            Some(i) => (i + gap) / 2,
            None => gap,
        });
        self.last = now;
    }
}

/// One entry of a batch call's answer: failed with `code`, else delivered (to `shard`, for
/// Kinesis).
fn entry_answer(
    service: Service,
    code: Option<&str>,
    message: Option<&str>,
    shard: Option<&str>,
) -> EntryAnswer {
    match code {
        Some(code) => Err(classify_code_for(
            service,
            code,
            None,
            message.unwrap_or(""),
        )),
        None => Ok(shard.map(str::to_string)),
    }
}

fn cancelled() -> Failure {
    Failure::new(
        FailureKind::Cancelled,
        "Cancelled",
        "not sent: the wait for this delivery was abandoned (thread killed or raised); fluentd sends these records again",
    )
}

/// What the `entries` of `records` take from their shards' rate limits: (shard, records, bytes).
fn shard_usage<'a>(
    records: &'a [Entry],
    entries: impl Iterator<Item = usize> + 'a,
) -> impl Iterator<Item = (&'a str, usize, usize)> + 'a {
    entries.map(move |e| {
        let x = &records[e];
        (shard_id(&x.map, x.record.shard), 1, x.record.billed_size())
    })
}

/// The predicted shard's id, when the map was listed (for metrics' ShardId dimension).
fn known_shard(map: &ShardMap, index: usize) -> Option<&str> {
    Some(shard_id(map, index)).filter(|s| *s != UNKNOWN_SHARD)
}

fn shard_id(map: &ShardMap, index: usize) -> &str {
    map.shards()
        .get(index)
        .map_or(UNKNOWN_SHARD, |s| s.id.as_str())
}

/// Whether every user record would pass the KCL's range check on `shard`.
fn all_within(batch: &RecordBatch, members: &[u32], shard: &Shard) -> bool {
    members.iter().all(|&m| {
        let i = m as usize;
        let hash = batch
            .explicit_hash_key(i)
            .unwrap_or_else(|| partition_key_hash(batch.partition_key(i).unwrap_or("")));
        hash >= shard.start && hash <= shard.end
    })
}

/// Exponential backoff with equal jitter: half the step fixed, half random.
struct Backoff {
    base: Duration,
    max: Duration,
    step: u32,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, step: 0 }
    }

    fn reset(&mut self) {
        self.step = 0;
    }

    fn next(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.step.min(20))
            .min(self.max);
        self.step += 1;
        let half = exp / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_call_wait_follows_the_interval_between_deliveries_up_to_its_max() {
        let secs = Duration::from_secs_f64;
        let t0 = Instant::now();
        let held = |since: f64, last: f64| Held {
            since: t0 + secs(since),
            last: t0 + secs(last),
            generation: 0,
            mine: 1,
        };
        // The wait after one push, as an offset from it.
        let wait = |c: &ProducerConfig, interval: Option<Duration>| {
            open_call_due(c, interval, &held(0.0, 0.0)) - t0
        };
        let mut c = ProducerConfig {
            linger: secs(1.0),
            deadline: secs(120.0),
            ..ProducerConfig::default()
        };
        // Fixed: the interval does not matter, nor do later pushes.
        assert_eq!(wait(&c, Some(secs(4.0))), secs(1.0));
        assert_eq!(
            open_call_due(&c, Some(secs(4.0)), &held(0.0, 0.9)) - t0,
            secs(1.0),
            "a fixed wait counts from the first entry"
        );
        c.linger_max = secs(10.0);
        assert_eq!(wait(&c, None), secs(1.0), "no interval known yet");
        assert_eq!(wait(&c, Some(secs(0.2))), secs(1.0), "never below linger");
        assert_eq!(wait(&c, Some(secs(4.0))), secs(6.0));
        assert_eq!(
            wait(&c, Some(secs(8.0))),
            secs(1.0),
            "chunks too far apart: waiting would not fill the call"
        );
        // Following the interval, each push into the call gives it another wait...
        assert_eq!(
            open_call_due(&c, Some(secs(1.0)), &held(0.0, 1.0)) - t0,
            secs(2.5)
        );
        assert_eq!(
            open_call_due(&c, Some(secs(0.2)), &held(0.0, 0.5)) - t0,
            secs(1.5),
            "never below linger after the last push"
        );
        // ...up to linger_max after the first.
        assert_eq!(
            open_call_due(&c, Some(secs(4.0)), &held(0.0, 8.0)) - t0,
            secs(10.0)
        );
        c.deadline = secs(16.0);
        assert_eq!(
            wait(&c, Some(secs(4.0))),
            secs(4.0),
            "a quarter of the deadline"
        );
        assert_eq!(
            open_call_due(&c, Some(secs(2.0)), &held(0.0, 3.0)) - t0,
            secs(4.0),
            "a quarter of the deadline after the first entry"
        );

        let t0 = Instant::now();
        let mut a = Arrivals {
            last: t0,
            interval: None,
        };
        a.arrived(t0 + secs(2.0));
        assert_eq!(a.interval, Some(secs(2.0)));
        a.arrived(t0 + secs(6.0));
        assert_eq!(
            a.interval,
            Some(secs(3.0)),
            "half the last, half the earlier"
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..6).map(|_| b.next()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[2] >= Duration::from_millis(200) && d[2] <= Duration::from_millis(400));
        assert!(d[5] >= Duration::from_millis(500) && d[5] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
