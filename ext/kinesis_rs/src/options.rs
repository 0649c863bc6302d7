//! Reading the option hashes the Ruby plugin passes (String keys) into core configuration.

use std::time::Duration;

use magnus::{prelude::*, r_hash::ForEach, Error, RHash, Ruby, TryConvert, Value};

use kinesis_core::chunk::{
    ruby_time_format, Compression, DataFormat, FormatSpec, Inject, TimeType, TimeZoneSpec,
};
use kinesis_core::config::{Credentials, Destination, KeyMode, ProducerConfig};
use kinesis_core::metrics::{Granularity, Level, MetricsConfig};

use crate::errors::error_class;

pub fn config_error(ruby: &Ruby, msg: impl Into<String>) -> Error {
    Error::new(error_class(ruby, "ConfigurationError"), msg.into())
}

/// Typed access to a Hash with String keys; refuses keys it was not asked about, so a typo in
/// the Ruby plugin fails loudly instead of being ignored.
pub struct Opts<'r> {
    ruby: &'r Ruby,
    hash: RHash,
    what: &'static str,
    seen: std::cell::RefCell<Vec<String>>,
}

impl<'r> Opts<'r> {
    pub fn new(ruby: &'r Ruby, hash: RHash, what: &'static str) -> Self {
        Opts {
            ruby,
            hash,
            what,
            seen: Default::default(),
        }
    }

    pub fn get<T: TryConvert>(&self, key: &str) -> Result<Option<T>, Error> {
        self.seen.borrow_mut().push(key.to_string());
        match self.hash.get(key) {
            None => Ok(None),
            Some(v) if v.is_nil() => Ok(None),
            Some(v) => T::try_convert(v)
                .map(Some)
                .map_err(|e| config_error(self.ruby, format!("{} option {key}: {e}", self.what))),
        }
    }

    pub fn secs(&self, key: &str) -> Result<Option<Duration>, Error> {
        match self.get::<f64>(key)? {
            Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(config_error(
                self.ruby,
                format!("{} option {key}: {s} is not a number of seconds", self.what),
            )),
            None => Ok(None),
        }
    }

    pub fn sub(&self, key: &str) -> Result<Option<Opts<'r>>, Error> {
        Ok(self
            .get::<RHash>(key)?
            .map(|h| Opts::new(self.ruby, h, self.what)))
    }

    /// Fails on keys nobody asked for.
    pub fn finish(&self) -> Result<(), Error> {
        let seen = self.seen.borrow();
        let mut unknown = Vec::new();
        self.hash.foreach(|k: String, _v: Value| {
            if !seen.contains(&k) {
                unknown.push(k);
            }
            Ok(ForEach::Continue)
        })?;
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(config_error(
                self.ruby,
                format!("unknown {} option(s): {}", self.what, unknown.join(", ")),
            ))
        }
    }
}

fn credentials(ruby: &Ruby, o: &Opts) -> Result<Credentials, Error> {
    let kind: String = o.get("type")?.unwrap_or_else(|| "default".into());
    let req = |key: &str| -> Result<String, Error> {
        o.get::<String>(key)?
            .ok_or_else(|| config_error(ruby, format!("{kind} credentials need {key}")))
    };
    let c = match kind.as_str() {
        "default" => Credentials::DefaultChain,
        "static" => Credentials::Static {
            access_key_id: req("access_key_id")?,
            secret_access_key: req("secret_access_key")?,
            session_token: o.get("session_token")?,
        },
        "shared" => Credentials::Profile {
            path: o.get("path")?,
            profile_name: o.get("profile_name")?,
        },
        "assume_role" => Credentials::AssumeRole {
            role_arn: req("role_arn")?,
            session_name: req("role_session_name")?,
            external_id: o.get("external_id")?,
            policy: o.get("policy")?,
            duration: o.get::<u64>("duration_seconds")?.map(Duration::from_secs),
            sts_endpoint: o.get("sts_endpoint_url")?,
            sts_region: o.get("sts_region")?,
            source: Box::new(match o.sub("source")? {
                Some(s) => {
                    let c = credentials(ruby, &s)?;
                    s.finish()?;
                    c
                }
                None => Credentials::DefaultChain,
            }),
        },
        "web_identity" => Credentials::WebIdentity {
            role_arn: req("role_arn")?,
            session_name: req("role_session_name")?,
            token_file: req("web_identity_token_file")?,
            policy: o.get("policy")?,
        },
        "ecs" => Credentials::Ecs,
        "instance_profile" => Credentials::InstanceProfile {
            endpoint: o.get("endpoint")?,
            retries: o.get("retries")?,
            connect_timeout: o.secs("http_open_timeout")?,
            read_timeout: o.secs("http_read_timeout")?,
        },
        "process" => Credentials::Process {
            command: req("process")?,
        },
        other => {
            return Err(config_error(
                ruby,
                format!("unknown credentials type {other:?}"),
            ))
        }
    };
    Ok(c)
}

