//! The KPL's CloudWatch metrics: the same names, units, levels and dimensions, kept as statistic
//! sets (sum, minimum, maximum, sample count) and uploaded with PutMetricData at an interval.
//!
//! Recording is cheap and never waits on the network: the producer adds each response's
//! observations under one short lock, at the finest level the granularity keeps (shard, stream
//! or global). At upload time every metric is also counted at its parent levels, as the KPL does
//! (`ShardId` → `StreamName` → no dimension; `ErrorsByCode` has `ErrorCode` above the stream), so
//! `UserRecordsPut`'s Average at any level is the success rate. A failed upload is reported once
//! for its interval (see [`Metrics::take_messages`]) and dropped, never retried: the KPL does
//! the same, and delivery never depends on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};

use crate::cancel::CancelToken;

/// How much is measured: the KPL's `MetricsLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    #[default]
    None,
    Summary,
    Detailed,
}

impl Level {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Level::None),
            "summary" => Ok(Level::Summary),
            "detailed" => Ok(Level::Detailed),
            _ => Err(format!(
                "metrics_level {s:?}: use none, summary or detailed"
            )),
        }
    }
}

/// The finest dimension kept: the KPL's `MetricsGranularity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Granularity {
    Global,
    Stream,
    #[default]
    Shard,
}

impl Granularity {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "global" => Ok(Granularity::Global),
            "stream" => Ok(Granularity::Stream),
            "shard" => Ok(Granularity::Shard),
            _ => Err(format!(
                "metrics_granularity {s:?}: use global, stream or shard"
            )),
        }
    }
}

/// The metrics, spelled as the KPL sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Name {
    UserRecordsReceived,
    UserRecordsPending,
    UserRecordsPut,
    UserRecordsDataPut,
    KinesisRecordsPut,
    KinesisRecordsDataPut,
    ErrorsByCode,
    AllErrors,
    RetriesPerRecord,
    BufferingTime,
    RequestTime,
    UserRecordsPerKinesisRecord,
    KinesisRecordsPerPutRecordsRequest,
    UserRecordsPerPutRecordsRequest,
}

impl Name {
    pub const ALL: [Name; 14] = [
        Name::UserRecordsReceived,
        Name::UserRecordsPending,
        Name::UserRecordsPut,
        Name::UserRecordsDataPut,
        Name::KinesisRecordsPut,
        Name::KinesisRecordsDataPut,
        Name::ErrorsByCode,
        Name::AllErrors,
        Name::RetriesPerRecord,
        Name::BufferingTime,
        Name::RequestTime,
        Name::UserRecordsPerKinesisRecord,
        Name::KinesisRecordsPerPutRecordsRequest,
        Name::UserRecordsPerPutRecordsRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Name::UserRecordsReceived => "UserRecordsReceived",
            Name::UserRecordsPending => "UserRecordsPending",
            Name::UserRecordsPut => "UserRecordsPut",
            Name::UserRecordsDataPut => "UserRecordsDataPut",
            Name::KinesisRecordsPut => "KinesisRecordsPut",
            Name::KinesisRecordsDataPut => "KinesisRecordsDataPut",
            Name::ErrorsByCode => "ErrorsByCode",
            Name::AllErrors => "AllErrors",
            Name::RetriesPerRecord => "RetriesPerRecord",
            Name::BufferingTime => "BufferingTime",
            Name::RequestTime => "RequestTime",
            Name::UserRecordsPerKinesisRecord => "UserRecordsPerKinesisRecord",
            Name::KinesisRecordsPerPutRecordsRequest => "KinesisRecordsPerPutRecordsRequest",
            Name::UserRecordsPerPutRecordsRequest => "UserRecordsPerPutRecordsRequest",
        }
    }

    /// The lowest `metrics_level` that sends this metric.
    pub fn level(self) -> Level {
        match self {
            Name::UserRecordsPut
            | Name::KinesisRecordsPut
            | Name::ErrorsByCode
            | Name::AllErrors
            | Name::BufferingTime => Level::Summary,
            _ => Level::Detailed,
        }
    }

    pub fn unit(self) -> StandardUnit {
        match self {
            Name::UserRecordsDataPut | Name::KinesisRecordsDataPut => StandardUnit::Bytes,
            Name::BufferingTime | Name::RequestTime => StandardUnit::Milliseconds,
            _ => StandardUnit::Count,
        }
    }
}

