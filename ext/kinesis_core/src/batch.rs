//! User records in one arena, and the plans that turn them into the records a service takes:
//! Kinesis records (KPL aggregates, or one user record each) and Firehose records (one user
//! record each, or packed), then into PutRecords / PutRecordBatch requests. Pure: no network.

use rand::Rng;

use crate::config::KeyMode;
use crate::hashkey::{partition_key_hash, validate_partition_key};
use crate::kpl::{looks_aggregated, seal_all, AggregateBuilder, AGGREGATE_PARTITION_KEY};
use crate::shard_map::ShardMap;

#[derive(Clone, Copy, Debug)]
struct Span {
    data_start: usize,
    data_end: usize,
    key_end: usize,
    has_key: bool,
    explicit_hash_key: Option<u128>,
}

/// User records, their data and partition keys stored back to back in one buffer.
#[derive(Default, Debug, Clone)]
pub struct RecordBatch {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

impl RecordBatch {
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        RecordBatch {
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(records),
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Adds a record whose data is given.
    pub fn push(
        &mut self,
        data: &[u8],
        partition_key: Option<&str>,
        explicit_hash_key: Option<u128>,
    ) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        self.commit(start, partition_key, explicit_hash_key);
    }

    /// Where the next record's data starts: write it into [`RecordBatch::buffer`], then
    /// [`RecordBatch::commit`] (or [`RecordBatch::abandon`]).
    pub fn mark(&self) -> usize {
        self.bytes.len()
    }

    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Makes the bytes written since `start` a record.
    pub fn commit(
        &mut self,
        start: usize,
        partition_key: Option<&str>,
        explicit_hash_key: Option<u128>,
    ) {
        let data_end = self.bytes.len();
        if let Some(k) = partition_key {
            self.bytes.extend_from_slice(k.as_bytes());
        }
        self.spans.push(Span {
            data_start: start,
            data_end,
            key_end: self.bytes.len(),
            has_key: partition_key.is_some(),
            explicit_hash_key,
        });
    }

    /// Forgets the bytes written since `start`.
    pub fn abandon(&mut self, start: usize) {
        self.bytes.truncate(start);
    }

    pub fn data(&self, i: usize) -> &[u8] {
        let s = &self.spans[i];
        &self.bytes[s.data_start..s.data_end]
    }

    pub fn partition_key(&self, i: usize) -> Option<&str> {
        let s = &self.spans[i];
        // Keys are only ever stored from &str, so they are valid UTF-8.
        s.has_key
            .then(|| std::str::from_utf8(&self.bytes[s.data_end..s.key_end]).unwrap_or_default())
    }

    pub fn explicit_hash_key(&self, i: usize) -> Option<u128> {
        self.spans[i].explicit_hash_key
    }

    /// Total bytes of data held.
    pub fn data_bytes(&self) -> usize {
        self.spans.iter().map(|s| s.data_end - s.data_start).sum()
    }
}

/// One Kinesis record to send: an aggregate, or a single user record sent raw.
#[derive(Debug, Clone)]
pub struct KinesisRecord {
    pub data: Vec<u8>,
    pub partition_key: String,
    pub explicit_hash_key: Option<u128>,
    /// Index into the shard map the plan was made with.
    pub shard: usize,
    /// The user records (batch indexes) it carries.
    pub members: Vec<u32>,
    /// False for an aggregate of user records with their own keys: it must land on the
    /// predicted shard, or a KCL consumer drops it (see the shard-range check).
    pub lands_safely_anywhere: bool,
}

impl KinesisRecord {
    /// What Kinesis counts against its limits: data plus partition key.
    pub fn billed_size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// A user record that can never be sent, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub index: u32,
    pub reason: String,
}

/// Limits the plan works within.
#[derive(Debug, Clone)]
pub struct PlanLimits {
    pub max_record_bytes: usize,
    pub aggregation_max_bytes: usize,
    /// Keep each shard's user records in their order across the Kinesis records planned for
    /// it (`keep_order`): filtered by shard, the output lists records in batch order.
    pub ordered: bool,
    /// KPL aggregation (`kinesis_streams_aggregated`); without it each user record is one
    /// Kinesis record with its own partition key (`kinesis_streams`).
    pub aggregate: bool,
}

fn random_key() -> String {
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}

struct Open {
    builder: AggregateBuilder,
    members: Vec<u32>,
    key: String,
    first_hash: u128,
    shard: usize,
    /// Its records have explicit hash keys (per-record keys).
    has_ehk: bool,
}

struct Planner<'a> {
    batch: &'a RecordBatch,
    map: &'a ShardMap,
    limits: &'a PlanLimits,
    out: Vec<KinesisRecord>,
    refused: Vec<Refused>,
    /// Aggregates in `out` still without their MD5.
    unsealed: Vec<usize>,
}