/// The CloudWatch metrics settings (`metrics` sub-hash; off when absent).
fn metrics_config(ruby: &Ruby, o: &Opts) -> Result<MetricsConfig, Error> {
    let d = MetricsConfig::default();
    let err = |e: String| config_error(ruby, e);
    Ok(MetricsConfig {
        level: match o.get::<String>("level")? {
            Some(l) => Level::parse(&l).map_err(err)?,
            None => d.level,
        },
        granularity: match o.get::<String>("granularity")? {
            Some(g) => Granularity::parse(&g).map_err(err)?,
            None => d.granularity,
        },
        namespace: o.get("namespace")?.unwrap_or(d.namespace),
        upload_interval: o.secs("upload_interval")?.unwrap_or(d.upload_interval),
        endpoint: o.get("endpoint")?,
        region: o.get("region")?,
        request_compression: o
            .get("request_compression")?
            .unwrap_or(d.request_compression),
    })
}

/// The producer's configuration from the plugin's options.
pub fn producer_config(ruby: &Ruby, hash: RHash) -> Result<ProducerConfig, Error> {
    let o = Opts::new(ruby, hash, "producer");
    let d = ProducerConfig::default();
    let fixed_key: Option<String> = o.get("fixed_partition_key")?;
    let key_mode = match o.get::<String>("key_mode")?.as_deref().unwrap_or("random") {
        "random" => KeyMode::RandomPerAggregate,
        "per_record" => KeyMode::PerRecord,
        "fixed" => KeyMode::Fixed(
            fixed_key
                .ok_or_else(|| config_error(ruby, "key_mode fixed needs fixed_partition_key"))?,
        ),
        other => return Err(config_error(ruby, format!("unknown key_mode {other:?}"))),
    };
    let creds = match o.sub("credentials")? {
        Some(c) => {
            let creds = credentials(ruby, &c)?;
            c.finish()?;
            creds
        }
        None => Credentials::DefaultChain,
    };
    let metrics = match o.sub("metrics")? {
        Some(m) => {
            let config = metrics_config(ruby, &m)?;
            m.finish()?;
            config
        }
        None => MetricsConfig::default(),
    };
    let pack: Option<bool> = o.get("pack_records")?;
    let destination = match o
        .get::<String>("destination")?
        .as_deref()
        .unwrap_or("kinesis_streams_aggregated")
    {
        "kinesis_streams_aggregated" => Destination::Streams { aggregate: true },
        "kinesis_streams" => Destination::Streams { aggregate: false },
        "kinesis_firehose" => Destination::Firehose {
            pack: pack.unwrap_or(false),
        },
        other => {
            return Err(config_error(
                ruby,
                format!("unknown destination {other:?}: kinesis_streams_aggregated, kinesis_streams or kinesis_firehose"),
            ))
        }
    };
    if pack.is_some() && !destination.is_firehose() {
        return Err(config_error(
            ruby,
            "pack_records is a setting of kinesis_firehose",
        ));
    }
    let max_record_bytes = o
        .get::<usize>("max_record_size")?
        .unwrap_or(d.max_record_bytes);
    let config = ProducerConfig {
        region: o.get("region")?,
        endpoint: o.get("endpoint")?,
        http_proxy: o.get("http_proxy")?,
        ca_file: o.get("ca_file")?,
        connect_timeout: o.secs("connect_timeout")?.unwrap_or(d.connect_timeout),
        request_timeout: o.secs("request_timeout")?.unwrap_or(d.request_timeout),
        credentials: creds,
        destination,
        max_record_bytes,
        aggregation_max_bytes: o
            .get::<usize>("aggregation_max_size")?
            .unwrap_or(max_record_bytes),
        batch_max_entries: o
            .get("batch_request_max_count")?
            .unwrap_or(d.batch_max_entries),
        batch_max_bytes: o
            .get("batch_request_max_size")?
            .unwrap_or(d.batch_max_bytes),
        concurrency: o.get("concurrency")?.unwrap_or(d.concurrency),
        linger: o.secs("linger")?.unwrap_or(d.linger),
        linger_max: o.secs("linger_max")?.unwrap_or(d.linger_max),
        rate_limit_percent: o.get("rate_limit")?.unwrap_or(d.rate_limit_percent),
        max_retries: o.get("retries")?.unwrap_or(d.max_retries),
        backoff_base: o.secs("backoff_base")?.unwrap_or(d.backoff_base),
        backoff_max: o.secs("backoff_max")?.unwrap_or(d.backoff_max),
        reset_backoff_if_success: o
            .get("reset_backoff_if_success")?
            .unwrap_or(d.reset_backoff_if_success),
        deadline: o.secs("deadline")?.unwrap_or(d.deadline),
        key_mode,
        keep_order: o.get("keep_order")?.unwrap_or(d.keep_order),
        user_agent_suffix: o.get("user_agent")?,
        metrics,
    };
    o.finish()?;
    config.validate().map_err(|e| config_error(ruby, e))?;
    Ok(config)
}

