//! Batch calls shared by consecutive deliveries: records are packed into calls in the order they
//! come, whichever delivery (fluentd chunk) they belong to. A call is sent as soon as it is full
//! (the next record would not fit); the last, partial call may wait a bounded time (the
//! producer's `linger`) for the next delivery's records to fill it.
//!
//! The pipe only holds the open call. Sending it is the job of whoever takes it: the delivery
//! whose records filled it, or a delivery with records in it once its wait is over.

use std::sync::Mutex;
use std::time::Instant;

/// The open (partial) call of one destination.
pub struct Pipe<T> {
    open: Mutex<Open<T>>,
}

struct Open<T> {
    items: Vec<T>,
    bytes: usize,
    /// When the first item came in.
    since: Option<Instant>,
    /// When items last came in.
    last: Option<Instant>,
    /// Changes each time the open call is taken: a waiter holding an older number lost the race.
    generation: u64,
}

/// What [`Pipe::holds`] reports of the open call.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// When its first item came in.
    pub since: Instant,
    /// When items last came in.
    pub last: Instant,
    /// Its generation, for [`Pipe::take`].
    pub generation: u64,
    /// How many of its items are the caller's.
    pub mine: usize,
}

/// Limits of one call.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl<T> Default for Pipe<T> {
    fn default() -> Self {
        Pipe {
            open: Mutex::new(Open {
                items: Vec::new(),
                bytes: 0,
                since: None,
                last: None,
                generation: 0,
            }),
        }
    }
}

impl<T> Pipe<T> {
    /// Adds `items` behind what the open call holds and returns the calls that became full, in
    /// order. With `close`, the partial call left at the end is returned too (nothing waits).
    pub fn push(
        &self,
        items: impl IntoIterator<Item = T>,
        size: impl Fn(&T) -> usize,
        limits: CallLimits,
        close: bool,
    ) -> Vec<Vec<T>> {
        let now = Instant::now();
        let mut open = self.lock();
        let mut full = Vec::new();
        for item in items {
            let n = size(&item);
            if !open.items.is_empty()
                && (open.items.len() >= limits.max_entries || open.bytes + n > limits.max_bytes)
            {
                full.push(open.take());
            }
            if open.items.is_empty() {
                open.since = Some(now);
            }
            open.last = Some(now);
            open.bytes += n;
            open.items.push(item);
            if open.items.len() >= limits.max_entries || open.bytes >= limits.max_bytes {
                full.push(open.take());
            }
        }
        if close && !open.items.is_empty() {
            full.push(open.take());
        }
        full
    }

    /// The open call's times and generation, and how many of its items `mine` says are the
    /// caller's, if any is.
    pub fn holds(&self, mine: impl Fn(&T) -> bool) -> Option<Held> {
        let open = self.lock();
        let (since, last) = (open.since?, open.last?);
        let mine = open.items.iter().filter(|i| mine(i)).count();
        (mine > 0).then_some(Held {
            since,
            last,
            generation: open.generation,
            mine,
        })
    }

    /// Takes the open call if it is still `generation` and not empty.
    pub fn take(&self, generation: u64) -> Option<Vec<T>> {
        let mut open = self.lock();
        (open.generation == generation && !open.items.is_empty()).then(|| open.take())
    }

    /// Items waiting in the open call.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.lock().items.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open<T>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T> Open<T> {
    fn take(&mut self) -> Vec<T> {
        self.bytes = 0;
        self.since = None;
        self.last = None;
        self.generation += 1;
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CallLimits = CallLimits {
        max_entries: 4,
        max_bytes: 100,
    };

    fn sizes(calls: &[Vec<(char, usize)>]) -> Vec<Vec<usize>> {
        calls
            .iter()
            .map(|c| c.iter().map(|i| i.1).collect())
            .collect()
    }

    #[test]
    fn full_calls_go_and_the_partial_one_waits_for_the_next_push() {
        let pipe = Pipe::default();
        let a: Vec<(char, usize)> = (0..6).map(|_| ('a', 10)).collect();
        let full = pipe.push(a, |i| i.1, LIMITS, false);
        assert_eq!(sizes(&full), vec![vec![10; 4]]);
        assert_eq!(pipe.waiting(), 2);
        let held = pipe.holds(|i| i.0 == 'a').expect("a waits");
        assert_eq!(held.mine, 2);
        assert_eq!(held.since, held.last, "one push so far");
        let (generation, a_since) = (held.generation, held.since);
        assert!(pipe.holds(|i| i.0 == 'b').is_none());
        // The next delivery's records fill the call that a's tail opened.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let full = pipe.push(vec![('b', 10); 3], |i| i.1, LIMITS, false);
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].iter().map(|i| i.0).collect::<String>(), "aabb");
        assert_eq!(pipe.waiting(), 1);
        // a's waiter comes too late: the call it waited on was sent.
        assert!(pipe.take(generation).is_none());
        let held = pipe.holds(|i| i.0 == 'b').unwrap();
        assert_eq!(held.mine, 1);
        assert!(held.since > a_since, "the new call opened with b's push");
        // One more push into the open call: it keeps its first time and moves its last.
        pipe.push(vec![('c', 10)], |i| i.1, LIMITS, false);
        let later = pipe.holds(|i| i.0 == 'c').unwrap();
        assert_eq!(later.since, held.since);
        assert!(later.last >= held.last);
        assert_eq!(later.generation, held.generation);
        assert_eq!(
            pipe.take(held.generation).unwrap(),
            vec![('b', 10), ('c', 10)]
        );
        assert_eq!(pipe.waiting(), 0);
    }

    #[test]
    fn bytes_close_a_call_and_close_sends_the_rest() {
        let pipe = Pipe::default();
        let full = pipe.push(
            vec![('a', 60), ('a', 30), ('a', 20), ('a', 100), ('a', 5)],
            |i| i.1,
            LIMITS,
            true,
        );
        // 60+30 (20 more would pass 100), 20 (100 more would pass), 100 (exactly full), 5.
        assert_eq!(
            sizes(&full),
            vec![vec![60, 30], vec![20], vec![100], vec![5]]
        );
        assert_eq!(pipe.waiting(), 0);
    }

    #[test]
    fn a_record_larger_than_a_call_goes_alone() {
        let pipe = Pipe::default();
        let full = pipe.push(
            vec![('a', 10), ('a', 150), ('a', 10)],
            |i| i.1,
            LIMITS,
            false,
        );
        assert_eq!(sizes(&full), vec![vec![10], vec![150]]);
        assert_eq!(pipe.waiting(), 1);
    }
}