impl<'a> Planner<'a> {
    /// Sends what `open` holds: raw when it is one record that cannot be mistaken for an
    /// aggregate (as the KPL does), else as an aggregate.
    fn flush(&mut self, open: &mut Open, per_record_keys: bool) {
        if open.members.is_empty() {
            return;
        }
        let members = std::mem::take(&mut open.members);
        if members.len() == 1 && !looks_aggregated(self.batch.data(members[0] as usize)) {
            open.builder.clear();
            let i = members[0] as usize;
            self.out.push(KinesisRecord {
                data: self.batch.data(i).to_vec(),
                partition_key: open.key.clone(),
                explicit_hash_key: if per_record_keys {
                    self.batch.explicit_hash_key(i)
                } else {
                    None
                },
                shard: open.shard,
                members,
                lands_safely_anywhere: true,
            });
            return;
        }
        // Sealed with the plan's other aggregates, in `plan`.
        let data = open.builder.finish_undigested();
        self.unsealed.push(self.out.len());
        self.out.push(if per_record_keys {
            KinesisRecord {
                data,
                partition_key: AGGREGATE_PARTITION_KEY.to_string(),
                explicit_hash_key: Some(open.first_hash),
                shard: open.shard,
                members,
                lands_safely_anywhere: false,
            }
        } else {
            KinesisRecord {
                data,
                partition_key: open.key.clone(),
                explicit_hash_key: None,
                shard: open.shard,
                members,
                lands_safely_anywhere: true,
            }
        });
    }

    /// Record `i`'s own partition key, if it has a valid one; else it is refused, saying why.
    fn valid_key(&mut self, i: u32) -> Option<&'a str> {
        let batch: &'a RecordBatch = self.batch;
        let Some(key) = batch.partition_key(i as usize) else {
            self.refused.push(Refused {
                index: i,
                reason: "record has no partition key".into(),
            });
            return None;
        };
        if let Err(e) = validate_partition_key(key) {
            self.refused.push(Refused {
                index: i,
                reason: e.to_string(),
            });
            return None;
        }
        Some(key)
    }

    /// A record too large for any aggregate: raw on its own if Kinesis takes it, else refused.
    fn alone(&mut self, i: u32, key: &str, ehk: Option<u128>, shard: usize) {
        let data = self.batch.data(i as usize);
        let size = data.len() + key.len();
        if size > self.limits.max_record_bytes {
            self.refused.push(Refused { index: i, reason: format!("record is {size} bytes with its partition key; the Kinesis record limit is {} bytes", self.limits.max_record_bytes) });
        } else if looks_aggregated(data) {
            self.refused.push(Refused { index: i, reason: "record starts with the KPL aggregate magic bytes and is too large to wrap in an aggregate; consumers would misread it if it were sent as it is".into() });
        } else {
            self.out.push(KinesisRecord {
                data: data.to_vec(),
                partition_key: key.to_string(),
                explicit_hash_key: ehk,
                shard,
                members: vec![i],
                lands_safely_anywhere: true,
            });
        }
    }
}

