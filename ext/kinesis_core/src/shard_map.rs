//! Which open shard of a stream owns a hash key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

/// One open shard and the hash keys it owns (inclusive at both ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    pub start: u128,
    pub end: u128,
}

/// The open shards of a stream, sorted by the end of their hash key ranges.
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    shards: Vec<Shard>,
    /// The rotation of [`ShardMap::next_in_turn`], shared by the map's clones.
    turn: Arc<AtomicUsize>,
}

impl ShardMap {
    /// Builds a map from open shards. Returns an error if the ranges do not tile 0..=2^128-1
    /// (a listing taken while the stream was changing): the caller lists again.
    pub fn new(mut shards: Vec<Shard>) -> Result<Self, String> {
        shards.sort_by_key(|s| s.end);
        let mut next = 0u128;
        for (i, s) in shards.iter().enumerate() {
            if s.start != next || s.end < s.start {
                return Err(format!("open shards do not cover the hash key space: shard {} starts at {} where {} was expected", s.id, s.start, next));
            }
            if s.end == u128::MAX {
                if i + 1 != shards.len() {
                    return Err("open shards overlap at the top of the hash key space".into());
                }
                return Ok(ShardMap::with(shards));
            }
            next = s.end + 1;
        }
        Err("open shards do not reach the top of the hash key space".into())
    }

    /// A map with one shard covering every hash key (used when a stream cannot be listed).
    pub fn whole(id: &str) -> Self {
        ShardMap::with(vec![Shard {
            id: id.to_string(),
            start: 0,
            end: u128::MAX,
        }])
    }

    fn with(shards: Vec<Shard>) -> Self {
        let first = rand::thread_rng().gen_range(0..shards.len().max(1));
        ShardMap {
            shards,
            turn: Arc::new(AtomicUsize::new(first)),
        }
    }

    /// The index of the next shard in turn, for an aggregate that may go to any shard: every
    /// caller of this map (consecutive chunks too) takes the shards one after the other, from a
    /// random first one, so the stream's shards are loaded alike over time, not only within one
    /// chunk.
    pub fn next_in_turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed) % self.shards.len().max(1)
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Index (into [`ShardMap::shards`]) of the shard owning `hash_key`.
    pub fn index_of(&self, hash_key: u128) -> usize {
        self.shards.partition_point(|s| s.end < hash_key)
    }

    pub fn shard_for(&self, hash_key: u128) -> &Shard {
        &self.shards[self.index_of(hash_key)]
    }

    pub fn by_id(&self, id: &str) -> Option<&Shard> {
        self.shards.iter().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even(n: u128) -> Vec<Shard> {
        let step = u128::MAX / n;
        (0..n)
            .map(|i| Shard {
                id: format!("shardId-{i:012}"),
                start: i * step,
                end: if i == n - 1 {
                    u128::MAX
                } else {
                    (i + 1) * step - 1
                },
            })
            .collect()
    }

    #[test]
    fn finds_owning_shard() {
        let map = ShardMap::new(even(4)).unwrap();
        assert_eq!(map.len(), 4);
        for s in map.shards().to_vec() {
            assert_eq!(map.shard_for(s.start).id, s.id);
            assert_eq!(map.shard_for(s.end).id, s.id);
        }
        assert_eq!(map.shard_for(u128::MAX).id, "shardId-000000000003");
    }

    #[test]
    fn rejects_gaps() {
        let mut shards = even(3);
        shards.remove(1);
        assert!(ShardMap::new(shards).is_err());
    }
}
