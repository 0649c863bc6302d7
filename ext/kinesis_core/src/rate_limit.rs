//! Per-shard rate limiting so the producer does not throttle itself, as the KPL does: token
//! buckets for records and bytes, refilled at a percentage of the shard's write limits.
//!
//! Entries are admitted to a batch call one by one, in order: an entry goes when its shard's
//! buckets hold what it needs now or within a short look-ahead (the call then waits for it), and
//! otherwise waits in the producer (its shard's later entries wait behind it), so a call
//! carries what its shards can take and no call waits long for its busiest shard. A shard that Kinesis throttles anyway has reached its real limit (other
//! writers share it, or the percentage is above 100): from then on its buckets refill at 100 %
//! at most, and the throttled entry's retry waits for a short refill, not for a growing backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Kinesis write limits of one shard.
pub const SHARD_RECORDS_PER_SEC: f64 = 1000.0;
pub const SHARD_BYTES_PER_SEC: f64 = 1024.0 * 1024.0;

/// How long a throttled entry's shard is given to refill before the entry goes again: Kinesis
/// answered that the shard held less than the entry needs, by an unknown amount. It doubles
/// with each further throttle of the shard before it takes an entry (other writers share the
/// shard), up to [`THROTTLE_REFILL_MAX`].
pub const THROTTLE_REFILL: Duration = Duration::from_millis(100);
pub const THROTTLE_REFILL_MAX: Duration = Duration::from_secs(2);

/// A shard throttled while already limited to 100 % refills at this fraction of its rate less,
/// down to [`THROTTLED_RATE_FLOOR`], and regains [`THROTTLED_RATE_REGAIN`] of the shard limit
/// each time it takes entries: our sends reach Kinesis after varying delays, and a shard that
/// others write to too has less than its limit for us. Throttles become rare at the rate that
/// the shard's refill and those delays allow.
pub const THROTTLED_RATE_CUT: f64 = 0.03;
pub const THROTTLED_RATE_FLOOR: f64 = 0.25;
pub const THROTTLED_RATE_REGAIN: f64 = 0.002;

/// One shard's buckets. Each holds at most one second's worth at its rate, as Kinesis's do.
struct Bucket {
    records: f64,
    bytes: f64,
    at: Instant,
    /// The fraction of the shard limits this shard's buckets refill at.
    scale: f64,
    /// Throttles since the shard last took an entry.
    throttles: u32,
    /// Kinesis throttled the shard at some point: it is a bottleneck, and a call does not wait
    /// for it ([`ShardRateLimiter::admit`]'s look-ahead).
    throttled: bool,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.records =
            (self.records + elapsed * SHARD_RECORDS_PER_SEC * self.scale).min(self.cap_records());
        self.bytes =
            (self.bytes + elapsed * SHARD_BYTES_PER_SEC * self.scale).min(self.cap_bytes());
        self.at = now;
    }

    fn cap_records(&self) -> f64 {
        SHARD_RECORDS_PER_SEC * self.scale
    }

    fn cap_bytes(&self) -> f64 {
        SHARD_BYTES_PER_SEC * self.scale
    }

    /// What an entry needs in the buckets to go: its size, or a full bucket for an entry bigger
    /// than a second's worth (it goes into debt, paid by the shard's next entries' wait).
    fn needs(&self, records: usize, bytes: usize) -> (f64, f64) {
        (
            (records as f64).min(self.cap_records()),
            (bytes as f64).min(self.cap_bytes()),
        )
    }

    /// How long until the buckets hold `need`.
    fn time_to(&self, (records, bytes): (f64, f64)) -> Duration {
        let secs = ((records - self.records) / (SHARD_RECORDS_PER_SEC * self.scale))
            .max((bytes - self.bytes) / (SHARD_BYTES_PER_SEC * self.scale))
            .max(0.0);
        Duration::from_secs_f64(secs)
    }
}