/// A statistic set: what CloudWatch keeps of many samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub count: f64,
}

impl Stats {
    pub fn one(v: f64) -> Self {
        Stats::repeated(v, 1)
    }

    /// `n` samples of the same value.
    pub fn repeated(v: f64, n: usize) -> Self {
        Stats {
            sum: v * n as f64,
            min: v,
            max: v,
            count: n as f64,
        }
    }

    /// The samples of `values`; `None` when there are none.
    pub fn of(values: impl Iterator<Item = f64>) -> Option<Self> {
        values.map(Stats::one).reduce(|mut a, b| {
            a.merge(&b);
            a
        })
    }

    pub fn merge(&mut self, o: &Stats) {
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.count += o.count;
    }
}

/// The metrics settings; `Default` is off.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub level: Level,
    pub granularity: Granularity,
    pub namespace: String,
    pub upload_interval: Duration,
    /// CloudWatch endpoint URL (local servers, VPC endpoints); the SDK's default when `None`.
    pub endpoint: Option<String>,
    /// CloudWatch region; the producer's region when `None`.
    pub region: Option<String>,
    /// Let the SDK gzip large PutMetricData bodies, as it does by default.
    pub request_compression: bool,
}

pub const DEFAULT_NAMESPACE: &str = "KinesisProducerLibrary";

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            level: Level::None,
            granularity: Granularity::Shard,
            namespace: DEFAULT_NAMESPACE.into(),
            upload_interval: Duration::from_secs(60),
            endpoint: None,
            region: None,
            request_compression: true,
        }
    }
}

impl MetricsConfig {
    pub fn enabled(&self) -> bool {
        self.level > Level::None
    }

    pub fn validate(&self) -> Result<(), String> {
        let ns = &self.namespace;
        if ns.is_empty() || ns.len() > 255 {
            return Err(format!(
                "metrics_namespace {ns:?} must be 1 to 255 characters"
            ));
        }
        if ns.starts_with("AWS/") {
            return Err(format!("metrics_namespace {ns:?}: names starting with AWS/ are reserved for AWS services; use e.g. {DEFAULT_NAMESPACE}"));
        }
        if let Some(c) = ns.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
            return Err(format!(
                "metrics_namespace {ns:?}: {c:?} is not allowed (printable ASCII only)"
            ));
        }
        if self.upload_interval < Duration::from_secs(1) {
            return Err(format!(
                "metrics_upload_interval {:?} is too short: at least 1 second",
                self.upload_interval
            ));
        }
        Ok(())
    }
}

/// PutMetricData's limits: metric data per request, and request size. The size is estimated
/// generously per datum, so a request stays far below it.
pub const MAX_DATA_PER_REQUEST: usize = 1000;
pub const MAX_REQUEST_BYTES: usize = 1_000_000;

/// One metric at one level: its name and the ids of its dimension values (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    name: Name,
    error_code: u32,
    stream: u32,
    shard: u32,
}

impl Key {
    /// The next level up, as the KPL's metric tree has it: drop the shard, then the stream,
    /// then the error code.
    fn parent(&self) -> Option<Key> {
        let mut k = *self;
        if k.shard != 0 {
            k.shard = 0;
        } else if k.stream != 0 {
            k.stream = 0;
        } else if k.error_code != 0 {
            k.error_code = 0;
        } else {
            return None;
        }
        Some(k)
    }
}

#[derive(Default)]
struct Recorded {
    /// Dimension values, interned: id `i` is `strings[i - 1]`.
    ids: HashMap<Box<str>, u32>,
    strings: Vec<Box<str>>,
    stats: HashMap<Key, Stats>,
    /// User records in deliveries now, per stream id (the `UserRecordsPending` gauge).
    pending: HashMap<u32, i64>,
}

impl Recorded {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.ids.get(s) {
            return i;
        }
        self.strings.push(s.into());
        let i = self.strings.len() as u32;
        self.ids.insert(s.into(), i);
        i
    }

    fn string(&self, id: u32) -> &str {
        &self.strings[id as usize - 1]
    }
}

/// Observations of one response (or one event), added under one lock.
#[derive(Default)]
pub struct Observations<'a> {
    items: Vec<(Name, Option<&'a str>, Option<&'a str>, Stats)>,
}

