//! The KPL aggregated record format: an exact-size encoder and a decoder that applies the
//! KCL's rules.
//!
//! Wire form: `F3 89 9A C2` ‖ protobuf `AggregatedRecord` ‖ MD5(protobuf bytes).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use prost::Message;

use crate::hashkey::{parse_explicit_hash_key, partition_key_hash};
use crate::proto::AggregatedRecord;

/// The four bytes every aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Length of the MD5 trailer.
pub const DIGEST_LEN: usize = 16;
/// Magic plus trailer: what an aggregate adds around its protobuf body.
pub const FRAME_OVERHEAD: usize = MAGIC.len() + DIGEST_LEN;
/// Unused room a finished aggregate may keep; beyond it, the buffer is shrunk to fit.
const UNUSED_KEPT: usize = 64 * 1024;
/// The Kinesis record limit (data plus partition key) of a stream that did not raise it.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The largest record limit a stream can be raised to (UpdateMaxRecordSize).
pub const MAX_RECORD_BYTES_LIMIT: usize = 10 * 1024 * 1024;
/// The partition key the KPL gives an aggregate whose routing rides on its explicit hash key.
pub const AGGREGATE_PARTITION_KEY: &str = "a";

/// MD5 of `data`, by AWS-LC (already linked for TLS): its assembly is faster than the portable
/// `md-5` on x86_64, and this is most of the CPU an aggregate costs.
pub fn md5(data: &[u8]) -> [u8; DIGEST_LEN] {
    let mut digest = [0u8; DIGEST_LEN];
    // SAFETY: MD5 reads `data.len()` bytes from `data` and writes 16 bytes to `digest`.
    unsafe { aws_lc_sys::MD5(data.as_ptr(), data.len(), digest.as_mut_ptr()) };
    digest
}