/// Groups user records into Kinesis records. With per-record keys, one aggregate at a time per
/// (predicted shard, has explicit hash key): the consumer libraries misreport explicit hash keys
/// in aggregates mixing records with and without one.
pub fn plan(
    batch: &RecordBatch,
    indexes: &[u32],
    mode: &KeyMode,
    map: &ShardMap,
    limits: &PlanLimits,
) -> (Vec<KinesisRecord>, Vec<Refused>) {
    let mut p = Planner {
        batch,
        map,
        limits,
        out: Vec::new(),
        refused: Vec::new(),
        unsealed: Vec::new(),
    };
    if !limits.aggregate {
        plan_unaggregated(&mut p, indexes, mode);
        return (p.out, p.refused);
    }
    match mode {
        KeyMode::PerRecord => plan_per_record(&mut p, indexes),
        KeyMode::Fixed(key) => plan_shared_key(&mut p, indexes, || key.clone()),
        KeyMode::RandomPerAggregate => plan_shared_key(&mut p, indexes, balanced_random_keys(map)),
    }
    let mut unsealed: Vec<&mut Vec<u8>> = Vec::with_capacity(p.unsealed.len());
    let mut next = p.unsealed.iter().peekable();
    for (i, r) in p.out.iter_mut().enumerate() {
        if next.next_if_eq(&&i).is_some() {
            unsealed.push(&mut r.data);
        }
    }
    debug_assert_eq!(unsealed.len(), p.unsealed.len());
    seal_all(&mut unsealed);
    (p.out, p.refused)
}

/// Random 32-hex-character keys spread evenly over the map's shards: each is drawn at random
/// until it hashes into the next shard in the map's turn ([`ShardMap::next_in_turn`], which
/// consecutive chunks continue). The aggregates then load every shard alike (a throttled stream
/// is as fast as its busiest shard) instead of as chance has it: when a chunk makes fewer
/// aggregates than the stream has shards, the next chunk's go to the shards after them, not to
/// a random few that may be the same. Every user record still hashes into the shard its
/// aggregate lands on.
fn balanced_random_keys(map: &ShardMap) -> impl FnMut() -> String + '_ {
    let shards = map.len().max(1);
    move || {
        let want = map.next_in_turn();
        // A shard holding a tiny part of the hash range may take many draws: after 64 per
        // shard on average, any key does.
        (0..64 * shards)
            .map(|_| random_key())
            .find(|k| map.index_of(partition_key_hash(k)) == want)
            .unwrap_or_else(random_key)
    }
}

fn plan_shared_key(p: &mut Planner, indexes: &[u32], mut next_key: impl FnMut() -> String) {
    let new_open = |key: String, p: &Planner| {
        let hash = partition_key_hash(&key);
        Open {
            builder: AggregateBuilder::new(p.limits.aggregation_max_bytes, key.len()),
            members: Vec::new(),
            first_hash: hash,
            shard: p.map.index_of(hash),
            key,
            has_ehk: false,
        }
    };
    let mut open = new_open(next_key(), p);
    for &i in indexes {
        let data = p.batch.data(i as usize);
        if open.builder.try_add(&open.key, None, data) {
            open.members.push(i);
            continue;
        }
        if !open.members.is_empty() {
            p.flush(&mut open, false);
            open = new_open(next_key(), p);
            if open.builder.try_add(&open.key, None, data) {
                open.members.push(i);
                continue;
            }
        }
        let key = open.key.clone();
        p.alone(i, &key, None, open.shard);
        open = new_open(next_key(), p);
    }
    p.flush(&mut open, false);
}

