//! `FluentPluginKinesisRs::Native::Producer`, `::Formatter` and `::Delivery`.
//!
//! Ruby values are converted to Rust data first (a chunk is formatted where Ruby keeps it,
//! without the GVL); the rest of the work (aggregation, network) runs as a task on the
//! process-wide tokio runtime, which the Ruby thread waits for without the GVL (see `nogvl`);
//! results become Ruby values after the GVL is back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use magnus::rb_sys::AsRawValue;
use magnus::{prelude::*, Error, RArray, RHash, RModule, RString, Ruby, TryConvert};
use tokio::runtime::Runtime;

use kinesis_core::batch::RecordBatch;
use kinesis_core::chunk::{format_chunk, FormatError, FormatSpec, FormattedChunk};
use kinesis_core::delivery::{ChunkOutcome, Delivery, EventBits, Job};
use kinesis_core::hashkey::parse_explicit_hash_key;
use kinesis_core::producer::Producer;
use kinesis_core::progress::ProgressFile;
use kinesis_core::runtime::runtime;

use crate::errors::error_class;
use crate::nogvl;
use crate::options::{format_spec, producer_config};

fn error(ruby: &Ruby, class: &str, msg: impl Into<String>) -> Error {
    Error::new(error_class(ruby, class), msg.into())
}

fn rt(ruby: &Ruby) -> Result<Arc<Runtime>, Error> {
    runtime().map_err(|e| {
        error(
            ruby,
            "InternalError",
            format!("cannot start the tokio runtime: {e}"),
        )
    })
}

/// Copies a Ruby string's bytes (the GVL is held; the copy may then travel without it).
fn bytes_of(s: RString) -> Vec<u8> {
    // SAFETY: the GVL is held and the slice is copied before any Ruby code can run.
    unsafe { s.as_slice() }.to_vec()
}

/// Formats a chunk's events (skipping those `previously` handled) on this thread without the
/// GVL, reading the bytes where Ruby keeps them rather than copying them: the string is locked
/// (Ruby code that would modify it raises instead) and referenced from this frame and the
/// caller's, so it is neither freed nor moved meanwhile.
fn format_in_place(
    ruby: &Ruby,
    spec: &FormatSpec,
    chunk: RString,
    tag: Option<&str>,
    previously: Option<&EventBits>,
) -> Result<FormattedChunk, Error> {
    let raw = chunk.as_raw();
    // SAFETY: `raw` is a live String; rb_str_locktmp raises (caught by protect) if it is locked.
    magnus::rb_sys::protect(|| unsafe { rb_sys::rb_str_locktmp(raw) })?;
    // SAFETY: the string is locked, so its bytes stay where they are until it is unlocked.
    let bytes = unsafe { chunk.as_slice() };
    let skip = |i: u32| previously.is_some_and(|p| p.get(i));
    let result = nogvl::compute(ruby, || format_chunk(spec, bytes, tag, &skip));
    // SAFETY: locked above; unlocking cannot raise (this thread holds the lock).
    unsafe { rb_sys::rb_str_unlocktmp(raw) };
    std::hint::black_box(chunk);
    match result? {
        Ok(formatted) => Ok(formatted),
        Err(FormatError::NeedsRuby(why)) => Err(error(ruby, "NeedsRubyFormattingError", why)),
        Err(e @ FormatError::Corrupt(_)) => Err(error(ruby, "CorruptChunkError", e.to_string())),
    }
}

/// Where a chunk's progress is persisted: `[path, chunk_id]` from the plugin, or nil.
fn progress_file(path: Option<String>, chunk_id: RString) -> Option<ProgressFile> {
    path.map(|p| ProgressFile {
        path: PathBuf::from(p),
        chunk_id: bytes_of(chunk_id),
    })
}

#[magnus::wrap(
    class = "FluentPluginKinesisRs::Native::Formatter",
    free_immediately,
    size
)]
pub struct RbFormatter {
    spec: Arc<FormatSpec>,
}

impl RbFormatter {
    fn new(ruby: &Ruby, options: RHash) -> Result<Self, Error> {
        Ok(RbFormatter {
            spec: Arc::new(format_spec(ruby, options)?),
        })
    }
}

#[magnus::wrap(
    class = "FluentPluginKinesisRs::Native::Producer",
    free_immediately,
    size
)]
pub struct RbProducer {
    inner: Mutex<Option<Arc<Producer>>>,
}