/// The formatting spec from the plugin's options. Raises NeedsRubyFormattingError when the
/// configuration (not a record) is beyond the fast path, so the plugin formats in Ruby.
pub fn format_spec(ruby: &Ruby, hash: RHash) -> Result<FormatSpec, Error> {
    use kinesis_core::chunk::InvalidUtf8;
    let o = Opts::new(ruby, hash, "format");
    let needs_ruby = |why: String| Error::new(error_class(ruby, "NeedsRubyFormattingError"), why);
    let add_newline = o.get::<bool>("add_newline")?.unwrap_or(true);
    let data_key: Option<String> = o.get("data_key")?;
    let format = match o.get::<String>("format")?.as_deref().unwrap_or("json") {
        "json" => DataFormat::Json { add_newline },
        "single_value" => DataFormat::SingleValue {
            message_key: o.get("message_key")?.unwrap_or_else(|| "message".into()),
            add_newline,
        },
        "msgpack" => DataFormat::Msgpack,
        // data_key bypasses the formatter, so any formatter will do.
        _ if data_key.is_some() => DataFormat::Json { add_newline },
        other => return Err(needs_ruby(format!("formatter {other} is run by fluentd"))),
    };
    let compression = match o.get::<String>("compression")?.as_deref() {
        None | Some("") => Compression::None,
        Some("zlib") => Compression::Zlib,
        Some("gzip") => Compression::Gzip,
        Some(other) => {
            return Err(config_error(
                ruby,
                format!("compression {other:?}: use zlib or gzip, or leave it unset"),
            ))
        }
    };
    let mut inject = Inject::default();
    if let Some(i) = o.sub("inject")? {
        let hostname: Option<String> = i.get("hostname")?;
        if let Some(k) = i.get::<String>("hostname_key")? {
            inject.hostname = Some((k, hostname.unwrap_or_default()));
        }
        let worker_id: Option<i64> = i.get("worker_id")?;
        if let Some(k) = i.get::<String>("worker_id_key")? {
            inject.worker_id = Some((k, worker_id.unwrap_or(0)));
        }
        inject.tag_key = i.get("tag_key")?;
        if let Some(k) = i.get::<String>("time_key")? {
            let tt = match i.get::<String>("time_type")?.as_deref().unwrap_or("string") {
                "unixtime" => TimeType::Unixtime,
                "unixtime_millis" => TimeType::UnixtimeMillis,
                "unixtime_micros" => TimeType::UnixtimeMicros,
                "unixtime_nanos" => TimeType::UnixtimeNanos,
                "float" => TimeType::Float,
                "string" => {
                    let fmt: String = i
                        .get("time_format")?
                        .unwrap_or_else(|| "%Y-%m-%dT%H:%M:%S.%N%z".into());
                    let items = ruby_time_format(&fmt).ok_or_else(|| {
                        needs_ruby(format!("time_format {fmt:?} is formatted by fluentd"))
                    })?;
                    let zone = match i.get::<Value>("zone")? {
                        None => TimeZoneSpec::Local,
                        Some(v) => match String::try_convert(v) {
                            Ok(s) if s == "utc" => TimeZoneSpec::Utc,
                            Ok(s) if s == "local" => TimeZoneSpec::Local,
                            Ok(s) => {
                                return Err(needs_ruby(format!(
                                    "time zone {s:?} is formatted by fluentd"
                                )))
                            }
                            Err(_) => TimeZoneSpec::Fixed(i32::try_convert(v)?),
                        },
                    };
                    TimeType::String { items, zone }
                }
                other => {
                    return Err(needs_ruby(format!(
                        "time_type {other:?} is formatted by fluentd"
                    )))
                }
            };
            inject.time = Some((k, tt));
        }
        i.get::<Value>("zone")?;
        i.get::<Value>("time_format")?;
        i.get::<Value>("time_type")?;
        i.finish()?;
    }
    let invalid_utf8 = match o.get::<String>("invalid_utf8")?.as_deref() {
        None | Some("replace") => InvalidUtf8::Replace,
        Some("error") => InvalidUtf8::Refuse,
        Some(other) => {
            return Err(config_error(
                ruby,
                format!("invalid_utf8 {other:?}: use replace or error"),
            ))
        }
    };
    let spec = FormatSpec {
        format,
        data_key,
        chomp_record: o.get("chomp_record")?.unwrap_or(false),
        append_newline: o.get("append_new_line")?.unwrap_or(false),
        compression,
        inject,
        partition_key_field: o.get("partition_key")?,
        explicit_hash_key_field: o.get("explicit_hash_key")?,
        max_data_bytes: o
            .get("max_record_size")?
            .unwrap_or(kinesis_core::kpl::DEFAULT_MAX_RECORD_BYTES),
        invalid_utf8,
    };
    o.finish()?;
    Ok(spec)
}