fn plan_per_record(p: &mut Planner, indexes: &[u32]) {
    let mut open: std::collections::HashMap<(usize, bool), Open> = std::collections::HashMap::new();
    let mut order: Vec<(usize, bool)> = Vec::new();
    for &i in indexes {
        let Some(key) = p.valid_key(i) else {
            continue;
        };
        let ehk = p.batch.explicit_hash_key(i as usize);
        let hash = ehk.unwrap_or_else(|| partition_key_hash(key));
        let shard = p.map.index_of(hash);
        // In order: one aggregate at a time per shard, sent before a record of the other kind
        // (with or without an explicit hash key) starts the next one.
        let slot = (shard, ehk.is_some() && !p.limits.ordered);
        let o = open.entry(slot).or_insert_with(|| {
            order.push(slot);
            Open {
                builder: AggregateBuilder::new(
                    p.limits.aggregation_max_bytes,
                    AGGREGATE_PARTITION_KEY.len(),
                ),
                members: Vec::new(),
                key: String::new(),
                first_hash: 0,
                shard,
                has_ehk: false,
            }
        });
        let data = p.batch.data(i as usize);
        if p.limits.ordered && !o.members.is_empty() && o.has_ehk != ehk.is_some() {
            p.flush(o, true);
        }
        if o.members.is_empty() {
            o.key = key.to_string();
            o.first_hash = hash;
            o.has_ehk = ehk.is_some();
        }
        if o.builder.try_add(key, ehk, data) {
            o.members.push(i);
            continue;
        }
        if !o.members.is_empty() {
            p.flush(o, true);
            o.key = key.to_string();
            o.first_hash = hash;
            o.has_ehk = ehk.is_some();
            if o.builder.try_add(key, ehk, data) {
                o.members.push(i);
                continue;
            }
        }
        // (The shard's aggregate is empty here: what it held went out first.)
        p.alone(i, key, ehk, shard);
    }
    for slot in order {
        if let Some(mut o) = open.remove(&slot) {
            p.flush(&mut o, true);
        }
    }
}

/// One Kinesis record per user record, as `kinesis_streams` sends them: its own partition key
/// (per-record field, the fixed key, or a fresh random key each), its explicit hash key, its
/// bytes as they are. Data plus key over the record limit is refused.
fn plan_unaggregated(p: &mut Planner, indexes: &[u32], mode: &KeyMode) {
    for &i in indexes {
        let (key, ehk) = match mode {
            KeyMode::PerRecord => {
                let Some(key) = p.valid_key(i) else {
                    continue;
                };
                (key.to_string(), p.batch.explicit_hash_key(i as usize))
            }
            KeyMode::Fixed(key) => (key.clone(), None),
            KeyMode::RandomPerAggregate => (random_key(), None),
        };
        let data = p.batch.data(i as usize);
        let size = data.len() + key.len();
        if size > p.limits.max_record_bytes {
            p.refused.push(Refused {
                index: i,
                reason: format!(
                    "record is {size} bytes with its partition key; the Kinesis record limit (max_record_size) is {} bytes",
                    p.limits.max_record_bytes
                ),
            });
            continue;
        }
        let hash = ehk.unwrap_or_else(|| partition_key_hash(&key));
        p.out.push(KinesisRecord {
            data: data.to_vec(),
            partition_key: key,
            explicit_hash_key: ehk,
            shard: p.map.index_of(hash),
            members: vec![i],
            lands_safely_anywhere: true,
        });
    }
}

