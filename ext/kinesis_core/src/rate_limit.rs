//! Per-shard rate limiting so the producer does not throttle itself, as the KPL does: token
//! buckets for records and bytes, refilled at a percentage of the shard's write limits.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Kinesis write limits of one shard.
pub const SHARD_RECORDS_PER_SEC: f64 = 1000.0;
pub const SHARD_BYTES_PER_SEC: f64 = 1024.0 * 1024.0;

struct Bucket {
    records: f64,
    bytes: f64,
    at: Instant,
}

/// Token buckets per shard id. A reservation may go into debt (a record bigger than a second's
/// worth of tokens must still be sendable); the debt is paid by waiting.
pub struct ShardRateLimiter {
    records_per_sec: f64,
    bytes_per_sec: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl ShardRateLimiter {
    /// `percent` of the shard limits; `None` when `percent` is 0 (no limiting).
    pub fn new(percent: u32) -> Option<Self> {
        (percent > 0).then(|| {
            let scale = f64::from(percent) / 100.0;
            ShardRateLimiter {
                records_per_sec: SHARD_RECORDS_PER_SEC * scale,
                bytes_per_sec: SHARD_BYTES_PER_SEC * scale,
                buckets: Mutex::new(HashMap::new()),
            }
        })
    }

    /// Takes `records` and `bytes` from each shard's bucket and returns how long to wait before
    /// sending so that no shard goes over its rate.
    pub fn reserve<'a>(
        &self,
        usage: impl IntoIterator<Item = (&'a str, usize, usize)>,
    ) -> Duration {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait: f64 = 0.0;
        for (shard, records, bytes) in usage {
            let b = buckets.entry(shard.to_string()).or_insert(Bucket {
                records: self.records_per_sec,
                bytes: self.bytes_per_sec,
                at: now,
            });
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.records = (b.records + elapsed * self.records_per_sec).min(self.records_per_sec);
            b.bytes = (b.bytes + elapsed * self.bytes_per_sec).min(self.bytes_per_sec);
            b.at = now;
            b.records -= records as f64;
            b.bytes -= bytes as f64;
            wait = wait
                .max(-b.records / self.records_per_sec)
                .max(-b.bytes / self.bytes_per_sec);
        }
        Duration::from_secs_f64(wait.max(0.0))
    }

    /// Gives back what entries Kinesis did not accept took: they used none of the shard's
    /// capacity, and their retry reserves again (charging them twice would idle the shard).
    pub fn refund<'a>(&self, usage: impl IntoIterator<Item = (&'a str, usize, usize)>) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for (shard, records, bytes) in usage {
            if let Some(b) = buckets.get_mut(shard) {
                b.records = (b.records + records as f64).min(self.records_per_sec);
                b.bytes = (b.bytes + bytes as f64).min(self.bytes_per_sec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_of_tokens_then_waits() {
        let l = ShardRateLimiter::new(100).unwrap();
        assert_eq!(l.reserve([("s1", 1000, 1024 * 1024)]), Duration::ZERO);
        let w = l.reserve([("s1", 1, 512 * 1024)]);
        assert!(
            w >= Duration::from_millis(490) && w <= Duration::from_millis(510),
            "{w:?}"
        );
        // Another shard is independent.
        assert_eq!(l.reserve([("s2", 500, 100)]), Duration::ZERO);
        assert!(ShardRateLimiter::new(0).is_none());
    }

    #[test]
    fn refunds_what_was_not_accepted() {
        let l = ShardRateLimiter::new(100).unwrap();
        assert_eq!(l.reserve([("s", 1, 1024 * 1024)]), Duration::ZERO);
        // Throttled: the retry may go at once instead of a second later.
        l.refund([("s", 1, 1024 * 1024)]);
        assert_eq!(l.reserve([("s", 1, 1024 * 1024)]), Duration::ZERO);
        // Never above a full bucket.
        l.refund([("s", 1, 1024 * 1024)]);
        l.refund([("s", 1, 1024 * 1024)]);
        assert_eq!(l.reserve([("s", 1, 1024 * 1024)]), Duration::ZERO);
        assert!(l.reserve([("s", 1, 1024 * 1024)]) >= Duration::from_millis(990));
    }

    #[test]
    fn percent_scales_the_rate() {
        let l = ShardRateLimiter::new(50).unwrap();
        let w = l.reserve([("s", 1000, 0)]);
        assert!(
            w >= Duration::from_millis(990) && w <= Duration::from_millis(1010),
            "{w:?}"
        );
    }
}