impl<'a> Observations<'a> {
    /// One observation: `error_code` for `ErrorsByCode`, `shard` where the metric has one.
    pub fn add(
        &mut self,
        name: Name,
        error_code: Option<&'a str>,
        shard: Option<&'a str>,
        s: Stats,
    ) {
        self.items.push((name, error_code, shard, s));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// How the uploads went, for monitor_agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadCounters {
    /// PutMetricData requests that succeeded / failed.
    pub requests: u64,
    pub failed_requests: u64,
    /// Metric data sent / dropped with a failed request.
    pub data_sent: u64,
    pub data_dropped: u64,
}

/// One metric datum ready to send: name, dimensions, statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: Name,
    pub dimensions: Vec<(&'static str, String)>,
    pub stats: Stats,
}

impl Datum {
    /// A generous estimate of its size in a request body.
    fn estimated_bytes(&self) -> usize {
        256 + self
            .dimensions
            .iter()
            .map(|(n, v)| 32 + n.len() + v.len())
            .sum::<usize>()
    }

    fn to_sdk(&self, at: SystemTime) -> MetricDatum {
        let dims = self
            .dimensions
            .iter()
            .map(|(n, v)| Dimension::builder().name(*n).value(v).build())
            .collect();
        MetricDatum::builder()
            .metric_name(self.name.as_str())
            .set_dimensions(Some(dims))
            .statistic_values(
                StatisticSet::builder()
                    .sample_count(self.stats.count)
                    .sum(self.stats.sum)
                    .minimum(self.stats.min)
                    .maximum(self.stats.max)
                    .build(),
            )
            .unit(self.name.unit())
            .timestamp(at.into())
            .build()
    }
}

/// Splits data into PutMetricData requests within the API's limits.
pub fn batches(data: Vec<Datum>) -> Vec<Vec<Datum>> {
    let mut out: Vec<Vec<Datum>> = Vec::new();
    let mut bytes = 0;
    for d in data {
        let size = d.estimated_bytes();
        match out.last_mut() {
            Some(b) if b.len() < MAX_DATA_PER_REQUEST && bytes + size <= MAX_REQUEST_BYTES => {
                bytes += size;
                b.push(d);
            }
            _ => {
                bytes = size;
                out.push(vec![d]);
            }
        }
    }
    out
}

/// The producer's metrics: what was observed since the last upload, and the uploader.
pub struct Metrics {
    config: MetricsConfig,
    recorded: Mutex<Recorded>,
    client: Option<aws_sdk_cloudwatch::Client>,
    counters: Mutex<UploadCounters>,
    /// At most one message per failed upload: for the plugin's log.
    messages: Mutex<Vec<String>>,
    /// Serialises uploads, so the shutdown flush waits for a periodic upload under way.
    uploading: tokio::sync::Mutex<()>,
    stop: CancelToken,
}

impl Metrics {
    /// `client` is `None` in tests that only look at what would be sent.
    pub fn new(config: MetricsConfig, client: Option<aws_sdk_cloudwatch::Client>) -> Self {
        Metrics {
            config,
            recorded: Mutex::default(),
            client,
            counters: Mutex::default(),
            messages: Mutex::default(),
            uploading: tokio::sync::Mutex::new(()),
            stop: CancelToken::new(),
        }
    }

    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    /// Whether `name` is measured at this level (to skip computing what would be dropped).
    pub fn wants(&self, name: Name) -> bool {
        self.config.level >= name.level() && self.config.level > Level::None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one response's observations for `stream`.
    pub fn record(&self, stream: &str, obs: &Observations<'_>) {
        if obs.is_empty() {
            return;
        }
        let g = self.config.granularity;
        let mut r = self.lock();
        let stream_id = if g >= Granularity::Stream {
            r.id(stream)
        } else {
            0
        };
        for &(name, code, shard, s) in &obs.items {
            if !self.wants(name) {
                continue;
            }
            let key = Key {
                name,
                error_code: code.map_or(0, |c| r.id(c)),
                stream: stream_id,
                shard: match shard {
                    Some(id) if g >= Granularity::Shard => r.id(id),
                    _ => 0,
                },
            };
            r.stats.entry(key).and_modify(|x| x.merge(&s)).or_insert(s);
        }
    }

    /// User records entering (`delta > 0`) or leaving a delivery to `stream`.
    pub fn pending(&self, stream: &str, delta: i64) {
        if !self.wants(Name::UserRecordsPending) {
            return;
        }
        let mut r = self.lock();
        let id = r.id(stream);
        *r.pending.entry(id).or_default() += delta;
    }

    /// Takes one `UserRecordsPending` sample per stream seen (the KPL samples it regularly).
    pub fn sample_pending(&self) {
        if !self.wants(Name::UserRecordsPending) {
            return;
        }
        let samples: Vec<(String, i64)> = {
            let r = self.lock();
            r.pending
                .iter()
                .map(|(&id, &n)| (r.string(id).to_string(), n))
                .collect()
        };
        for (stream, n) in samples {
            let mut o = Observations::default();
            o.add(
                Name::UserRecordsPending,
                None,
                None,
                Stats::one(n.max(0) as f64),
            );
            self.record(&stream, &o);
        }
    }

    /// Everything observed since the last call, counted at every level up to global, sorted.
    pub fn take(&self) -> Vec<Datum> {
        let (stats, strings) = {
            let mut r = self.lock();
            let stats = std::mem::take(&mut r.stats);
            (stats, r.strings.clone())
        };
        let mut rolled: HashMap<Key, Stats> = HashMap::with_capacity(stats.len() * 2);
        for (key, s) in stats {
            let mut k = Some(key);
            while let Some(at) = k {
                rolled.entry(at).and_modify(|x| x.merge(&s)).or_insert(s);
                k = at.parent();
            }
        }
        let mut keys: Vec<Key> = rolled.keys().copied().collect();
        keys.sort();
        let string = |id: u32| strings[id as usize - 1].to_string();
        keys.into_iter()
            .map(|k| {
                let mut dimensions = Vec::new();
                if k.error_code != 0 {
                    dimensions.push(("ErrorCode", string(k.error_code)));
                }
                if k.stream != 0 {
                    dimensions.push(("StreamName", string(k.stream)));
                }
                if k.shard != 0 {
                    dimensions.push(("ShardId", string(k.shard)));
                }
                Datum {
                    name: k.name,
                    dimensions,
                    stats: rolled[&k],
                }
            })
            .collect()
    }

    pub fn counters(&self) -> UploadCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages about failed uploads since the last call, for the plugin to log.
    pub fn take_messages(&self) -> Vec<String> {
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends what was observed since the last upload. A failed request is reported (once for
    /// this upload, with what to do) and its data dropped.
    pub async fn upload(&self) {
        let Some(client) = &self.client else { return };
        let _one_at_a_time = self.uploading.lock().await;
        let data = self.take();
        if data.is_empty() {
            return;
        }
        let at = SystemTime::now();
        let mut first_error: Option<String> = None;
        let (mut failed, mut dropped) = (0u64, 0u64);
        for batch in batches(data) {
            let n = batch.len() as u64;
            let result = client
                .put_metric_data()
                .namespace(&self.config.namespace)
                .set_metric_data(Some(batch.iter().map(|d| d.to_sdk(at)).collect()))
                .send()
                .await;
            let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(_) => {
                    c.requests += 1;
                    c.data_sent += n;
                }
                Err(e) => {
                    c.failed_requests += 1;
                    c.data_dropped += n;
                    failed += 1;
                    dropped += n;
                    first_error.get_or_insert_with(|| describe_upload_error(&e));
                }
            }
        }
        if let Some(why) = first_error {
            self.messages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!(
                    "CloudWatch metrics upload to namespace {:?} failed ({failed} PutMetricData request(s), {dropped} metric data dropped; they are not retried, delivery is unaffected): {why}",
                    self.config.namespace
                ));
        }
    }

    /// Runs the periodic uploads until [`Metrics::shutdown`]: samples the pending gauge every
    /// second and uploads every `upload_interval`.
    pub fn spawn_uploader(self: &Arc<Self>) {
        let m = self.clone();
        tokio::spawn(async move {
            let mut next_upload = tokio::time::Instant::now() + m.config.upload_interval;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = m.stop.cancelled() => return,
                }
                m.sample_pending();
                if tokio::time::Instant::now() >= next_upload {
                    next_upload += m.config.upload_interval;
                    m.upload().await;
                }
            }
        });
    }