impl RbProducer {
    /// Builds the client (credentials providers, TLS) on the runtime, without the GVL.
    fn new(ruby: &Ruby, options: RHash) -> Result<Self, Error> {
        let config = producer_config(ruby, options)?;
        let rt = rt(ruby)?;
        let built = nogvl::run(ruby, &rt, Producer::new(config))?;
        let producer = built.map_err(|e| error(ruby, "ConfigurationError", e))?;
        Ok(RbProducer {
            inner: Mutex::new(Some(Arc::new(producer))),
        })
    }

    fn producer(&self, ruby: &Ruby) -> Result<Arc<Producer>, Error> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| error(ruby, "ClosedError", "the producer is closed"))
    }

    /// Checks the stream (its open shards) or delivery stream (ACTIVE, direct PUT); returns
    /// what to log ("is reachable with 2 open shard(s)"). Raises StreamError saying what to fix.
    fn check_destination(ruby: &Ruby, rb_self: &Self, stream: String) -> Result<String, Error> {
        let producer = rb_self.producer(ruby)?;
        let noun = producer.config().destination.noun();
        let name = stream.clone();
        let result = nogvl::run(ruby, &*rt(ruby)?, async move {
            producer.check_destination(&name).await
        })?;
        result.map_err(|f| error(ruby, "StreamError", format!("{noun} {stream:?}: {f}")))
    }

    /// Starts formatting and delivering a chunk in fluentd's standard format; returns the
    /// Delivery to wait for.
    #[allow(clippy::too_many_arguments)]
    fn start_chunk(
        ruby: &Ruby,
        rb_self: &Self,
        stream: String,
        formatter: &RbFormatter,
        chunk: RString,
        tag: Option<String>,
        previously: Option<RString>,
        progress: Option<String>,
        chunk_id: RString,
        created_at: f64,
    ) -> Result<RbDelivery, Error> {
        let previously = previously.map(|p| EventBits(bytes_of(p)));
        let formatted = format_in_place(
            ruby,
            &formatter.spec,
            chunk,
            tag.as_deref(),
            previously.as_ref(),
        )?;
        rb_self.start(
            ruby,
            stream,
            Job::Formatted(formatted),
            previously,
            progress,
            chunk_id,
            created_at,
        )
    }

    /// Starts delivering records formatted in Ruby: `records` is an Array of
    /// `[event_index, data, partition_key or nil, explicit_hash_key or nil]`.
    #[allow(clippy::too_many_arguments)]
    fn start_records(
        ruby: &Ruby,
        rb_self: &Self,
        stream: String,
        records: RArray,
        event_count: u32,
        previously: Option<RString>,
        progress: Option<String>,
        chunk_id: RString,
        created_at: f64,
    ) -> Result<RbDelivery, Error> {
        let mut batch = RecordBatch::with_capacity(records.len(), 0);
        let mut events = Vec::with_capacity(records.len());
        let mut refused = Vec::new();
        for entry in records.into_iter() {
            let entry = RArray::try_convert(entry)?;
            let event: u32 = entry.entry(0)?;
            let data: RString = entry.entry(1)?;
            let key: Option<String> = entry.entry(2)?;
            let ehk: Option<String> = entry.entry(3)?;
            let ehk = match ehk.as_deref().map(parse_explicit_hash_key) {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(e)) => {
                    refused.push((event, e.to_string()));
                    continue;
                }
            };
            // SAFETY: the GVL is held; the bytes are copied into the batch at once.
            batch.push(unsafe { data.as_slice() }, key.as_deref(), ehk);
            events.push(event);
        }
        let job = Job::Records {
            batch,
            events,
            event_count,
            refused,
        };
        rb_self.start(
            ruby,
            stream,
            job,
            previously.map(|p| EventBits(bytes_of(p))),
            progress,
            chunk_id,
            created_at,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        ruby: &Ruby,
        stream: String,
        job: Job,
        previously: Option<EventBits>,
        progress: Option<String>,
        chunk_id: RString,
        created_at: f64,
    ) -> Result<RbDelivery, Error> {
        let producer = self.producer(ruby)?;
        let file = progress_file(progress, chunk_id);
        let rt = rt(ruby)?;
        // The chunk's creation time (Unix seconds): when its events arrived in the buffer.
        let arrived = if created_at.is_finite() && created_at > 0.0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs_f64(created_at)
        } else {
            SystemTime::now()
        };
        let delivery = Delivery::start(
            &rt,
            producer,
            stream,
            job,
            previously.as_ref(),
            file,
            arrived,
        );
        Ok(RbDelivery { inner: delivery })
    }

    /// Deliveries in progress send the partial calls they hold for more records now.
    fn send_open_calls(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        rb_self.producer(ruby)?.send_open_calls();
        Ok(())
    }

    /// fluentd is shutting down: deliveries retry until `seconds` from now, past their own
    /// retry limit and deadline, so everything buffered gets out.
    fn begin_drain(ruby: &Ruby, rb_self: &Self, seconds: f64) -> Result<(), Error> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(error(
                ruby,
                "ConfigurationError",
                format!("shutdown budget {seconds} is not a number of seconds"),
            ));
        }
        rb_self
            .producer(ruby)?
            .begin_drain(Duration::from_secs_f64(seconds));
        Ok(())
    }

    /// Stops the periodic CloudWatch uploads and sends what was measured since the last one,
    /// waiting at most `seconds`. Returns the messages about failed uploads not yet taken.
    fn flush_metrics(ruby: &Ruby, rb_self: &Self, seconds: f64) -> Result<Vec<String>, Error> {
        let producer = rb_self.producer(ruby)?;
        let Some(metrics) = producer.metrics().cloned() else {
            return Ok(Vec::new());
        };
        let budget = Duration::from_secs_f64(if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        });
        let m = metrics.clone();
        let done = nogvl::run(ruby, &*rt(ruby)?, async move {
            tokio::time::timeout(budget, m.shutdown()).await.is_ok()
        })?;
        let mut messages = metrics.take_messages();
        if !done {
            messages.push(format!("CloudWatch metrics: the final upload did not finish within {seconds} s; what it carried is dropped"));
        }
        Ok(messages)
    }

    /// Messages about failed CloudWatch uploads since the last call (at most one per upload).
    fn metrics_messages(ruby: &Ruby, rb_self: &Self) -> Result<Vec<String>, Error> {
        Ok(rb_self
            .producer(ruby)?
            .metrics()
            .map(|m| m.take_messages())
            .unwrap_or_default())
    }

    /// Upload counters (`{"requests" =>, "failed_requests" =>, "data_sent" =>, "data_dropped" =>}`),
    /// nil when metrics are off.
    fn metrics_counters(ruby: &Ruby, rb_self: &Self) -> Result<Option<RHash>, Error> {
        let Some(m) = rb_self.producer(ruby)?.metrics().cloned() else {
            return Ok(None);
        };
        let c = m.counters();
        let h = ruby.hash_new();
        h.aset("requests", c.requests)?;
        h.aset("failed_requests", c.failed_requests)?;
        h.aset("data_sent", c.data_sent)?;
        h.aset("data_dropped", c.data_dropped)?;
        Ok(Some(h))
    }

    /// Drops the client. Idempotent. Deliveries still running keep their own reference.
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn is_closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
}

