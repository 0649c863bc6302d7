//! Everything the producer can be told: where to send, with which credentials, how to batch,
//! how hard to retry.

use std::time::Duration;

use crate::kpl::DEFAULT_MAX_RECORD_BYTES;
use crate::metrics::MetricsConfig;

/// PutRecords' own limits.
pub const MAX_ENTRIES_PER_REQUEST: usize = 500;
pub const MAX_BYTES_PER_REQUEST: usize = 5 * 1024 * 1024;
/// PutRecordBatch's own limits (Amazon Data Firehose, direct PUT).
pub const FIREHOSE_MAX_ENTRIES_PER_REQUEST: usize = 500;
pub const FIREHOSE_MAX_BYTES_PER_REQUEST: usize = 4 * 1024 * 1024;
/// The largest Firehose record: 1,000 KiB.
pub const FIREHOSE_MAX_RECORD_BYTES: usize = 1_024_000;
/// Firehose bills ingestion per record rounded up to this many bytes (5 KB).
pub const FIREHOSE_BILLING_UNIT_BYTES: usize = 5 * 1024;

/// Where records go, and in what shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A Kinesis data stream. `aggregate`: user records travel in KPL aggregates
    /// (`kinesis_streams_aggregated`), else one Kinesis record each (`kinesis_streams`).
    Streams { aggregate: bool },
    /// An Amazon Data Firehose delivery stream (direct PUT), one Firehose record per user record,
    /// or with `pack`, many newline-delimited user records per Firehose record.
    Firehose { pack: bool },
}

impl Destination {
    pub fn is_firehose(self) -> bool {
        matches!(self, Destination::Firehose { .. })
    }

    /// What the destination is called in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Destination::Streams { .. } => "stream",
            Destination::Firehose { .. } => "delivery stream",
        }
    }
}

/// Where credentials come from. Secrets are never printed: `Debug` is written by hand.
#[derive(Clone, Default)]
pub enum Credentials {
    /// The SDK's default chain: environment, shared profile, web identity, ECS, EC2 IMDSv2.
    #[default]
    DefaultChain,
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    /// A profile from a shared credentials file.
    Profile {
        path: Option<String>,
        profile_name: Option<String>,
    },
    /// STS AssumeRole on top of `source` credentials.
    AssumeRole {
        role_arn: String,
        session_name: String,
        external_id: Option<String>,
        policy: Option<String>,
        duration: Option<Duration>,
        sts_endpoint: Option<String>,
        sts_region: Option<String>,
        source: Box<Credentials>,
    },
    /// STS AssumeRoleWithWebIdentity (EKS IRSA).
    WebIdentity {
        role_arn: String,
        session_name: String,
        token_file: String,
        policy: Option<String>,
    },
    /// The ECS container credentials endpoint.
    Ecs,
    /// EC2 instance profile through IMDSv2.
    InstanceProfile {
        endpoint: Option<String>,
        retries: Option<u32>,
        connect_timeout: Option<Duration>,
        read_timeout: Option<Duration>,
    },
    /// An external program printing credentials as JSON (credential_process).
    Process { command: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::DefaultChain => f.write_str("DefaultChain"),
            Credentials::Static { session_token, .. } => write!(f, "Static {{ access_key_id: **, secret_access_key: **, session_token: {} }}", if session_token.is_some() { "**" } else { "none" }),
            Credentials::Profile { path, profile_name } => write!(f, "Profile {{ path: {path:?}, profile_name: {profile_name:?} }}"),
            Credentials::AssumeRole { role_arn, session_name, source, .. } => write!(f, "AssumeRole {{ role_arn: {role_arn:?}, session_name: {session_name:?}, source: {source:?} }}"),
            Credentials::WebIdentity { role_arn, token_file, .. } => write!(f, "WebIdentity {{ role_arn: {role_arn:?}, token_file: {token_file:?} }}"),
            Credentials::Ecs => f.write_str("Ecs"),
            Credentials::InstanceProfile { endpoint, .. } => write!(f, "InstanceProfile {{ endpoint: {endpoint:?} }}"),
            Credentials::Process { .. } => f.write_str("Process { command: ** }"),
        }
    }
}

/// How user records get their partition keys, and so how they are grouped into aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMode {
    /// One random 32-hex-character key per aggregate, shared by its user records: spreads load
    /// evenly over the shards and is always safe for the KCL's shard-range check.
    RandomPerAggregate,
    /// Every record under this one key (one shard).
    Fixed(String),
    /// Each record brings its own partition key (or explicit hash key): aggregates are built per
    /// predicted shard so every user record hashes into the shard its aggregate lands on.
    PerRecord,
}