/// An entry offered to [`ShardRateLimiter::admit`].
pub struct Offer<'a> {
    pub shard: &'a str,
    pub records: usize,
    pub bytes: usize,
    /// False while the entry may not go yet for another reason (its retry's backoff): it is not
    /// admitted, and its shard's later entries wait behind it.
    pub ready: bool,
}

/// What [`ShardRateLimiter::admit`] decided.
#[derive(Debug, PartialEq)]
pub struct Admission {
    /// Per offer, whether it goes in the call.
    pub admitted: Vec<bool>,
    /// How long the call waits before it goes, for the admitted entries' shards to refill.
    pub go_after: Duration,
    /// When some ready entry was not admitted, how long until the first such entry's shard
    /// holds what it needs.
    pub next: Option<Duration>,
}

/// Token buckets per shard id.
pub struct ShardRateLimiter {
    scale: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl ShardRateLimiter {
    /// `percent` of the shard limits; `None` when `percent` is 0 (no limiting).
    pub fn new(percent: u32) -> Option<Self> {
        (percent > 0).then(|| ShardRateLimiter {
            scale: f64::from(percent) / 100.0,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    fn with_bucket<R>(&self, shard: &str, now: Instant, f: impl FnOnce(&mut Bucket) -> R) -> R {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        Self::bucket(&mut buckets, self.scale, shard, now, f)
    }

    fn bucket<R>(
        buckets: &mut HashMap<String, Bucket>,
        scale: f64,
        shard: &str,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> R,
    ) -> R {
        if !buckets.contains_key(shard) {
            let b = Bucket {
                records: SHARD_RECORDS_PER_SEC * scale,
                bytes: SHARD_BYTES_PER_SEC * scale,
                at: now,
                scale,
                throttles: 0,
                throttled: false,
            };
            buckets.insert(shard.to_string(), b);
        }
        let b = buckets.get_mut(shard).expect("inserted above");
        b.refill(now);
        f(b)
    }

    /// Admits, in order, the offered entries whose shard can take them now or, unless Kinesis
    /// throttled it before, within `ahead`, taking what they use from its buckets: the call
    /// carrying them goes once the last of them may. A short wait keeps a call whole; a longer
    /// one, or any for a shard at its real limit, would hold up the call's other shards.
    pub fn admit<'a>(
        &self,
        offers: impl IntoIterator<Item = Offer<'a>>,
        ahead: Duration,
    ) -> Admission {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut waiting: Vec<&str> = Vec::new();
        let mut out = Admission {
            admitted: Vec::new(),
            go_after: Duration::ZERO,
            next: None,
        };
        for o in offers {
            if waiting.contains(&o.shard) {
                out.admitted.push(false);
                continue;
            }
            let go = Self::bucket(&mut buckets, self.scale, o.shard, now, |b| {
                if !o.ready {
                    return false;
                }
                let t = b.time_to(b.needs(o.records, o.bytes));
                if t.is_zero() || (t <= ahead && !b.throttled) {
                    b.records -= o.records as f64;
                    b.bytes -= o.bytes as f64;
                    out.go_after = out.go_after.max(t);
                    return true;
                }
                out.next = Some(out.next.map_or(t, |w| w.min(t)));
                false
            });
            if !go {
                waiting.push(o.shard);
            }
            out.admitted.push(go);
        }
        out
    }

    /// Gives back what entries Kinesis did not accept for a reason other than the shard's limit
    /// took: they used none of the shard's capacity (charging their retry too would idle it).
    pub fn refund<'a>(&self, usage: impl IntoIterator<Item = (&'a str, usize, usize)>) {
        let now = Instant::now();
        for (shard, records, bytes) in usage {
            self.with_bucket(shard, now, |b| {
                b.records = (b.records + records as f64).min(b.cap_records());
                b.bytes = (b.bytes + bytes as f64).min(b.cap_bytes());
            });
        }
    }

    /// Notes the shards that took entries: their next throttle pauses them the shortest time,
    /// and a shard whose rate was lowered by throttles regains some of it.
    pub fn accepted<'a>(&self, usage: impl IntoIterator<Item = (&'a str, usize, usize)>) {
        let ceiling = self.scale.min(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for (shard, _, _) in usage {
            if let Some(b) = buckets.get_mut(shard) {
                b.throttles = 0;
                if b.scale < ceiling {
                    b.scale = (b.scale + THROTTLED_RATE_REGAIN).min(ceiling);
                }
            }
        }
    }

    /// Learns from entries Kinesis throttled for their shard's limit: the shard held less than
    /// they need, so its buckets refill at 100 % at most from now on (less each time it throttles
    /// again: [`THROTTLED_RATE_CUT`]), and hold what leaves its
    /// first throttled entry a pause of refill to wait ([`THROTTLE_REFILL`], doubling while the
    /// shard throttles without taking an entry). What they took is given back: they used none
    /// of the shard's capacity.
    pub fn throttled<'a>(&self, usage: impl IntoIterator<Item = (&'a str, usize, usize)>) {
        let now = Instant::now();
        let mut seen: Vec<&str> = Vec::new();
        for (shard, records, bytes) in usage {
            let first = !seen.contains(&shard);
            seen.push(shard);
            self.with_bucket(shard, now, |b| {
                b.throttled = true;
                if first {
                    b.scale = if b.scale > 1.0 {
                        1.0
                    } else {
                        (b.scale * (1.0 - THROTTLED_RATE_CUT)).max(THROTTLED_RATE_FLOOR)
                    };
                }
                b.records = (b.records + records as f64).min(b.cap_records());
                b.bytes = (b.bytes + bytes as f64).min(b.cap_bytes());
                if !first {
                    return;
                }
                let pause = THROTTLE_REFILL
                    .saturating_mul(1 << b.throttles.min(8))
                    .min(THROTTLE_REFILL_MAX)
                    .as_secs_f64()
                    * b.scale;
                b.throttles += 1;
                let need = b.needs(records, bytes);
                b.records = b.records.min(need.0 - pause * SHARD_RECORDS_PER_SEC);
                b.bytes = b.bytes.min(need.1 - pause * SHARD_BYTES_PER_SEC);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(shard: &str, records: usize, bytes: usize) -> Offer<'_> {
        Offer {
            shard,
            records,
            bytes,
            ready: true,
        }
    }

    /// Admits with nothing ahead: (admitted, wait for the first not admitted).
    fn adm<'a, const N: usize>(
        l: &ShardRateLimiter,
        offers: [Offer<'a>; N],
    ) -> (Vec<bool>, Option<Duration>) {
        let a = l.admit(offers, Duration::ZERO);
        assert_eq!(a.go_after, Duration::ZERO);
        (a.admitted, a.next)
    }

    fn near(d: Option<Duration>, ms: u64) -> bool {
        d.is_some_and(|d| {
            d >= Duration::from_millis(ms.saturating_sub(15)) && d <= Duration::from_millis(ms + 15)
        })
    }

    #[test]
    fn a_second_of_tokens_then_waits() {
        let l = ShardRateLimiter::new(100).unwrap();
        let (go, wait) = adm(&l, [offer("s1", 1000, 1024 * 1024)]);
        assert_eq!((go, wait), (vec![true], None));
        let (go, wait) = adm(&l, [offer("s1", 1, 512 * 1024), offer("s2", 500, 100)]);
        // The second shard is independent of the first.
        assert_eq!(go, vec![false, true]);
        assert!(near(wait, 500), "{wait:?}");
        assert!(ShardRateLimiter::new(0).is_none());
    }

    #[test]
    fn entries_their_shard_takes_soon_go_in_the_call_which_waits_for_them() {
        let l = ShardRateLimiter::new(150).unwrap();
        let big = 1024 * 1024;
        let a = l.admit(
            [
                offer("s", 1, big),
                offer("s", 1, big),
                offer("s", 1, big),
                offer("t", 1, big),
            ],
            Duration::from_millis(500),
        );
        // s: 1.5 MiB at 1.5 MiB/s; its second 1 MiB comes a third of a second later, its
        // third another 2/3 s later, past the 0.5 s ahead.
        assert_eq!(a.admitted, vec![true, true, false, true]);
        assert!(near(Some(a.go_after), 333), "{a:?}");
        assert!(near(a.next, 1000), "{a:?}");
        // A shard Kinesis throttled is a bottleneck: no call waits for it.
        l.throttled([("t", 1, big)]);
        let a = l.admit([offer("t", 1, big)], Duration::from_secs(5));
        assert_eq!(a.admitted, vec![false]);
        assert_eq!(a.go_after, Duration::ZERO);
    }

    #[test]
    fn a_shard_s_later_entries_wait_behind_its_first() {
        let l = ShardRateLimiter::new(100).unwrap();
        let (go, _) = adm(
            &l,
            [
                offer("a", 1, 700 * 1024),
                offer("a", 1, 700 * 1024),
                offer("b", 1, 700 * 1024),
                // Would fit in a's bucket, but a's earlier entry waits.
                offer("a", 1, 100),
                offer("b", 1, 100),
            ],
        );
        assert_eq!(go, vec![true, false, true, false, true]);
        // An entry not ready (its retry's backoff) holds its shard's later entries too.
        let l = ShardRateLimiter::new(100).unwrap();
        let mut waits = offer("a", 1, 10);
        waits.ready = false;
        let (go, wait) = adm(&l, [waits, offer("a", 1, 10), offer("b", 1, 10)]);
        assert_eq!((go, wait), (vec![false, false, true], None));
    }

    #[test]
    fn an_entry_over_a_second_s_worth_goes_on_a_full_bucket_into_debt() {
        let l = ShardRateLimiter::new(50).unwrap();
        let (go, _) = adm(&l, [offer("s", 1, 1024 * 1024)]);
        assert_eq!(go, vec![true]);
        // 512 KiB of debt at 512 KiB/s, then 512 KiB to refill.
        let (go, wait) = adm(&l, [offer("s", 1, 1024 * 1024)]);
        assert_eq!(go, vec![false]);
        assert!(near(wait, 2000), "{wait:?}");
    }

    #[test]
    fn refunds_what_was_not_accepted() {
        let l = ShardRateLimiter::new(100).unwrap();
        assert_eq!(adm(&l, [offer("s", 1, 1024 * 1024)]).0, vec![true]);
        // Failed for another reason than the shard's limit: the retry may go at once.
        l.refund([("s", 1, 1024 * 1024)]);
        assert_eq!(adm(&l, [offer("s", 1, 1024 * 1024)]).0, vec![true]);
        // Never above a full bucket.
        l.refund([("s", 1, 1024 * 1024)]);
        l.refund([("s", 1, 1024 * 1024)]);
        assert_eq!(adm(&l, [offer("s", 1, 1024 * 1024)]).0, vec![true]);
        let (go, wait) = adm(&l, [offer("s", 1, 1024 * 1024)]);
        assert_eq!(go, vec![false]);
        assert!(near(wait, 1000), "{wait:?}");
    }

    #[test]
    fn a_throttled_shard_refills_at_its_real_rate_and_its_entry_waits_a_short_refill() {
        let l = ShardRateLimiter::new(150).unwrap();
        let big = 1024 * 1024;
        assert_eq!(
            adm(&l, [offer("s", 1, big), offer("t", 1, big)]).0,
            vec![true, true]
        );
        // At 150 % a second 1 MiB entry would go after a third of a second...
        let (_, wait) = adm(&l, [offer("t", 1, big)]);
        assert!(near(wait, 333), "{wait:?}");
        // ...but Kinesis throttled s's entry: it goes again after the short refill, and s's
        // buckets now refill at 100 %.
        l.throttled([("s", 1, big)]);
        let (go, wait) = adm(&l, [offer("s", 1, big)]);
        assert_eq!(go, vec![false]);
        assert!(near(wait, THROTTLE_REFILL.as_millis() as u64), "{wait:?}");
        std::thread::sleep(THROTTLE_REFILL + Duration::from_millis(5));
        assert_eq!(adm(&l, [offer("s", 1, big)]).0, vec![true]);
        let (_, wait) = adm(&l, [offer("s", 1, big)]);
        assert!(near(wait, 1000), "{wait:?}");
        // A throttle of a small entry (the records limit) waits the same short refill.
        l.throttled([("u", 1, 10)]);
        let (go, wait) = adm(&l, [offer("u", 1, 10)]);
        assert_eq!(go, vec![false]);
        assert!(near(wait, THROTTLE_REFILL.as_millis() as u64), "{wait:?}");
    }

    #[test]
    fn a_shard_throttling_again_before_taking_an_entry_pauses_longer() {
        let l = ShardRateLimiter::new(100).unwrap();
        let pause = |l: &ShardRateLimiter| adm(l, [offer("s", 1, 10)]).1;
        l.throttled([("s", 1, 10), ("s", 1, 10)]);
        // Several entries throttled in one answer count once.
        assert!(near(pause(&l), 100), "{:?}", pause(&l));
        l.throttled([("s", 1, 10)]);
        assert!(near(pause(&l), 200), "{:?}", pause(&l));
        l.throttled([("s", 1, 10)]);
        assert!(near(pause(&l), 400), "{:?}", pause(&l));
        for _ in 0..10 {
            l.throttled([("s", 1, 10)]);
        }
        // At most 2 s of refill, at the rate the throttles lowered (0.97 each).
        let longest = Duration::from_secs_f64(2.0 / 0.97f64.powi(13));
        let p = pause(&l).unwrap();
        assert!(p >= Duration::from_millis(1990) && p <= longest, "{p:?}");
        // Once the shard took an entry, the next throttle pauses it the shortest time again
        // (the refund stands for the two seconds of refill that came first).
        l.refund([("s", 2000, 2 * 1024 * 1024), ("s", 2000, 2 * 1024 * 1024)]);
        l.accepted([("s", 1, 10)]);
        l.throttled([("s", 1, 10)]);
        assert!(near(pause(&l), 100), "{:?}", pause(&l));
    }

    #[test]
    fn a_shard_throttling_at_100_percent_slows_down_then_regains_its_rate() {
        let l = ShardRateLimiter::new(100).unwrap();
        let scale = |l: &ShardRateLimiter| l.buckets.lock().unwrap()["s"].scale;
        l.throttled([("s", 1, 10)]);
        assert!((scale(&l) - 0.97).abs() < 1e-9);
        for _ in 0..100 {
            l.throttled([("s", 1, 10)]);
        }
        assert_eq!(scale(&l), THROTTLED_RATE_FLOOR);
        for _ in 0..1000 {
            l.accepted([("s", 1, 10)]);
        }
        assert_eq!(scale(&l), 1.0);
        // Never above the configured percentage.
        let l = ShardRateLimiter::new(50).unwrap();
        l.throttled([("s", 1, 10)]);
        for _ in 0..1000 {
            l.accepted([("s", 1, 10)]);
        }
        assert_eq!(scale(&l), 0.5);
    }

    #[test]
    fn percent_scales_the_rate() {
        let l = ShardRateLimiter::new(50).unwrap();
        assert_eq!(adm(&l, [offer("s", 500, 0)]).0, vec![true]);
        let (go, wait) = adm(&l, [offer("s", 500, 0)]);
        assert_eq!(go, vec![false]);
        assert!(near(wait, 1000), "{wait:?}");
    }
}