/// `FluentPluginKinesisRs::Native::Delivery`: one chunk's delivery running on the runtime.
#[magnus::wrap(
    class = "FluentPluginKinesisRs::Native::Delivery",
    free_immediately,
    size
)]
pub struct RbDelivery {
    inner: Arc<Delivery>,
}

impl RbDelivery {
    /// Waits for the delivery to finish and returns its outcome (once). Ruby interrupts are
    /// processed meanwhile; if one raises, the exception propagates, the delivery starts no new
    /// request, and a later `wait` on this object still returns the outcome.
    fn wait(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let d = &rb_self.inner;
        nogvl::wait(ruby, &*rt(ruby)?, d.finished_token(), || d.stop())?;
        match d.take_result() {
            None if d.is_finished() => Err(nogvl::internal_error(
                ruby,
                "the delivery ended without a result: it panicked, or its result was already taken",
            )),
            None => Err(nogvl::internal_error(ruby, "the delivery has not finished")),
            Some(outcome) => outcome_hash(ruby, &outcome, d.progress_file_error()),
        }
    }

    fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Events delivered so far (a bit per event), earlier attempts included.
    fn progress(ruby: &Ruby, rb_self: &Self) -> RString {
        ruby.str_from_slice(&rb_self.inner.progress().0)
    }

    /// Start no new request; requests in flight finish.
    fn stop(&self) {
        self.inner.stop();
    }
}

