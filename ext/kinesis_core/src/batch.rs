//! User records in one arena, and the plan that turns them into Kinesis records (aggregates or
//! single raw records) and PutRecords requests. Pure: no network.

use rand::Rng;

use crate::config::KeyMode;
use crate::hashkey::{partition_key_hash, validate_partition_key};
use crate::kpl::{looks_aggregated, AggregateBuilder, AGGREGATE_PARTITION_KEY};
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
#[derive(Default, Debug)]
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
}

impl Planner<'_> {
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
        let data = open.builder.finish();
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
    };
    match mode {
        KeyMode::PerRecord => plan_per_record(&mut p, indexes),
        KeyMode::Fixed(key) => plan_shared_key(&mut p, indexes, || key.clone()),
        KeyMode::RandomPerAggregate => plan_shared_key(&mut p, indexes, random_key),
    }
    (p.out, p.refused)
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
        let Some(key) = p.batch.partition_key(i as usize) else {
            p.refused.push(Refused {
                index: i,
                reason: "record has no partition key".into(),
            });
            continue;
        };
        if let Err(e) = validate_partition_key(key) {
            p.refused.push(Refused {
                index: i,
                reason: e.to_string(),
            });
            continue;
        }
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

/// Packs Kinesis records into PutRecords requests of at most `max_entries` records and
/// `max_bytes` (data plus partition keys), in order, each as full as the limits allow.
pub fn pack(
    records: Vec<KinesisRecord>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Vec<KinesisRecord>> {
    let mut requests = Vec::new();
    let mut current: Vec<KinesisRecord> = Vec::new();
    let mut bytes = 0;
    for r in records {
        let size = r.billed_size();
        if !current.is_empty() && (current.len() >= max_entries || bytes + size > max_bytes) {
            requests.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(r);
    }
    if !current.is_empty() {
        requests.push(current);
    }
    requests
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
        }
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