/// Firehose records: one per user record, or with `pack`, consecutive user records concatenated
/// (each ends with its newline when `append_new_line` is on) into records of at most
/// `max_record_bytes`. A user record larger than that alone is refused. Firehose records have no
/// key: `partition_key` is empty and `shard` 0.
pub fn plan_firehose(
    batch: &RecordBatch,
    indexes: &[u32],
    pack: bool,
    max_record_bytes: usize,
) -> (Vec<KinesisRecord>, Vec<Refused>) {
    let mut out: Vec<KinesisRecord> = Vec::new();
    let mut refused = Vec::new();
    let record = |data: Vec<u8>, members: Vec<u32>| KinesisRecord {
        data,
        partition_key: String::new(),
        explicit_hash_key: None,
        shard: 0,
        members,
        lands_safely_anywhere: true,
    };
    let mut open: Vec<u8> = Vec::new();
    let mut members: Vec<u32> = Vec::new();
    for &i in indexes {
        let data = batch.data(i as usize);
        if data.len() > max_record_bytes {
            refused.push(Refused {
                index: i,
                reason: format!(
                    "record is {} bytes; the Firehose record limit (max_record_size) is {max_record_bytes} bytes",
                    data.len()
                ),
            });
            continue;
        }
        if !pack {
            out.push(record(data.to_vec(), vec![i]));
            continue;
        }
        if open.len() + data.len() > max_record_bytes && !members.is_empty() {
            out.push(record(
                std::mem::take(&mut open),
                std::mem::take(&mut members),
            ));
        }
        if open.is_empty() {
            open.reserve(max_record_bytes.min(64 * 1024));
        }
        open.extend_from_slice(data);
        members.push(i);
    }
    if !members.is_empty() {
        out.push(record(open, members));
    }
    (out, refused)
}

