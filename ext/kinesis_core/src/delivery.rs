//! One fluentd buffer chunk, start to finish: deliver its user records (formatted by the caller,
//! which skipped the events an earlier attempt delivered), keep the progress as responses
//! arrive, and report per event.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::batch::RecordBatch;
use crate::cancel::{on_drop, CancelToken};
use crate::chunk::FormattedChunk;
use crate::error::Failure;
use crate::producer::{Counters, Producer, RecordStatus};
use crate::progress::ProgressFile;

/// A bit per chunk event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBits(pub Vec<u8>);

impl EventBits {
    pub fn new(events: u32) -> Self {
        EventBits(vec![0; (events as usize).div_ceil(8)])
    }

    pub fn get(&self, i: u32) -> bool {
        self.0
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    pub fn set(&mut self, i: u32) {
        let byte = (i / 8) as usize;
        if byte >= self.0.len() {
            self.0.resize(byte + 1, 0);
        }
        self.0[byte] |= 1 << (i % 8);
    }

    pub fn count(&self) -> u32 {
        self.0.iter().map(|b| b.count_ones()).sum()
    }
}

/// What became of a chunk's events.
#[derive(Debug, Default)]
pub struct ChunkOutcome {
    pub event_count: u32,
    /// Events delivered, by this attempt or an earlier one.
    pub delivered: EventBits,
    /// Events that can never be sent as they are, and why: for fluentd's error stream.
    pub refused: Vec<(u32, String)>,
    /// Distinct reasons events were not delivered, with how many events each.
    pub failures: Vec<(Failure, u32)>,
    pub counters: Counters,
}

impl ChunkOutcome {
    /// Events neither delivered nor refused: fluentd must retry the chunk for them.
    pub fn undelivered(&self) -> u32 {
        self.failures.iter().map(|(_, n)| n).sum()
    }
}

/// What to deliver for one chunk.
pub enum Job {
    /// The chunk's events formatted by [`crate::chunk::format_chunk`] (which the caller runs
    /// where the chunk's bytes are, so they need not be copied).
    Formatted(FormattedChunk),
    /// User records formatted by the plugin (fluentd's formatter); `events[i]` is the chunk
    /// event of record `i`.
    Records {
        batch: RecordBatch,
        events: Vec<u32>,
        event_count: u32,
        /// Events the plugin already found unsendable.
        refused: Vec<(u32, String)>,
    },
}

/// One chunk's delivery, running on the runtime on its own. The thread that started it waits
/// for it, and may stop waiting (a Ruby interrupt) and come back: the delivery goes on
/// regardless, and keeps its progress, in memory and (with a file buffer) on disk.
pub struct Delivery {
    /// Fired to stop starting new requests (the waiter was killed): in-flight ones finish.
    stop: CancelToken,
    finished: CancelToken,
    result: Mutex<Option<ChunkOutcome>>,
    progress: Arc<Progress>,
}

/// Events delivered so far (from earlier attempts too), and where they are persisted.
struct Progress {
    bits: Mutex<EventBits>,
    file: Option<ProgressFile>,
    /// The first failure to write the progress file, for the plugin to log.
    file_error: Mutex<Option<String>>,
}

impl Progress {
    /// Records events as delivered and persists the new state.
    fn record(&self, events: impl Iterator<Item = u32>) {
        let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            bits.set(e);
        }
        if let Some(file) = &self.file {
            if let Err(e) = file.write(&bits) {
                self.file_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

impl Delivery {
    /// Starts delivering `job` on `runtime`. `previously`: events an earlier attempt delivered
    /// or refused (the job has none of them). `file`: where to persist progress (file buffers).
    /// `arrived`: when the chunk was created (its events' arrival, for the BufferingTime metric).
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        producer: Arc<Producer>,
        stream: String,
        job: Job,
        previously: Option<&EventBits>,
        file: Option<ProgressFile>,
        arrived: SystemTime,
    ) -> Arc<Delivery> {
        let delivery = Arc::new(Delivery {
            stop: CancelToken::new(),
            finished: CancelToken::new(),
            result: Mutex::new(None),
            progress: Arc::new(Progress {
                bits: Mutex::new(previously.cloned().unwrap_or_default()),
                file,
                file_error: Mutex::new(None),
            }),
        });
        let d = delivery.clone();
        runtime.spawn(async move {
            // Fires even if the delivery panics, so its waiter is never left waiting.
            let _finished = on_drop(|| d.finished.cancel());
            let target = Target {
                producer: &producer,
                stream: &stream,
                arrived,
            };
            let result = match job {
                Job::Formatted(formatted) => deliver_formatted(&target, formatted, &d).await,
                Job::Records {
                    batch,
                    events,
                    event_count,
                    refused,
                } => deliver_records(&target, batch, &events, event_count, refused, &d).await,
            };
            *d.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        });
        delivery
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_cancelled()
    }

    /// The signal that fires when the delivery has finished (for waiters outside async code).
    pub fn finished_token(&self) -> &CancelToken {
        &self.finished
    }

    /// Nobody waits any more: start no new request. Requests already sent finish, and their
    /// outcome is kept for whoever collects the result.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The result, once: `None` before the delivery finished or after it was taken.
    pub fn take_result(&self) -> Option<ChunkOutcome> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Events delivered so far, by this delivery or the attempts before it.
    pub fn progress(&self) -> EventBits {
        self.progress
            .bits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first error writing the progress file, if any.
    pub fn progress_file_error(&self) -> Option<String> {
        self.progress
            .file_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Where a chunk goes, and when its events arrived.
struct Target<'a> {
    producer: &'a Producer,
    stream: &'a str,
    arrived: SystemTime,
}

/// Delivers a chunk's records formatted by `format_chunk`.
async fn deliver_formatted(
    target: &Target<'_>,
    formatted: FormattedChunk,
    delivery: &Delivery,
) -> ChunkOutcome {
    let scrubbed = formatted.scrubbed;
    let mut outcome = deliver_records(
        target,
        formatted.batch,
        &formatted.events,
        formatted.event_count,
        formatted.refused,
        delivery,
    )
    .await;
    outcome.counters.scrubbed += u64::from(scrubbed);
    outcome
}

/// Delivers user records already formatted; `events[i]` is the chunk event of record `i`.
/// `refused`: events found unsendable before delivery (formatting), reported with the rest.
async fn deliver_records(
    target: &Target<'_>,
    batch: RecordBatch,
    events: &[u32],
    event_count: u32,
    mut refused: Vec<(u32, String)>,
    delivery: &Delivery,
) -> ChunkOutcome {
    let indexes: Vec<u32> = (0..batch.len() as u32).collect();
    let progress = delivery.progress.clone();
    let on_delivered = move |members: &[u32]| {
        progress.record(members.iter().map(|&m| events[m as usize]));
    };
    let result = target
        .producer
        .put_buffered_since(
            target.stream,
            Arc::new(batch),
            &indexes,
            &delivery.stop,
            &on_delivered,
            target.arrived,
        )
        .await;
    // What earlier attempts delivered or refused, plus every record this one delivered (the
    // progress callback saw each of them).
    let mut delivered = delivery.progress();
    delivered.0.resize((event_count as usize).div_ceil(8), 0);
    let mut counts = vec![0u32; result.failures.len()];
    for (i, status) in result.status.iter().enumerate() {
        let event = events[i];
        match *status {
            RecordStatus::Delivered => {}
            RecordStatus::Refused(f) => {
                refused.push((event, result.failures[f as usize].message.clone()))
            }
            RecordStatus::Failed(f) => counts[f as usize] += 1,
            RecordStatus::Skipped | RecordStatus::Pending => {}
        }
    }
    refused.sort_by_key(|r| r.0);
    let failures = result
        .failures
        .iter()
        .cloned()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .collect();
    ChunkOutcome {
        event_count,
        delivered,
        refused,
        failures,
        counters: result.counters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut b = EventBits::new(10);
        assert_eq!(b.0.len(), 2);
        b.set(0);
        b.set(9);
        b.set(20);
        assert!(b.get(0) && b.get(9) && b.get(20) && !b.get(1) && !b.get(100));
        assert_eq!(b.count(), 3);
    }
}