    /// Stops the periodic uploads and sends what was measured since the last one.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.upload().await;
    }
}

/// What went wrong with a PutMetricData call, and what to do about it.
fn describe_upload_error(
    e: &aws_sdk_cloudwatch::error::SdkError<
        aws_sdk_cloudwatch::operation::put_metric_data::PutMetricDataError,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> String {
    use aws_sdk_cloudwatch::error::ProvideErrorMetadata;
    let raw = e.raw_response();
    let status = raw.map(|r| r.status().as_u16());
    let body = raw
        .and_then(|r| r.body().bytes())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    // Servers answering in another error format than the SDK parses: the code is in the body.
    let code = e
        .code()
        .map(str::to_string)
        .or_else(|| xml_element(&body, "Code"))
        .unwrap_or_default();
    let message = e
        .message()
        .map(str::to_string)
        .or_else(|| xml_element(&body, "Message"))
        .unwrap_or_default();
    if code.contains("AccessDenied") || code == "UnauthorizedOperation" || status == Some(403) {
        let what = if code.is_empty() {
            "HTTP 403".to_string()
        } else {
            code
        };
        return format!("{what}: {message}. Grant cloudwatch:PutMetricData (Resource \"*\") to the credentials the plugin uses (e.g. the instance role), or set metrics_level none");
    }
    match (code.is_empty(), status) {
        (false, _) => format!("{code}: {message}"),
        (true, Some(s)) => format!("HTTP {s}: {}", body.chars().take(300).collect::<String>()),
        (true, None) => crate::error::error_chain(e),
    }
}

/// The text of the first `<name>` element of an XML body.
fn xml_element(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(body[start..end].trim().to_string()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(level: Level, granularity: Granularity) -> Metrics {
        Metrics::new(
            MetricsConfig {
                level,
                granularity,
                ..MetricsConfig::default()
            },
            None,
        )
    }

    fn find<'a>(data: &'a [Datum], name: Name, dims: &[(&str, &str)]) -> Option<&'a Datum> {
        data.iter().find(|d| {
            d.name == name
                && d.dimensions.len() == dims.len()
                && d.dimensions
                    .iter()
                    .zip(dims)
                    .all(|((n, v), (en, ev))| n == en && v == ev)
        })
    }

    #[test]
    fn counts_every_value_at_its_parent_levels() {
        let m = metrics(Level::Detailed, Granularity::Shard);
        let mut o = Observations::default();
        o.add(
            Name::UserRecordsPut,
            None,
            Some("shardId-000000000000"),
            Stats::repeated(1.0, 3),
        );
        o.add(
            Name::UserRecordsPut,
            None,
            Some("shardId-000000000001"),
            Stats::repeated(0.0, 1),
        );
        o.add(
            Name::ErrorsByCode,
            Some("ProvisionedThroughputExceededException"),
            Some("shardId-000000000001"),
            Stats::one(1.0),
        );
        m.record("s1", &o);
        let mut o = Observations::default();
        o.add(
            Name::UserRecordsPut,
            None,
            Some("shardId-000000000000"),
            Stats::repeated(1.0, 4),
        );
        o.add(
            Name::RequestTime,
            None,
            None,
            Stats::of([10.0, 30.0].into_iter()).unwrap(),
        );
        m.record("s2", &o);
        let d = m.take();
        let put = |dims: &[(&str, &str)]| find(&d, Name::UserRecordsPut, dims).unwrap().stats;
        assert_eq!(
            put(&[("StreamName", "s1"), ("ShardId", "shardId-000000000000")]),
            Stats::repeated(1.0, 3)
        );
        let s1 = put(&[("StreamName", "s1")]);
        assert_eq!((s1.sum, s1.count, s1.min, s1.max), (3.0, 4.0, 0.0, 1.0));
        let global = put(&[]);
        assert_eq!((global.sum, global.count), (7.0, 8.0));
        // ErrorsByCode: shard → stream → error code alone → no dimension.
        let code = "ProvisionedThroughputExceededException";
        for dims in [
            &[
                ("ErrorCode", code),
                ("StreamName", "s1"),
                ("ShardId", "shardId-000000000001"),
            ][..],
            &[("ErrorCode", code), ("StreamName", "s1")][..],
            &[("ErrorCode", code)][..],
            &[][..],
        ] {
            assert_eq!(
                find(&d, Name::ErrorsByCode, dims).unwrap().stats.sum,
                1.0,
                "{dims:?}"
            );
        }
        let rt = find(&d, Name::RequestTime, &[]).unwrap().stats;
        assert_eq!((rt.sum, rt.min, rt.max, rt.count), (40.0, 10.0, 30.0, 2.0));
        // Taken: the next upload starts from zero.
        assert!(m.take().is_empty());
    }

    #[test]
    fn granularity_and_level_filter_what_is_kept() {
        let m = metrics(Level::Summary, Granularity::Stream);
        let mut o = Observations::default();
        o.add(
            Name::UserRecordsPut,
            None,
            Some("shardId-000000000000"),
            Stats::one(1.0),
        );
        o.add(
            Name::UserRecordsDataPut,
            None,
            Some("shardId-000000000000"),
            Stats::one(200.0),
        );
        m.record("s", &o);
        let d = m.take();
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(find(&d, Name::UserRecordsPut, &[("StreamName", "s")]).is_some());
        assert!(find(&d, Name::UserRecordsPut, &[]).is_some());
        assert!(d.iter().all(|x| x.name != Name::UserRecordsDataPut));

        let m = metrics(Level::Detailed, Granularity::Global);
        m.record("s", &o);
        let d = m.take();
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|x| x.dimensions.is_empty()));

        let m = metrics(Level::None, Granularity::Shard);
        m.record("s", &o);
        assert!(m.take().is_empty());
        assert!(!m.wants(Name::UserRecordsPut));
    }

    #[test]
    fn pending_is_sampled_per_stream() {
        let m = metrics(Level::Detailed, Granularity::Shard);
        m.pending("s", 500);
        m.sample_pending();
        m.pending("s", -200);
        m.sample_pending();
        let d = m.take();
        let p = find(&d, Name::UserRecordsPending, &[("StreamName", "s")])
            .unwrap()
            .stats;
        assert_eq!((p.sum, p.count, p.min, p.max), (800.0, 2.0, 300.0, 500.0));
    }

    #[test]
    fn batches_stay_within_put_metric_data_limits() {
        let datum = |i: usize| Datum {
            name: Name::UserRecordsPut,
            dimensions: vec![
                ("StreamName", "s".repeat(200)),
                ("ShardId", format!("shardId-{i:012}")),
            ],
            stats: Stats::one(1.0),
        };
        let b = batches((0..2500).map(datum).collect());
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 2500);
        for req in &b {
            assert!(req.len() <= MAX_DATA_PER_REQUEST);
            assert!(req.iter().map(Datum::estimated_bytes).sum::<usize>() <= MAX_REQUEST_BYTES);
        }
        assert_eq!(b.len(), 3);
        // Big dimension values: the byte limit cuts first.
        let big = |_| Datum {
            name: Name::UserRecordsPut,
            dimensions: vec![
                ("StreamName", "s".repeat(1000)),
                ("ShardId", "x".repeat(1000)),
            ],
            stats: Stats::one(1.0),
        };
        let b = batches((0..1000).map(big).collect());
        assert!(
            b.len() > 1
                && b.iter()
                    .all(|r| r.iter().map(Datum::estimated_bytes).sum::<usize>()
                        <= MAX_REQUEST_BYTES)
        );
    }

    #[test]
    fn names_levels_and_units_are_the_kpls() {
        let summary: Vec<&str> = Name::ALL
            .iter()
            .filter(|n| n.level() == Level::Summary)
            .map(|n| n.as_str())
            .collect();
        assert_eq!(
            summary,
            [
                "UserRecordsPut",
                "KinesisRecordsPut",
                "ErrorsByCode",
                "AllErrors",
                "BufferingTime"
            ]
        );
        assert_eq!(Name::UserRecordsDataPut.unit(), StandardUnit::Bytes);
        assert_eq!(Name::BufferingTime.unit(), StandardUnit::Milliseconds);
        assert_eq!(Name::RetriesPerRecord.unit(), StandardUnit::Count);
    }

    #[test]
    fn reads_error_codes_the_sdk_could_not_parse() {
        let body = "<ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message>not allowed</Message></Error></Errors></ErrorResponse>";
        assert_eq!(xml_element(body, "Code").as_deref(), Some("AccessDenied"));
        assert_eq!(xml_element(body, "Message").as_deref(), Some("not allowed"));
        assert_eq!(xml_element(body, "Nope"), None);
    }

    #[test]
    fn namespace_rules() {
        let c = |ns: &str| {
            MetricsConfig {
                namespace: ns.into(),
                ..MetricsConfig::default()
            }
            .validate()
        };
        assert!(c("KinesisProducerLibrary").is_ok());
        assert!(c("AWS/Kinesis").unwrap_err().contains("reserved"));
        assert!(c("").is_err());
        assert!(c("bad\u{7}").is_err());
    }
}