/// Bytes of `v` as a protobuf varint.
#[inline]
pub fn varint_len(v: u64) -> usize {
    // 1 byte per started group of 7 bits; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of a length-delimited field (1-byte tag, length varint, payload).
#[inline]
fn len_field(payload: usize) -> usize {
    1 + varint_len(payload as u64) + payload
}

/// Hashes a `u64` that already is a hash: the key table's index keys.
#[derive(Default)]
struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// No entry (end of a collision chain).
const NONE: u32 = u32::MAX;

/// A key table with de-duplication, keeping entries in first-seen order.
///
/// The table is kept as its protobuf encoding (tag, length, key bytes per entry), so adding a
/// key allocates nothing per key and `finish` copies it in one piece. The index maps a keyed
/// SipHash of the key to its entry (computed once per lookup); entries whose hashes collide
/// chain through `next`.
#[derive(Default)]
struct KeyTable {
    encoded: Vec<u8>,
    /// Where each entry's key bytes sit in `encoded`.
    spans: Vec<(usize, usize)>,
    next: Vec<u32>,
    index: HashMap<u64, u32, BuildHasherDefault<PrehashedKey>>,
    hasher: RandomState,
}

/// Where a key is or would go in a table.
#[derive(Clone, Copy)]
struct Slot {
    index: u64,
    /// Bytes adding the key would cost (0 if it is present).
    cost: usize,
    hash: u64,
}

impl KeyTable {
    fn key(&self, entry: usize) -> &[u8] {
        let (start, len) = self.spans[entry];
        &self.encoded[start..start + len]
    }

    /// The index `key` has or would get, and the bytes adding it would cost (0 if present).
    #[inline]
    fn lookup(&self, key: &str) -> Slot {
        // The last key is the most likely repeat (one key per aggregate is common).
        if let Some(last) = self.spans.len().checked_sub(1) {
            if self.key(last) == key.as_bytes() {
                // `hash` is only read to insert, and a present key is never inserted.
                return Slot {
                    index: last as u64,
                    cost: 0,
                    hash: 0,
                };
            }
        }
        let hash = self.hasher.hash_one(key);
        let mut entry = self.index.get(&hash).copied().unwrap_or(NONE);
        while entry != NONE {
            if self.key(entry as usize) == key.as_bytes() {
                return Slot {
                    index: u64::from(entry),
                    cost: 0,
                    hash,
                };
            }
            entry = self.next[entry as usize];
        }
        Slot {
            index: self.spans.len() as u64,
            cost: len_field(key.len()),
            hash,
        }
    }

    fn insert(&mut self, field_tag: u8, key: &str, slot: Slot) {
        if slot.cost > 0 {
            debug_assert_eq!(slot.index, self.spans.len() as u64);
            self.encoded.push(field_tag);
            put_varint(&mut self.encoded, key.len() as u64);
            self.spans.push((self.encoded.len(), key.len()));
            self.encoded.extend_from_slice(key.as_bytes());
            let entry = slot.index as u32;
            self.next
                .push(self.index.insert(slot.hash, entry).unwrap_or(NONE));
        }
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    fn clear(&mut self) {
        self.encoded.clear();
        self.spans.clear();
        self.next.clear();
        self.index.clear();
    }
}

/// Builds one aggregated record, knowing before each add whether the record still fits.
///
/// The size that counts is what Kinesis counts: the record's data (magic, protobuf, digest)
/// plus the outer partition key's UTF-8 bytes.
pub struct AggregateBuilder {
    max_bytes: usize,
    outer_key_bytes: usize,
    partition_keys: KeyTable,
    hash_keys: KeyTable,
    hash_key_text: String,
    /// The encoded records, after `front` bytes left for the magic and the key tables, so that
    /// `finish` writes the aggregate in place instead of copying it.
    records: Vec<u8>,
    front: usize,
    count: usize,
}

/// How many bytes a user record costs inside an aggregate, and the indexes it would use.
struct Placement {
    pk: Slot,
    ehk: Option<Slot>,
    record_body: usize,
}

impl AggregateBuilder {
    /// `max_bytes`: the record limit of the stream (data plus partition key).
    /// `outer_key_bytes`: UTF-8 length of the partition key the aggregate will be sent with.
    pub fn new(max_bytes: usize, outer_key_bytes: usize) -> Self {
        AggregateBuilder {
            max_bytes,
            outer_key_bytes,
            partition_keys: KeyTable::default(),
            hash_keys: KeyTable::default(),
            hash_key_text: String::new(),
            records: Vec::new(),
            front: 0,
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the finished record (frame + protobuf) plus the outer key, as it stands.
    pub fn size(&self) -> usize {
        FRAME_OVERHEAD + self.proto_len() + self.outer_key_bytes
    }

    fn proto_len(&self) -> usize {
        self.partition_keys.encoded_len() + self.hash_keys.encoded_len() + self.records.len()
            - self.front
    }

    fn place(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<u128>,
        data_len: usize,
    ) -> Placement {
        let pk = self.partition_keys.lookup(partition_key);
        let ehk = explicit_hash_key.map(|h| {
            self.hash_key_text.clear();
            use std::fmt::Write;
            let _ = write!(self.hash_key_text, "{h}");
            self.hash_keys.lookup(&self.hash_key_text)
        });
        let record_body = 1
            + varint_len(pk.index)
            + ehk.map_or(0, |e| 1 + varint_len(e.index))
            + len_field(data_len);
        Placement {
            pk,
            ehk,
            record_body,
        }
    }

    /// The size of the aggregate if this record were added (see [`AggregateBuilder::size`]).
    pub fn size_with(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<u128>,
        data_len: usize,
    ) -> usize {
        let p = self.place(partition_key, explicit_hash_key, data_len);
        self.size() + p.pk.cost + p.ehk.map_or(0, |e| e.cost) + len_field(p.record_body)
    }

    /// Adds the record if the aggregate stays within its limit; returns whether it did.
    pub fn try_add(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<u128>,
        data: &[u8],
    ) -> bool {
        let p = self.place(partition_key, explicit_hash_key, data.len());
        let grown =
            self.size() + p.pk.cost + p.ehk.map_or(0, |e| e.cost) + len_field(p.record_body);
        if grown > self.max_bytes {
            return false;
        }
        self.partition_keys.insert(0x0a, partition_key, p.pk);
        if let Some(slot) = p.ehk {
            let text = std::mem::take(&mut self.hash_key_text);
            self.hash_keys.insert(0x12, &text, slot);
            self.hash_key_text = text;
        }
        if self.count == 0 {
            // The tables as they stand after the first record; with one shared key (the usual
            // case) they never change again.
            self.front =
                MAGIC.len() + self.partition_keys.encoded_len() + self.hash_keys.encoded_len();
            // Room for the whole aggregate at once: growing by doubling would copy a 1 MiB
            // aggregate's bytes once more and fault in each new buffer. Pages never written
            // cost no memory, and `finish` gives back what a small aggregate left unused.
            self.records
                .reserve(self.max_bytes.min(MAX_RECORD_BYTES_LIMIT) + DIGEST_LEN);
            self.records.resize(self.front, 0);
        }
        let out = &mut self.records;
        out.reserve(len_field(p.record_body));
        out.push(0x1a);
        put_varint(out, p.record_body as u64);
        out.push(0x08);
        put_varint(out, p.pk.index);
        if let Some(slot) = p.ehk {
            out.push(0x10);
            put_varint(out, slot.index);
        }
        out.push(0x1a);
        put_varint(out, data.len() as u64);
        out.extend_from_slice(data);
        self.count += 1;
        debug_assert_eq!(self.size(), grown);
        true
    }

    /// Empties the builder without encoding what it held.
    pub fn clear(&mut self) {
        self.partition_keys.clear();
        self.hash_keys.clear();
        self.records.clear();
        self.front = 0;
        self.count = 0;
    }

    /// Encodes the aggregate (magic, protobuf, MD5) and empties the builder for reuse.
    /// An empty aggregate is garbage to some consumers (Python passes its 20 bytes through as
    /// a record): callers never finish an empty builder.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = self.finish_undigested();
        seal(&mut out);
        out
    }

    /// [`AggregateBuilder::finish`] with the last 16 bytes (the MD5) left zero, for [`seal_all`]
    /// to fill in together with other aggregates'.
    pub fn finish_undigested(&mut self) -> Vec<u8> {
        debug_assert!(!self.is_empty(), "finishing an empty aggregate");
        let proto_len = self.proto_len();
        let (pk, hk) = (&self.partition_keys.encoded, &self.hash_keys.encoded);
        let head = MAGIC.len() + pk.len() + hk.len();
        let mut out = std::mem::take(&mut self.records);
        let front = self.front;
        if head != front {
            // The key tables grew after the first record: move the records up behind them.
            let body = out.len() - front;
            if head > front {
                out.resize(head + body, 0);
            }
            out.copy_within(front..front + body, head);
            out.truncate(head + body);
        }
        out[..MAGIC.len()].copy_from_slice(&MAGIC);
        out[MAGIC.len()..MAGIC.len() + pk.len()].copy_from_slice(pk);
        out[MAGIC.len() + pk.len()..head].copy_from_slice(hk);
        out.extend_from_slice(&[0; DIGEST_LEN]);
        if out.capacity() - out.len() > UNUSED_KEPT {
            out.shrink_to_fit();
        }
        debug_assert_eq!(out.len(), FRAME_OVERHEAD + proto_len);
        self.clear();
        out
    }
}

/// The protobuf of a finished aggregate: what its MD5 covers.
fn digested(aggregate: &[u8]) -> &[u8] {
    &aggregate[MAGIC.len()..aggregate.len() - DIGEST_LEN]
}

/// Writes `digest` into the last 16 bytes of an aggregate from
/// [`AggregateBuilder::finish_undigested`].
fn put_digest(aggregate: &mut [u8], digest: &[u8; DIGEST_LEN]) {
    let n = aggregate.len();
    aggregate[n - DIGEST_LEN..].copy_from_slice(digest);
}

/// Fills in the MD5 of an aggregate from [`AggregateBuilder::finish_undigested`].
fn seal(aggregate: &mut [u8]) {
    let digest = md5(digested(aggregate));
    put_digest(aggregate, &digest);
}

/// [`seal`] for several aggregates, their MD5s computed together ([`crate::md5x::md5_many`]):
/// a chunk's aggregates are sealed at once.
pub fn seal_all(aggregates: &mut [&mut Vec<u8>]) {
    for group in aggregates.chunks_mut(crate::md5x::LANES) {
        let digests = {
            let messages: Vec<&[u8]> = group.iter().map(|a| digested(a)).collect();
            crate::md5x::md5_many(&messages)
        };
        for (a, d) in group.iter_mut().zip(&digests) {
            put_digest(a, d);
        }
    }
}

/// Whether a consumer could mistake `data` for an aggregate: it starts with the magic. The KCL
/// and Python check the digest first, but Node's `aws-kinesis-agg` fails on any record with the
/// magic, so such a user record is never sent raw.
pub fn looks_aggregated(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// One user record as a consumer sees it after deaggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

/// What reading one Kinesis record gives, under the KCL's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deaggregated {
    /// Not an aggregate (no magic, bad digest or unreadable protobuf): the record as it is.
    PassThrough,
    /// The user records of a valid aggregate, in order.
    Aggregate(Vec<UserRecord>),
}

/// Why an aggregate fails the KCL's shard-range check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user record {index} has hash key {hash_key}, outside the shard's range {start}..={end}: the KCL drops the whole aggregate")]
pub struct OutOfShardRange {
    pub index: usize,
    pub hash_key: u128,
    pub start: u128,
    pub end: u128,
}

/// Reads a Kinesis record's data as the KCL does (without the shard check).
pub fn deaggregate(data: &[u8]) -> Deaggregated {
    if data.len() < FRAME_OVERHEAD || data[..MAGIC.len()] != MAGIC {
        return Deaggregated::PassThrough;
    }
    let body = &data[MAGIC.len()..data.len() - DIGEST_LEN];
    if md5(body)[..] != data[data.len() - DIGEST_LEN..] {
        return Deaggregated::PassThrough;
    }
    let Ok(agg) = AggregatedRecord::decode(body) else {
        return Deaggregated::PassThrough;
    };
    let mut out = Vec::with_capacity(agg.records.len());
    for r in agg.records {
        let Some(pk) = agg.partition_key_table.get(r.partition_key_index as usize) else {
            return Deaggregated::PassThrough;
        };
        let ehk = match r.explicit_hash_key_index {
            Some(i) => match agg.explicit_hash_key_table.get(i as usize) {
                Some(k) => Some(k.clone()),
                None => return Deaggregated::PassThrough,
            },
            None => None,
        };
        out.push(UserRecord {
            partition_key: pk.clone(),
            explicit_hash_key: ehk,
            data: r.data,
        });
    }
    Deaggregated::Aggregate(out)
}

/// The hash key a consumer computes for a user record: its explicit hash key, else md5(pk).
pub fn effective_hash_key(record: &UserRecord) -> Result<u128, crate::hashkey::KeyError> {
    match &record.explicit_hash_key {
        Some(k) => parse_explicit_hash_key(k),
        None => Ok(partition_key_hash(&record.partition_key)),
    }
}

/// The KCL's shard-range check: every user record of an aggregate read from a shard covering
/// `start..=end` must hash into that range, or the KCL drops all of them.
pub fn check_shard_range(
    records: &[UserRecord],
    start: u128,
    end: u128,
) -> Result<(), OutOfShardRange> {
    for (index, r) in records.iter().enumerate() {
        // An unparsable explicit hash key is as fatal to the KCL as one out of range.
        let parsed = effective_hash_key(r);
        let hash_key = *parsed.as_ref().unwrap_or(&u128::MAX);
        if parsed.is_err() || hash_key < start || hash_key > end {
            return Err(OutOfShardRange {
                index,
                hash_key,
                start,
                end,
            });
        }
    }
    Ok(())
}

/// What a KCL consumer reading from a shard covering `start..=end` delivers for one record.
pub fn kcl_user_records(
    data: &[u8],
    partition_key: &str,
    start: u128,
    end: u128,
) -> Vec<UserRecord> {
    match deaggregate(data) {
        Deaggregated::PassThrough => {
            vec![UserRecord {
                partition_key: partition_key.to_string(),
                explicit_hash_key: None,
                data: data.to_vec(),
            }]
        }
        Deaggregated::Aggregate(records) => match check_shard_range(&records, start, end) {
            Ok(()) => records,
            Err(_) => Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Record;
    use md5::{Digest, Md5};

    #[test]
    fn varint_lengths() {
        for (v, n) in [
            (0u64, 1),
            (1, 1),
            (127, 1),
            (128, 2),
            (16383, 2),
            (16384, 3),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(v), n, "{v}");
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), n);
        }
    }

    #[test]
    fn encodes_like_prost_and_dedups_keys() {
        let mut b = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, 1);
        assert!(b.try_add("k1", None, b"one"));
        assert!(b.try_add("k2", Some(42), b"two"));
        assert!(b.try_add("k1", Some(42), b""));
        let size = b.size();
        let bytes = b.finish();
        assert_eq!(bytes.len() + 1, size);
        let expected = AggregatedRecord {
            partition_key_table: vec!["k1".into(), "k2".into()],
            explicit_hash_key_table: vec!["42".into()],
            records: vec![
                Record {
                    partition_key_index: 0,
                    explicit_hash_key_index: None,
                    data: b"one".to_vec(),
                    tags: vec![],
                },
                Record {
                    partition_key_index: 1,
                    explicit_hash_key_index: Some(0),
                    data: b"two".to_vec(),
                    tags: vec![],
                },
                Record {
                    partition_key_index: 0,
                    explicit_hash_key_index: Some(0),
                    data: vec![],
                    tags: vec![],
                },
            ],
        };
        let body = expected.encode_to_vec();
        assert_eq!(&bytes[4..bytes.len() - 16], &body[..]);
        assert_eq!(&bytes[..4], &MAGIC);
        assert_eq!(&bytes[bytes.len() - 16..], &Md5::digest(&body)[..]);
        assert!(b.is_empty());
        assert!(looks_aggregated(&bytes));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut b = AggregateBuilder::new(100, 1);
        // 4 + 16 + 1 (outer key) = 21; record: pk table 3, record 2+2+(2+n)
        let n = 100 - 21 - 3 - 2 - 2 - 2;
        assert_eq!(b.size_with("k", None, n), 100);
        assert!(!b.try_add("k", None, &vec![0; n + 1]));
        assert!(b.try_add("k", None, &vec![0; n]));
        assert_eq!(b.size(), 100);
        assert!(!b.try_add("k", None, b""));
    }

    #[test]
    fn kcl_rules() {
        assert_eq!(deaggregate(b"plain"), Deaggregated::PassThrough);
        let mut b = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, 1);
        b.try_add("a", None, b"x");
        let mut bytes = b.finish();
        let h = partition_key_hash("a");
        assert_eq!(kcl_user_records(&bytes, "a", h, h).len(), 1);
        assert!(kcl_user_records(&bytes, "a", h + 1, u128::MAX).is_empty());
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(deaggregate(&bytes), Deaggregated::PassThrough);
        assert_eq!(
            kcl_user_records(&bytes, "a", h + 1, u128::MAX)[0].data,
            bytes
        );
    }
}