/// `Native.read_progress(path, chunk_id)`: the bits persisted for the chunk, nil if there is
/// no file; ProgressError if the file cannot be used.
fn read_progress(ruby: &Ruby, path: String, chunk_id: RString) -> Result<Option<RString>, Error> {
    let file = progress_file(Some(path), chunk_id).expect("a path was given");
    match file.read() {
        Ok(bits) => Ok(bits.map(|b| ruby.str_from_slice(&b.0))),
        Err(e) => Err(error(ruby, "ProgressError", e.to_string())),
    }
}

/// `Native.write_progress(path, chunk_id, bits)`: replaces the file atomically.
fn write_progress(
    ruby: &Ruby,
    path: String,
    chunk_id: RString,
    bits: RString,
) -> Result<(), Error> {
    let file = progress_file(Some(path), chunk_id).expect("a path was given");
    file.write(&EventBits(bytes_of(bits)))
        .map_err(|e| error(ruby, "ProgressError", e.to_string()))
}

/// `Native.remove_progress(path)`.
fn remove_progress(ruby: &Ruby, path: String) -> Result<(), Error> {
    let file = ProgressFile {
        path: PathBuf::from(path),
        chunk_id: Vec::new(),
    };
    file.remove()
        .map_err(|e| error(ruby, "ProgressError", e.to_string()))
}

fn outcome_hash(
    ruby: &Ruby,
    o: &ChunkOutcome,
    progress_file_error: Option<String>,
) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    h.aset("progress_file_error", progress_file_error)?;
    h.aset("events", o.event_count)?;
    h.aset("delivered", ruby.str_from_slice(&o.delivered.0))?;
    h.aset("delivered_count", o.delivered.count())?;
    let refused = ruby.ary_new_capa(o.refused.len());
    for (event, reason) in &o.refused {
        refused.push((*event, reason.as_str()))?;
    }
    h.aset("refused", refused)?;
    let failures = ruby.ary_new_capa(o.failures.len());
    for (f, n) in &o.failures {
        failures.push((f.kind.name(), f.code.as_str(), f.message.as_str(), *n))?;
    }
    h.aset("failures", failures)?;
    let counters = ruby.hash_new();
    for (name, v) in o.counters.pairs() {
        counters.aset(name, v)?;
    }
    h.aset("counters", counters)?;
    Ok(h)
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let formatter = native.define_class("Formatter", ruby.class_object())?;
    formatter.define_singleton_method("new", magnus::function!(RbFormatter::new, 1))?;
    let producer = native.define_class("Producer", ruby.class_object())?;
    producer.define_singleton_method("new", magnus::function!(RbProducer::new, 1))?;
    producer.define_method(
        "check_destination",
        magnus::method!(RbProducer::check_destination, 1),
    )?;
    producer.define_method("start_chunk", magnus::method!(RbProducer::start_chunk, 8))?;
    producer.define_method(
        "start_records",
        magnus::method!(RbProducer::start_records, 7),
    )?;
    producer.define_method("begin_drain", magnus::method!(RbProducer::begin_drain, 1))?;
    producer.define_method(
        "send_open_calls",
        magnus::method!(RbProducer::send_open_calls, 0),
    )?;
    producer.define_method(
        "flush_metrics",
        magnus::method!(RbProducer::flush_metrics, 1),
    )?;
    producer.define_method(
        "metrics_messages",
        magnus::method!(RbProducer::metrics_messages, 0),
    )?;
    producer.define_method(
        "metrics_counters",
        magnus::method!(RbProducer::metrics_counters, 0),
    )?;
    producer.define_method("close", magnus::method!(RbProducer::close, 0))?;
    producer.define_method("closed?", magnus::method!(RbProducer::is_closed, 0))?;
    let delivery = native.define_class("Delivery", ruby.class_object())?;
    delivery.undef_default_alloc_func();
    delivery.define_method("wait", magnus::method!(RbDelivery::wait, 0))?;
    delivery.define_method("finished?", magnus::method!(RbDelivery::is_finished, 0))?;
    delivery.define_method("progress", magnus::method!(RbDelivery::progress, 0))?;
    delivery.define_method("stop", magnus::method!(RbDelivery::stop, 0))?;
    native.define_module_function("read_progress", magnus::function!(read_progress, 2))?;
    native.define_module_function("write_progress", magnus::function!(write_progress, 3))?;
    native.define_module_function("remove_progress", magnus::function!(remove_progress, 1))?;
    Ok(())
}
