//! One fluentd buffer chunk, start to finish: format its events, skip those an earlier attempt
//! already delivered, deliver the rest, and report per event.

use crate::batch::RecordBatch;
use crate::cancel::CancelToken;
use crate::chunk::{format_chunk, FormatError, FormatSpec};
use crate::error::Failure;
use crate::producer::{Counters, Producer, RecordStatus};

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

/// Formats and delivers a chunk in fluentd's standard format. `FormatError::NeedsRuby` means the
/// plugin must format this chunk itself and call [`deliver_records`].
pub async fn deliver_chunk(
    producer: &Producer,
    stream: &str,
    spec: &FormatSpec,
    chunk: &[u8],
    tag: Option<&str>,
    previously: Option<&EventBits>,
    cancel: &CancelToken,
) -> Result<ChunkOutcome, FormatError> {
    let skip = |i: u32| previously.is_some_and(|p| p.get(i));
    let formatted = format_chunk(spec, chunk, tag, &skip)?;
    let mut outcome = deliver_records(
        producer,
        stream,
        formatted.batch,
        &formatted.events,
        formatted.event_count,
        previously,
        cancel,
    )
    .await;
    outcome.refused.extend(formatted.refused);
    outcome.refused.sort_by_key(|r| r.0);
    Ok(outcome)
}

/// Delivers user records already formatted; `events[i]` is the chunk event of record `i`.
pub async fn deliver_records(
    producer: &Producer,
    stream: &str,
    batch: RecordBatch,
    events: &[u32],
    event_count: u32,
    previously: Option<&EventBits>,
    cancel: &CancelToken,
) -> ChunkOutcome {
    let mut delivered = previously.cloned().unwrap_or_default();
    delivered.0.resize((event_count as usize).div_ceil(8), 0);
    let indexes: Vec<u32> = (0..batch.len() as u32).collect();
    let result = producer
        .put(stream, &batch, &indexes, cancel.cancelled())
        .await;
    let mut refused = Vec::new();
    let mut counts = vec![0u32; result.failures.len()];
    for (i, status) in result.status.iter().enumerate() {
        let event = events[i];
        match *status {
            RecordStatus::Delivered => delivered.set(event),
            RecordStatus::Refused(f) => {
                refused.push((event, result.failures[f as usize].message.clone()))
            }
            RecordStatus::Failed(f) => counts[f as usize] += 1,
            RecordStatus::Skipped | RecordStatus::Pending => {}
        }
    }
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