/// Packs Kinesis records into PutRecords requests of at most `max_entries` records and
/// `max_bytes` (data plus partition keys), in order, each as full as the limits allow.
pub fn pack(
    records: Vec<KinesisRecord>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Vec<KinesisRecord>> {
    let limits = crate::pipe::CallLimits {
        max_entries,
        max_bytes,
    };
    crate::pipe::Pipe::default().push(records, KinesisRecord::billed_size, limits, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kpl::{deaggregate, effective_hash_key, Deaggregated};
    use crate::shard_map::Shard;
    use std::collections::HashMap;

    fn four_shards() -> ShardMap {
        let q = u128::MAX / 4;
        let shards = (0..4u128).map(|i| Shard {
            id: format!("shardId-{i:012}"),
            start: i * q,
            end: if i == 3 { u128::MAX } else { (i + 1) * q - 1 },
        });
        ShardMap::new(shards.collect()).unwrap()
    }

    fn limits(agg: usize) -> PlanLimits {
        PlanLimits {
            max_record_bytes: 1024 * 1024,
            aggregation_max_bytes: agg,
            ordered: false,
            aggregate: true,
        }
    }

    /// kinesis_streams: one Kinesis record per user record, its own key (or a fresh random one),
    /// its explicit hash key, its bytes untouched, even when they look like an aggregate; too
    /// large with the key: refused.
    #[test]
    fn unaggregated_plans_one_record_each_with_its_keys() {
        let map = four_shards();
        let unaggregated = PlanLimits {
            aggregate: false,
            max_record_bytes: 1000,
            ..limits(1000)
        };
        let mut batch = RecordBatch::default();
        let mut magic = crate::kpl::MAGIC.to_vec();
        magic.extend_from_slice(b"not really an aggregate");
        batch.push(&magic, Some("k0"), None);
        batch.push(b"plain", Some("k1"), Some(u128::MAX - 5));
        batch.push(&[b'x'; 999], Some("k2"), None); // 1001 bytes with its key
        batch.push(&[b'y'; 998], Some("k3"), None); // exactly 1000
        let idx = [0, 1, 2, 3];
        let (records, refused) = plan(&batch, &idx, &KeyMode::PerRecord, &map, &unaggregated);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].index, 2);
        assert!(
            refused[0].reason.contains("1001 bytes"),
            "{}",
            refused[0].reason
        );
        let members: Vec<Vec<u32>> = records.iter().map(|r| r.members.clone()).collect();
        assert_eq!(members, vec![vec![0], vec![1], vec![3]]);
        assert_eq!(records[0].data, magic);
        assert_eq!(records[0].partition_key, "k0");
        assert_eq!(records[1].explicit_hash_key, Some(u128::MAX - 5));
        assert_eq!(records[1].shard, 3);
        assert_eq!(records[0].shard, map.index_of(partition_key_hash("k0")));
        assert!(records.iter().all(|r| r.lands_safely_anywhere));

        let mut batch = RecordBatch::default();
        for _ in 0..200 {
            batch.push(b"line", None, None);
        }
        let idx: Vec<u32> = (0..200).collect();
        let (records, _) = plan(
            &batch,
            &idx,
            &KeyMode::RandomPerAggregate,
            &map,
            &unaggregated,
        );
        assert_eq!(records.len(), 200);
        let keys: std::collections::HashSet<&str> =
            records.iter().map(|r| r.partition_key.as_str()).collect();
        assert_eq!(keys.len(), 200, "a fresh random key per record");
        let shards: std::collections::HashSet<usize> = records.iter().map(|r| r.shard).collect();
        assert_eq!(shards.len(), 4, "random keys reach every shard");
        let (records, _) = plan(
            &batch,
            &idx,
            &KeyMode::Fixed("same".into()),
            &map,
            &unaggregated,
        );
        assert!(records.iter().all(|r| r.partition_key == "same"));
    }

    /// Random keys per aggregate take the shards in turn, each key hashing into its shard, also
    /// when the shards' hash ranges differ in size, and the turn goes on from chunk to chunk.
    #[test]
    fn random_keys_spread_aggregates_evenly_over_the_shards() {
        let bounds = [0u128, u128::MAX / 16, u128::MAX / 8, u128::MAX / 2];
        let shards = (0..4).map(|i| Shard {
            id: format!("shardId-{i:012}"),
            start: bounds[i],
            end: bounds.get(i + 1).map_or(u128::MAX, |b| b - 1),
        });
        let map = ShardMap::new(shards.collect()).unwrap();
        let mut batch = RecordBatch::default();
        for i in 0..2000 {
            batch.push(
                format!("line {i:04} {}", "x".repeat(90)).as_bytes(),
                None,
                None,
            );
        }
        let idx: Vec<u32> = (0..2000).collect();
        let (records, refused) = plan(
            &batch,
            &idx,
            &KeyMode::RandomPerAggregate,
            &map,
            &limits(10_000),
        );
        assert!(refused.is_empty());
        assert!(records.len() >= 20, "{}", records.len());
        let mut per_shard = [0usize; 4];
        for (n, r) in records.iter().enumerate() {
            let shard = map.index_of(partition_key_hash(&r.partition_key));
            assert_eq!(r.shard, shard);
            assert_eq!(shard, (records[0].shard + n) % 4, "shards in turn");
            per_shard[shard] += 1;
        }
        let (least, most) = (per_shard.iter().min(), per_shard.iter().max());
        assert!(most.unwrap() - least.unwrap() <= 1, "{per_shard:?}");
        let keys: std::collections::HashSet<&str> =
            records.iter().map(|r| r.partition_key.as_str()).collect();
        assert_eq!(
            keys.len(),
            records.len(),
            "a fresh random key per aggregate"
        );

        // The next chunks go on where this one stopped, on the same map or a clone of it: three
        // chunks of one aggregate each take the next three shards, not three random ones.
        let small: Vec<u32> = (0..5).collect();
        let clone = map.clone();
        let mut expected = records.last().unwrap().shard;
        for m in [&map, &clone, &map] {
            let (next, _) = plan(
                &batch,
                &small,
                &KeyMode::RandomPerAggregate,
                m,
                &limits(10_000),
            );
            assert_eq!(next.len(), 1);
            expected = (expected + 1) % 4;
            assert_eq!(next[0].shard, expected, "the next chunk's shard");
            assert_eq!(
                map.index_of(partition_key_hash(&next[0].partition_key)),
                expected
            );
        }
    }

    /// Firehose: one record each, or packed up to the record limit in order, with nothing lost or
    /// reordered; a record over the limit alone is refused; PutRecordBatch requests hold at most
    /// 500 records and 4 MiB.
    #[test]
    fn firehose_plans_and_packs_within_the_limits() {
        use crate::config::{
            FIREHOSE_MAX_BYTES_PER_REQUEST as MAX_CALL, FIREHOSE_MAX_RECORD_BYTES as MAX_REC,
        };
        let mut batch = RecordBatch::default();
        let mut expected = Vec::new();
        for i in 0..30_000u32 {
            let line = if i % 5000 == 7 {
                vec![b'z'; MAX_REC] // exactly the limit: alone in its record
            } else {
                format!("{i:0>width$}\n", width = 150 + (i % 90) as usize).into_bytes()
            };
            expected.extend_from_slice(&line);
            batch.push(&line, None, None);
        }
        batch.push(&vec![b'!'; MAX_REC + 1], None, None);
        let idx: Vec<u32> = (0..30_001).collect();

        let (single, refused) = plan_firehose(&batch, &idx, false, MAX_REC);
        assert_eq!(single.len(), 30_000);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].index, 30_000);
        assert!(refused[0].reason.contains("1024001 bytes"));
        let requests = pack(single, 500, MAX_CALL);
        assert!(requests.iter().all(|r| r.len() <= 500
            && r.iter().map(KinesisRecord::billed_size).sum::<usize>() <= MAX_CALL));
        assert_eq!(requests.len(), 60);

        let (packed, refused) = plan_firehose(&batch, &idx, true, MAX_REC);
        assert_eq!(refused.len(), 1);
        assert!(packed.iter().all(|r| r.data.len() <= MAX_REC));
        let joined: Vec<u8> = packed.iter().flat_map(|r| r.data.clone()).collect();
        assert_eq!(joined, expected, "every line once, in order, byte for byte");
        let members: Vec<u32> = packed.iter().flat_map(|r| r.members.clone()).collect();
        assert_eq!(members, (0..30_000).collect::<Vec<_>>());
        // Full records: each but the last of a run is cut only because the next line would not fit.
        let total: usize = expected.len();
        assert!(
            packed.len() <= total.div_ceil(MAX_REC - 250) + 12,
            "{} records",
            packed.len()
        );
        let requests = pack(packed, 500, MAX_CALL);
        for r in &requests {
            assert!(r.iter().map(KinesisRecord::billed_size).sum::<usize>() <= MAX_CALL);
        }
        assert!(requests.len() >= expected.len().div_ceil(MAX_CALL));
    }

    /// With `ordered`, each shard's Kinesis records list its user records in batch order, even
    /// when records with and without explicit hash keys and oversized ones interleave; without,
    /// the two kinds go to separate aggregates and come out of order.
    #[test]
    fn ordered_plans_keep_each_shards_records_in_order() {
        let map = four_shards();
        let mut batch = RecordBatch::default();
        for i in 0..3000u32 {
            let key = format!("key-{}", i % 13);
            let ehk = (i % 3 == 0).then(|| u128::from(i % 4) * (u128::MAX / 4) + 7);
            let size = if i % 97 == 0 { 3000 } else { 40 };
            batch.push(format!("{i:>size$}").as_bytes(), Some(&key), ehk);
        }
        let idx: Vec<u32> = (0..3000).collect();
        let in_order = |ordered: bool| {
            let l = PlanLimits {
                ordered,
                ..limits(2048)
            };
            let (records, refused) = plan(&batch, &idx, &KeyMode::PerRecord, &map, &l);
            assert!(refused.is_empty());
            let mut last: HashMap<usize, u32> = HashMap::new();
            let mut sorted = true;
            let mut seen = 0;
            for r in &records {
                for &m in &r.members {
                    if last.get(&r.shard).is_some_and(|&l| l > m) {
                        sorted = false;
                    }
                    last.insert(r.shard, m);
                    seen += 1;
                }
            }
            assert_eq!(seen, 3000);
            sorted
        };
        assert!(in_order(true));
        assert!(!in_order(false), "the check sees disorder");
    }

    #[test]
    fn per_record_aggregates_stay_in_their_shard() {
        let map = four_shards();
        let mut batch = RecordBatch::default();
        for i in 0..2000 {
            batch.push(
                format!("line {i}").as_bytes(),
                Some(&format!("key-{}", i % 97)),
                None,
            );
        }
        let idx: Vec<u32> = (0..2000).collect();
        let (records, refused) = plan(&batch, &idx, &KeyMode::PerRecord, &map, &limits(4096));
        assert!(refused.is_empty());
        let mut seen = vec![false; 2000];
        for r in &records {
            let shard = &map.shards()[r.shard];
            let landing = r
                .explicit_hash_key
                .unwrap_or_else(|| partition_key_hash(&r.partition_key));
            assert_eq!(map.index_of(landing), r.shard);
            match deaggregate(&r.data) {
                Deaggregated::Aggregate(users) => {
                    assert_eq!(users.len(), r.members.len());
                    for (u, &m) in users.iter().zip(&r.members) {
                        let h = effective_hash_key(u).unwrap();
                        assert!(h >= shard.start && h <= shard.end);
                        assert_eq!(u.data, batch.data(m as usize));
                        seen[m as usize] = true;
                    }
                }
                Deaggregated::PassThrough => {
                    assert_eq!(r.members.len(), 1);
                    seen[r.members[0] as usize] = true;
                }
            }
            assert!(r.billed_size() <= 4096);
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn shared_key_modes_and_raw_singles() {
        let map = four_shards();
        let mut batch = RecordBatch::default();
        batch.push(b"only one", None, None);
        let (records, _) = plan(
            &batch,
            &[0],
            &KeyMode::RandomPerAggregate,
            &map,
            &limits(1024 * 1024),
        );
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].data, b"only one");
        assert_eq!(records[0].partition_key.len(), 32);
        let (records, _) = plan(
            &batch,
            &[0],
            &KeyMode::Fixed("fixed".into()),
            &map,
            &limits(1024 * 1024),
        );
        assert_eq!(records[0].partition_key, "fixed");
        // A record that looks like an aggregate is wrapped even when alone.
        let mut b = AggregateBuilder::new(1024, 1);
        b.try_add("x", None, b"inner");
        let mut batch = RecordBatch::default();
        batch.push(&b.finish(), None, None);
        let (records, _) = plan(
            &batch,
            &[0],
            &KeyMode::Fixed("k".into()),
            &map,
            &limits(1024 * 1024),
        );
        assert!(
            matches!(deaggregate(&records[0].data), Deaggregated::Aggregate(ref u) if u.len() == 1)
        );
    }

    #[test]
    fn oversized_records_go_raw_or_are_refused() {
        let map = four_shards();
        let mut batch = RecordBatch::default();
        batch.push(&vec![b'x'; 1024 * 1024 - 32], None, None); // fits raw with a 32-char key
        batch.push(&vec![b'x'; 1024 * 1024], None, None); // too big with any key
        batch.push(b"small", None, None);
        let (records, refused) = plan(
            &batch,
            &[0, 1, 2],
            &KeyMode::RandomPerAggregate,
            &map,
            &limits(1024 * 1024),
        );
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].index, 1);
        assert_eq!(
            records
                .iter()
                .map(|r| r.members.clone())
                .collect::<Vec<_>>(),
            vec![vec![0], vec![2]]
        );
        assert_eq!(records[0].billed_size(), 1024 * 1024);
    }

    #[test]
    fn packs_full_requests() {
        let rec = |n: usize| KinesisRecord {
            data: vec![0; n],
            partition_key: "a".into(),
            explicit_hash_key: None,
            shard: 0,
            members: vec![],
            lands_safely_anywhere: true,
        };
        let reqs = pack((0..1001).map(|_| rec(10)).collect(), 500, 5 * 1024 * 1024);
        assert_eq!(
            reqs.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![500, 500, 1]
        );
        let reqs = pack(
            (0..11).map(|_| rec(1024 * 1024 - 1)).collect(),
            500,
            5 * 1024 * 1024,
        );
        assert_eq!(reqs.iter().map(Vec::len).collect::<Vec<_>>(), vec![5, 5, 1]);
    }
}