/// The producer's settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// `http://host:port` (optionally with user:password@) for an HTTP(S) proxy.
    pub http_proxy: Option<String>,
    /// PEM file of extra certificate authorities to trust.
    pub ca_file: Option<String>,
    pub connect_timeout: Duration,
    /// Timeout of one HTTP attempt.
    pub request_timeout: Duration,
    pub credentials: Credentials,
    /// Kinesis (aggregated or not) or Firehose.
    pub destination: Destination,
    /// The Kinesis record limit of the stream (data plus partition key): 1 MiB unless raised.
    pub max_record_bytes: usize,
    /// The most an aggregate may weigh (at most `max_record_bytes`).
    pub aggregation_max_bytes: usize,
    pub batch_max_entries: usize,
    pub batch_max_bytes: usize,
    /// Batch calls in flight at once, across all deliveries.
    pub concurrency: usize,
    /// How long a partial batch call (the last of a delivery) may wait for the next delivery's
    /// records to fill it; zero sends it at once.
    pub linger: Duration,
    /// Nonzero: the wait follows how often deliveries of the stream arrive. It is 1.5 times the
    /// recent interval between them when that is at most `linger_max`, and never less than
    /// `linger`: on a steady stream whose chunks come every few seconds, a partial call waits
    /// for the next chunk instead of going out part full. Zero: always `linger`.
    pub linger_max: Duration,
    /// Per-shard rate limit in percent of Kinesis' 1 MiB/s and 1000 records/s; 0 turns it off.
    pub rate_limit_percent: u32,
    /// Retries after the first attempt, per PutRecords entry.
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Start the backoff again when an attempt delivered anything.
    pub reset_backoff_if_success: bool,
    /// The most time one batch may take, retries included.
    pub deadline: Duration,
    pub key_mode: KeyMode,
    /// Per shard, one Kinesis record in flight at a time, retried until it lands before the
    /// next is sent: each partition key's records reach the stream in the order given.
    pub keep_order: bool,
    /// Text appended to the SDK's user agent.
    pub user_agent_suffix: Option<String>,
    /// The KPL's CloudWatch metrics (off by default).
    pub metrics: MetricsConfig,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            region: None,
            endpoint: None,
            http_proxy: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            credentials: Credentials::DefaultChain,
            destination: Destination::Streams { aggregate: true },
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            aggregation_max_bytes: DEFAULT_MAX_RECORD_BYTES,
            batch_max_entries: MAX_ENTRIES_PER_REQUEST,
            batch_max_bytes: MAX_BYTES_PER_REQUEST,
            concurrency: 8,
            linger: Duration::ZERO,
            linger_max: Duration::ZERO,
            rate_limit_percent: 150,
            max_retries: 8,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            reset_backoff_if_success: true,
            deadline: Duration::from_secs(120),
            key_mode: KeyMode::RandomPerAggregate,
            keep_order: false,
            user_agent_suffix: None,
            metrics: MetricsConfig::default(),
        }
    }
}

impl ProducerConfig {
    /// Checks the limits and returns a message saying what to change.
    pub fn validate(&self) -> Result<(), String> {
        use crate::kpl::MAX_RECORD_BYTES_LIMIT;
        if let Destination::Firehose { .. } = self.destination {
            return self.validate_firehose();
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(format!("max record size {} is out of range: Kinesis allows 1 byte to 10 MiB ({MAX_RECORD_BYTES_LIMIT})", self.max_record_bytes));
        }
        if self.aggregation_max_bytes < 64 || self.aggregation_max_bytes > self.max_record_bytes {
            return Err(format!(
                "aggregation size {} must be between 64 bytes and the max record size {}",
                self.aggregation_max_bytes, self.max_record_bytes
            ));
        }
        if self.batch_max_entries == 0 || self.batch_max_entries > MAX_ENTRIES_PER_REQUEST {
            return Err(format!(
                "batch_request_max_count {} is out of range: PutRecords takes 1 to 500 records",
                self.batch_max_entries
            ));
        }
        if self.batch_max_bytes < self.max_record_bytes.min(MAX_BYTES_PER_REQUEST)
            || self.batch_max_bytes > MAX_BYTES_PER_REQUEST.max(self.max_record_bytes)
        {
            return Err(format!("batch_request_max_size {} is out of range: it must hold one record ({} bytes) and PutRecords takes at most 5 MiB ({MAX_BYTES_PER_REQUEST})", self.batch_max_bytes, self.max_record_bytes.min(MAX_BYTES_PER_REQUEST)));
        }
        if self.concurrency == 0 {
            return Err("request concurrency must be at least 1".into());
        }
        self.metrics.validate()?;
        if self.keep_order && self.destination != (Destination::Streams { aggregate: true }) {
            return Err("keep_order is a setting of kinesis_streams_aggregated".into());
        }
        if self.keep_order && self.key_mode == KeyMode::RandomPerAggregate {
            return Err("keep_order needs partition_key (or fixed_partition_key): with a random key per aggregate, records have no key whose order could be kept".into());
        }
        if let KeyMode::Fixed(k) = &self.key_mode {
            crate::hashkey::validate_partition_key(k)
                .map_err(|e| format!("fixed_partition_key: {e}"))?;
        }
        Ok(())
    }

    fn validate_firehose(&self) -> Result<(), String> {
        if self.max_record_bytes == 0 || self.max_record_bytes > FIREHOSE_MAX_RECORD_BYTES {
            return Err(format!("max_record_size {} is out of range: a Firehose record holds 1 to 1,024,000 bytes (1,000 KiB)", self.max_record_bytes));
        }
        if self.batch_max_entries == 0 || self.batch_max_entries > FIREHOSE_MAX_ENTRIES_PER_REQUEST
        {
            return Err(format!(
                "batch_request_max_count {} is out of range: PutRecordBatch takes 1 to 500 records",
                self.batch_max_entries
            ));
        }
        if self.batch_max_bytes < self.max_record_bytes
            || self.batch_max_bytes > FIREHOSE_MAX_BYTES_PER_REQUEST
        {
            return Err(format!("batch_request_max_size {} is out of range: it must hold one record ({} bytes) and PutRecordBatch takes at most 4 MiB ({FIREHOSE_MAX_BYTES_PER_REQUEST})", self.batch_max_bytes, self.max_record_bytes));
        }
        if self.concurrency == 0 {
            return Err("request concurrency must be at least 1".into());
        }
        if self.keep_order {
            return Err("keep_order is a setting of kinesis_streams_aggregated".into());
        }
        if self.metrics.level != crate::metrics::Level::None {
            return Err("the KPL's CloudWatch metrics are for Kinesis data streams; Firehose publishes its own (AWS/Firehose IncomingRecords, IncomingBytes, ThrottledRecords)".into());
        }
        Ok(())
    }
}
