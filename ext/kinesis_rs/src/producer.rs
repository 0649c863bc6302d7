//! `FluentPluginKinesisRs::Native::Producer` and `::Formatter`.
//!
//! Ruby values are converted to Rust data first; the work (formatting, aggregation, network)
//! runs on the process-wide tokio runtime without the GVL; results become Ruby values after the
//! GVL is back.

use std::sync::{Arc, Mutex};

use magnus::{prelude::*, Error, RArray, RHash, RModule, RString, Ruby, TryConvert};

use kinesis_core::batch::RecordBatch;
use kinesis_core::cancel::CancelToken;
use kinesis_core::chunk::{FormatError, FormatSpec};
use kinesis_core::delivery::{deliver_chunk, deliver_records, ChunkOutcome, EventBits};
use kinesis_core::hashkey::parse_explicit_hash_key;
use kinesis_core::producer::Producer;
use kinesis_core::runtime::runtime;

use crate::errors::error_class;
use crate::nogvl::{without_gvl, Interrupted};
use crate::options::{format_spec, producer_config};

fn error(ruby: &Ruby, class: &str, msg: impl Into<String>) -> Error {
    Error::new(error_class(ruby, class), msg.into())
}

fn interrupted(ruby: &Ruby, i: Interrupted) -> Error {
    match i {
        Interrupted::NotStarted => error(ruby, "InterruptedError", "interrupted before the work started; nothing was sent"),
        Interrupted::Panicked(m) => error(ruby, "InternalError", format!("internal error in the Rust extension ({m}); the chunk will be retried. Please report this.")),
    }
}

/// Copies a Ruby string's bytes (the GVL is held; the copy may then travel without it).
fn bytes_of(s: RString) -> Vec<u8> {
    // SAFETY: the GVL is held and the slice is copied before any Ruby code can run.
    unsafe { s.as_slice() }.to_vec()
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
        let rt = runtime().map_err(|e| {
            error(
                ruby,
                "InternalError",
                format!("cannot start the tokio runtime: {e}"),
            )
        })?;
        let cancel = CancelToken::new();
        let built = without_gvl(&cancel, || rt.block_on(Producer::new(config)))
            .map_err(|i| interrupted(ruby, i))?;
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

    /// Lists the stream's open shards; returns how many. Raises StreamError saying what to fix.
    fn check_stream(ruby: &Ruby, rb_self: &Self, stream: String) -> Result<usize, Error> {
        let producer = rb_self.producer(ruby)?;
        let rt = runtime().map_err(|e| error(ruby, "InternalError", e.to_string()))?;
        let cancel = CancelToken::new();
        let result = without_gvl(&cancel, || {
            rt.block_on(async {
                tokio::select! {
                    r = producer.check_stream(&stream) => Some(r),
                    _ = cancel.cancelled() => None,
                }
            })
        })
        .map_err(|i| interrupted(ruby, i))?;
        match result {
            None => Err(error(ruby, "InterruptedError", "stream check interrupted")),
            Some(Ok(map)) => Ok(map.len()),
            Some(Err(f)) => Err(error(
                ruby,
                "StreamError",
                format!("stream {stream:?}: {f}"),
            )),
        }
    }

    /// Formats and delivers a chunk in fluentd's standard format.
    fn put_chunk(
        ruby: &Ruby,
        rb_self: &Self,
        stream: String,
        formatter: &RbFormatter,
        chunk: RString,
        tag: Option<String>,
        previously: Option<RString>,
    ) -> Result<RHash, Error> {
        let producer = rb_self.producer(ruby)?;
        let spec = formatter.spec.clone();
        let chunk = bytes_of(chunk);
        let previously = previously.map(|p| EventBits(bytes_of(p)));
        let rt = runtime().map_err(|e| error(ruby, "InternalError", e.to_string()))?;
        let cancel = CancelToken::new();
        let result = without_gvl(&cancel, || {
            rt.block_on(deliver_chunk(
                &producer,
                &stream,
                &spec,
                &chunk,
                tag.as_deref(),
                previously.as_ref(),
                &cancel,
            ))
        })
        .map_err(|i| interrupted(ruby, i))?;
        match result {
            Ok(outcome) => outcome_hash(ruby, &outcome),
            Err(FormatError::NeedsRuby(why)) => Err(error(ruby, "NeedsRubyFormattingError", why)),
            Err(e @ FormatError::Corrupt(_)) => {
                Err(error(ruby, "CorruptChunkError", e.to_string()))
            }
        }
    }

    /// Delivers records formatted in Ruby: `records` is an Array of
    /// `[event_index, data, partition_key or nil, explicit_hash_key or nil]`.
    fn put_records(
        ruby: &Ruby,
        rb_self: &Self,
        stream: String,
        records: RArray,
        event_count: u32,
        previously: Option<RString>,
    ) -> Result<RHash, Error> {
        let producer = rb_self.producer(ruby)?;
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
        let previously = previously.map(|p| EventBits(bytes_of(p)));
        let rt = runtime().map_err(|e| error(ruby, "InternalError", e.to_string()))?;
        let cancel = CancelToken::new();
        let mut outcome = without_gvl(&cancel, || {
            rt.block_on(deliver_records(
                &producer,
                &stream,
                batch,
                &events,
                event_count,
                previously.as_ref(),
                &cancel,
            ))
        })
        .map_err(|i| interrupted(ruby, i))?;
        outcome.refused.extend(refused);
        outcome.refused.sort_by_key(|r| r.0);
        outcome_hash(ruby, &outcome)
    }

    /// Drops the client. Idempotent.
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

fn outcome_hash(ruby: &Ruby, o: &ChunkOutcome) -> Result<RHash, Error> {
    let h = ruby.hash_new();
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
    producer.define_method("check_stream", magnus::method!(RbProducer::check_stream, 1))?;
    producer.define_method("put_chunk", magnus::method!(RbProducer::put_chunk, 5))?;
    producer.define_method("put_records", magnus::method!(RbProducer::put_records, 4))?;
    producer.define_method("close", magnus::method!(RbProducer::close, 0))?;
    producer.define_method("closed?", magnus::method!(RbProducer::is_closed, 0))?;
    Ok(())
}
