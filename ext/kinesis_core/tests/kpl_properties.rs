//! Property tests for the KPL aggregate encoder (`AggregateBuilder`) and the decoder that
//! applies the KCL's rules (`deaggregate`, `check_shard_range`, `kcl_user_records`).

use std::collections::HashSet;
use std::hash::Hash;

use kinesis_core::hashkey::{partition_key_hash, validate_partition_key};
use kinesis_core::kpl::{
    check_shard_range, deaggregate, effective_hash_key, kcl_user_records, looks_aggregated,
    AggregateBuilder, Deaggregated, UserRecord, DEFAULT_MAX_RECORD_BYTES, DIGEST_LEN,
    FRAME_OVERHEAD, MAGIC,
};
use kinesis_core::proto::{self, AggregatedRecord};
use md5::{Digest, Md5};
use proptest::prelude::*;
use prost::Message;

/// A user record as the producer hands it to the builder.
#[derive(Debug, Clone)]
struct Rec {
    pk: String,
    ehk: Option<u128>,
    data: Vec<u8>,
}

impl Rec {
    fn expected(&self) -> UserRecord {
        UserRecord {
            partition_key: self.pk.clone(),
            explicit_hash_key: self.ehk.map(|h| h.to_string()),
            data: self.data.clone(),
        }
    }

    fn hash_key(&self) -> u128 {
        self.ehk.unwrap_or_else(|| partition_key_hash(&self.pk))
    }

    fn add_to(&self, builder: &mut AggregateBuilder) -> bool {
        builder.try_add(&self.pk, self.ehk, &self.data)
    }
}

/// Partition keys Kinesis accepts (1..=256 characters): a small pool that repeats, ASCII,
/// any printable Unicode (multibyte), and keys of exactly 256 characters of 1 to 4 bytes each.
fn partition_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["k0", "k1", "k2", "fluentd", "日本語キー", "0", "42"]).prop_map(String::from),
        3 => "[a-zA-Z0-9_.-]{1,32}",
        2 => "\\PC{1,16}",
        1 => "[aé日🎉]{256}",
        1 => "[a-z]{256}",
    ]
}

fn explicit_hash_key() -> impl Strategy<Value = Option<u128>> {
    prop_oneof![
        4 => Just(None),
        2 => any::<u128>().prop_map(Some),
        1 => prop::sample::select(vec![0u128, 1, 127, 1 << 127, u128::MAX]).prop_map(Some),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        1 => Just((0..=255u8).collect()),
        4 => prop::collection::vec(any::<u8>(), 0..200),
        1 => prop::collection::vec(any::<u8>(), 200..4000),
    ]
}

fn record() -> impl Strategy<Value = Rec> {
    (partition_key(), explicit_hash_key(), data()).prop_map(|(pk, ehk, data)| Rec { pk, ehk, data })
}

fn records(max: usize) -> impl Strategy<Value = Vec<Rec>> {
    prop::collection::vec(record(), 1..max)
}

/// The user records of a valid aggregate; panics on anything a consumer would pass through.
fn user_records(bytes: &[u8]) -> Vec<UserRecord> {
    match deaggregate(bytes) {
        Deaggregated::Aggregate(records) => records,
        Deaggregated::PassThrough => panic!(
            "a finished aggregate of {} bytes was read as a plain record",
            bytes.len()
        ),
    }
}

/// The protobuf body of an aggregate, decoded.
fn body(bytes: &[u8]) -> AggregatedRecord {
    AggregatedRecord::decode(&bytes[MAGIC.len()..bytes.len() - DIGEST_LEN])
        .expect("protobuf body decodes")
}

fn first_seen<T: Eq + Hash + Clone>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|i| seen.insert(i.clone()))
        .collect()
}

/// Builds one aggregate from records that must all fit, checking the size bookkeeping.
fn build_all(records: &[Rec], max_bytes: usize, outer_key_bytes: usize) -> Vec<u8> {
    let mut builder = AggregateBuilder::new(max_bytes, outer_key_bytes);
    for r in records {
        assert!(r.add_to(&mut builder), "record did not fit");
    }
    let size = builder.size();
    let bytes = builder.finish();
    assert_eq!(size, bytes.len() + outer_key_bytes);
    bytes
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(192))]

    /// Every record comes back byte-for-byte, in order, with its keys; the key tables hold each
    /// distinct key once in first-seen order; the body is canonical protobuf; a builder reused
    /// after `finish` starts from a clean slate.
    #[test]
    fn round_trips_in_order(records in records(64), outer in 1usize..=256) {
        for r in &records {
            prop_assert!(validate_partition_key(&r.pk).is_ok());
        }
        let mut builder = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, outer);
        let reversed: Vec<Rec> = records.iter().rev().cloned().collect();
        for batch in [&records, &reversed] {
            for r in batch.iter() {
                prop_assert!(r.add_to(&mut builder));
            }
            prop_assert_eq!(builder.len(), batch.len());
            let size = builder.size();
            let bytes = builder.finish();
            prop_assert_eq!(size, bytes.len() + outer);
            prop_assert!(size <= DEFAULT_MAX_RECORD_BYTES);
            prop_assert!(builder.is_empty());
            prop_assert_eq!(builder.size(), FRAME_OVERHEAD + outer);

            prop_assert_eq!(&bytes[..4], &MAGIC[..]);
            prop_assert!(looks_aggregated(&bytes));
            let expected: Vec<UserRecord> = batch.iter().map(Rec::expected).collect();
            prop_assert_eq!(user_records(&bytes), expected);

            let decoded = body(&bytes);
            prop_assert_eq!(&decoded.partition_key_table, &first_seen(batch.iter().map(|r| r.pk.clone())));
            prop_assert_eq!(
                &decoded.explicit_hash_key_table,
                &first_seen(batch.iter().filter_map(|r| r.ehk.map(|h| h.to_string())))
            );
            prop_assert_eq!(&decoded.encode_to_vec()[..], &bytes[4..bytes.len() - 16]);
            prop_assert_eq!(&Md5::digest(&bytes[4..bytes.len() - 16])[..], &bytes[bytes.len() - 16..]);
        }
    }

    /// `size()` after any number of adds is exactly what `finish` then produces plus the outer
    /// key, and `size_with` predicts it.
    #[test]
    fn size_is_exact_after_every_add(records in records(24), outer in 1usize..=256) {
        for k in 1..=records.len() {
            let mut builder = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, outer);
            for r in &records[..k - 1] {
                prop_assert!(r.add_to(&mut builder));
            }
            let last = &records[k - 1];
            let predicted = builder.size_with(&last.pk, last.ehk, last.data.len());
            prop_assert!(last.add_to(&mut builder));
            prop_assert_eq!(builder.size(), predicted);
            let bytes = builder.finish();
            prop_assert_eq!(bytes.len() + outer, predicted);
        }
    }

    /// Under a small limit: `try_add` refuses exactly when `size_with` exceeds the limit, a
    /// refusal changes nothing, the size never exceeds the limit, and splitting into several
    /// aggregates (finish, then retry on the empty builder) loses and reorders nothing except
    /// records too big for any aggregate.
    #[test]
    fn refuses_exactly_when_over_the_limit(
        records in records(80),
        max in 100usize..8192,
        outer in 1usize..=64,
    ) {
        let mut builder = AggregateBuilder::new(max, outer);
        let mut aggregates = Vec::new();
        let mut delivered = Vec::new();
        for r in &records {
            let mut accepted = false;
            for attempt in 0..2 {
                let (size_before, len_before) = (builder.size(), builder.len());
                let predicted = builder.size_with(&r.pk, r.ehk, r.data.len());
                let added = r.add_to(&mut builder);
                prop_assert_eq!(added, predicted <= max, "size_with {} vs max {}", predicted, max);
                if added {
                    prop_assert_eq!(builder.size(), predicted);
                    prop_assert_eq!(builder.len(), len_before + 1);
                    accepted = true;
                    break;
                }
                prop_assert_eq!(builder.size(), size_before);
                prop_assert_eq!(builder.len(), len_before);
                if attempt == 0 && !builder.is_empty() {
                    let size = builder.size();
                    let bytes = builder.finish();
                    prop_assert_eq!(bytes.len() + outer, size);
                    aggregates.push(bytes);
                } else {
                    break;
                }
            }
            prop_assert!(builder.size() <= max);
            if accepted {
                delivered.push(r.expected());
            } else {
                // Refused by an empty builder: too big for any aggregate under this limit.
                prop_assert!(builder.is_empty());
                prop_assert!(builder.size_with(&r.pk, r.ehk, r.data.len()) > max);
            }
        }
        if !builder.is_empty() {
            aggregates.push(builder.finish());
        }
        let mut decoded = Vec::new();
        for bytes in &aggregates {
            prop_assert!(bytes.len() + outer <= max);
            decoded.extend(user_records(bytes));
        }
        prop_assert_eq!(decoded, delivered);
    }

    /// A record whose data length makes `size_with` equal the limit exactly is accepted, one
    /// byte more is refused, and nothing fits afterwards.
    #[test]
    fn a_record_of_exactly_the_limit_is_accepted(
        prefix in prop::collection::vec(record(), 0..8),
        last in record(),
        n in 0usize..5000,
        outer in 1usize..=256,
    ) {
        let mut probe = AggregateBuilder::new(usize::MAX, outer);
        for r in &prefix {
            prop_assert!(r.add_to(&mut probe));
        }
        let max = probe.size_with(&last.pk, last.ehk, n);
        let mut builder = AggregateBuilder::new(max, outer);
        for r in &prefix {
            prop_assert!(r.add_to(&mut builder));
        }
        prop_assert!(!builder.try_add(&last.pk, last.ehk, &vec![0xA5; n + 1]));
        let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
        prop_assert!(builder.try_add(&last.pk, last.ehk, &data));
        prop_assert_eq!(builder.size(), max);
        prop_assert!(!builder.try_add(&last.pk, last.ehk, b""));
        let bytes = builder.finish();
        prop_assert_eq!(bytes.len() + outer, max);
        let decoded = user_records(&bytes);
        prop_assert_eq!(decoded.len(), prefix.len() + 1);
        prop_assert_eq!(&decoded.last().unwrap().data, &data);
    }

    /// A single record, on its own.
    #[test]
    fn one_record(r in record(), outer in 1usize..=256) {
        let bytes = build_all(std::slice::from_ref(&r), DEFAULT_MAX_RECORD_BYTES, outer);
        prop_assert_eq!(user_records(&bytes), vec![r.expected()]);
        let decoded = body(&bytes);
        prop_assert_eq!(decoded.partition_key_table, vec![r.pk.clone()]);
        prop_assert_eq!(decoded.explicit_hash_key_table.len(), usize::from(r.ehk.is_some()));
    }
}

proptest! {
    #![proptest_config(config(16))]

    /// Thousands of distinct keys, repeated in random order: one table entry per distinct key,
    /// first-seen order, multi-byte varint indexes, exact size accounting.
    #[test]
    fn thousands_of_distinct_keys(
        picks in prop::collection::vec(0usize..4000, 2000..8000),
        ehk_every in 1usize..5,
    ) {
        let records: Vec<Rec> = picks
            .iter()
            .map(|&i| Rec {
                pk: if i % 2 == 0 { format!("pk-{i:05}") } else { format!("ключ-{i:05}-🎉") },
                // An odd multiplier is a bijection mod 2^128: distinct i, distinct key.
                ehk: (i % ehk_every == 0).then(|| (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)),
                data: i.to_be_bytes().to_vec(),
            })
            .collect();
        let bytes = build_all(&records, DEFAULT_MAX_RECORD_BYTES, 1);
        let decoded = body(&bytes);
        let distinct_pks = picks.iter().collect::<HashSet<_>>().len();
        let distinct_ehks = records.iter().filter_map(|r| r.ehk).collect::<HashSet<_>>().len();
        prop_assert_eq!(decoded.partition_key_table.len(), distinct_pks);
        prop_assert_eq!(decoded.explicit_hash_key_table.len(), distinct_ehks);
        prop_assert_eq!(decoded.partition_key_table, first_seen(records.iter().map(|r| r.pk.clone())));
        prop_assert_eq!(user_records(&bytes), records.iter().map(Rec::expected).collect::<Vec<_>>());
    }
}

/// 20,000 distinct keys: table indexes reach 3-byte varints (≥ 16384).
#[test]
fn twenty_thousand_distinct_keys() {
    let records: Vec<Rec> = (0..20_000u32)
        .map(|i| Rec {
            pk: format!("{i:x}"),
            ehk: Some(u128::from(i) * 1_000_003),
            data: vec![i as u8],
        })
        .chain((0..20_000u32).step_by(7).map(|i| Rec {
            pk: format!("{i:x}"),
            ehk: None,
            data: vec![],
        }))
        .collect();
    let bytes = build_all(&records, DEFAULT_MAX_RECORD_BYTES, 1);
    let decoded = body(&bytes);
    assert_eq!(decoded.partition_key_table.len(), 20_000);
    assert_eq!(decoded.explicit_hash_key_table.len(), 20_000);
    assert_eq!(decoded.records[19_999].partition_key_index, 19_999);
    assert_eq!(
        decoded.records[20_000 + 16_384 / 7 + 1].partition_key_index,
        (16_384 / 7 + 1) * 7
    );
    assert_eq!(
        user_records(&bytes),
        records.iter().map(Rec::expected).collect::<Vec<_>>()
    );
}

/// A single record of exactly the 1 MiB Kinesis limit (data + outer key), for several key
/// shapes; and across every varint boundary of the data length the builder refuses exactly
/// what `size_with` says is over.
#[test]
fn exactly_one_mebibyte() {
    let mut exact = 0;
    for (pk, ehk, outer) in [
        ("a", None, 1),
        ("日本語", Some(u128::MAX), 9),
        (&*"é".repeat(256), Some(0), 512),
    ] {
        let mut probe = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, outer);
        let n = (0..DEFAULT_MAX_RECORD_BYTES)
            .rev()
            .find(|&n| probe.size_with(pk, ehk, n) <= DEFAULT_MAX_RECORD_BYTES)
            .unwrap();
        if probe.size_with(pk, ehk, n) != DEFAULT_MAX_RECORD_BYTES {
            // A varint grew between n and n + 1: no length hits the limit exactly.
            continue;
        }
        let data: Vec<u8> = (0..n).map(|i| (i * 31) as u8).collect();
        let mut builder = AggregateBuilder::new(DEFAULT_MAX_RECORD_BYTES, outer);
        assert!(!builder.try_add(pk, ehk, &vec![0; n + 1]));
        assert!(builder.try_add(pk, ehk, &data));
        assert_eq!(builder.size(), DEFAULT_MAX_RECORD_BYTES);
        let bytes = builder.finish();
        assert_eq!(bytes.len() + outer, DEFAULT_MAX_RECORD_BYTES);
        let records = user_records(&bytes);
        assert_eq!(records.len(), 1);
        assert!(records[0].data == data);
        exact += 1;
    }
    assert!(
        exact >= 2,
        "only {exact} key shapes could hit 1 MiB exactly"
    );

    for boundary in [127usize, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
        for n in boundary.saturating_sub(3)..boundary + 3 {
            let mut probe = AggregateBuilder::new(usize::MAX, 1);
            let exact = probe.size_with("k", None, n);
            for max in exact - 2..exact + 2 {
                let mut builder = AggregateBuilder::new(max, 1);
                let predicted = builder.size_with("k", None, n);
                assert_eq!(predicted, exact);
                assert_eq!(
                    builder.try_add("k", None, &vec![7; n]),
                    exact <= max,
                    "n={n} max={max}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// The KCL's shard filter: an aggregate whose records all hash into the shard's range is
    /// delivered whole; if the range misses the lowest or highest hash key, nothing is.
    #[test]
    fn kcl_shard_range_on_own_hash_keys(records in records(40)) {
        let bytes = build_all(&records, DEFAULT_MAX_RECORD_BYTES, 1);
        let delivered = user_records(&bytes);
        let hash_keys: Vec<u128> = records.iter().map(Rec::hash_key).collect();
        for (r, h) in delivered.iter().zip(&hash_keys) {
            prop_assert_eq!(effective_hash_key(r), Ok(*h));
        }
        let lo = *hash_keys.iter().min().unwrap();
        let hi = *hash_keys.iter().max().unwrap();
        prop_assert_eq!(check_shard_range(&delivered, lo, hi), Ok(()));
        prop_assert_eq!(&kcl_user_records(&bytes, "a", lo, hi), &delivered);
        prop_assert_eq!(&kcl_user_records(&bytes, "a", 0, u128::MAX), &delivered);
        if lo < hi {
            let err = check_shard_range(&delivered, lo + 1, hi).unwrap_err();
            prop_assert_eq!(err.index, hash_keys.iter().position(|&h| h == lo).unwrap());
            prop_assert_eq!(err.hash_key, lo);
            prop_assert!(kcl_user_records(&bytes, "a", lo + 1, hi).is_empty());
            let err = check_shard_range(&delivered, lo, hi - 1).unwrap_err();
            prop_assert_eq!(err.index, hash_keys.iter().position(|&h| h == hi).unwrap());
            prop_assert!(kcl_user_records(&bytes, "a", lo, hi - 1).is_empty());
        }
    }

    /// Records routed by explicit hash keys into a random shard range are all delivered; one
    /// record outside it, anywhere in the aggregate, makes the KCL drop every record.
    #[test]
    fn kcl_drops_an_aggregate_with_one_record_outside(
        bounds in (any::<u128>(), any::<u128>()),
        inside in prop::collection::vec((any::<u128>(), partition_key(), data()), 1..30),
        outlier_at in any::<prop::sample::Index>(),
        outlier_offset in any::<u128>(),
        outlier_pk in partition_key(),
    ) {
        let (start, end) = (bounds.0.min(bounds.1), bounds.0.max(bounds.1));
        prop_assume!(start > 0 || end < u128::MAX);
        let width = end - start;
        let mut records: Vec<Rec> = inside
            .into_iter()
            .map(|(h, pk, data)| Rec {
                pk,
                // width < u128::MAX here, so width + 1 does not overflow.
                ehk: Some(start + h % (width + 1)),
                data,
            })
            .collect();
        let bytes = build_all(&records, DEFAULT_MAX_RECORD_BYTES, 1);
        prop_assert_eq!(kcl_user_records(&bytes, "a", start, end).len(), records.len());

        let outside = if start > 0 { outlier_offset % start } else { end + 1 + outlier_offset % (u128::MAX - end) };
        let at = outlier_at.index(records.len() + 1);
        records.insert(at, Rec { pk: outlier_pk, ehk: Some(outside), data: b"stray".to_vec() });
        let bytes = build_all(&records, DEFAULT_MAX_RECORD_BYTES, 1);
        let err = check_shard_range(&user_records(&bytes), start, end).unwrap_err();
        prop_assert_eq!(err.index, at);
        prop_assert_eq!(err.hash_key, outside);
        prop_assert!(kcl_user_records(&bytes, "a", start, end).is_empty());
    }

    /// A corrupted aggregate (any single bit flipped, in the magic, the body or the digest) or a
    /// truncated one is not an aggregate: consumers pass it through as one plain record.
    #[test]
    fn bad_checksum_passes_through(
        records in records(10),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = build_all(&records, DEFAULT_MAX_RECORD_BYTES, 1);
        let mut bad = bytes.clone();
        bad[at.index(bytes.len())] ^= 1 << bit;
        prop_assert_eq!(deaggregate(&bad), Deaggregated::PassThrough);
        // Anything starting with the magic is kept from being sent raw (Node fails on it).
        prop_assert_eq!(looks_aggregated(&bad), bad.starts_with(&MAGIC));
        let plain = vec![UserRecord { partition_key: "outer".into(), explicit_hash_key: None, data: bad.clone() }];
        prop_assert_eq!(kcl_user_records(&bad, "outer", 0, u128::MAX), plain);

        let truncated = &bytes[..cut.index(bytes.len())];
        prop_assert_eq!(deaggregate(truncated), Deaggregated::PassThrough);
        prop_assert_eq!(looks_aggregated(truncated), truncated.starts_with(&MAGIC));
        let plain = kcl_user_records(truncated, "outer", 0, 0);
        prop_assert_eq!(plain.len(), 1);
        prop_assert_eq!(plain[0].data.as_slice(), truncated);
    }

    /// Data that is not an aggregate (no magic, or the magic followed by anything but a body
    /// and its digest) passes through unchanged, whatever the shard range.
    #[test]
    fn non_aggregated_passes_through(
        data in prop::collection::vec(any::<u8>(), 0..300),
        with_magic in any::<bool>(),
        pk in partition_key(),
    ) {
        let data = if with_magic { [&MAGIC[..], &data].concat() } else { data };
        prop_assume!(with_magic || !data.starts_with(&MAGIC));
        prop_assert_eq!(deaggregate(&data), Deaggregated::PassThrough);
        prop_assert_eq!(looks_aggregated(&data), with_magic);
        let got = kcl_user_records(&data, &pk, 5, 5);
        prop_assert_eq!(got, vec![UserRecord { partition_key: pk.clone(), explicit_hash_key: None, data: data.clone() }]);
    }
}

/// A body with a valid digest that is not a readable `AggregatedRecord` passes through, and so
/// does one whose record points past the key tables.
#[test]
fn unreadable_body_with_valid_digest_passes_through() {
    let frame = |body: &[u8]| [&MAGIC[..], body, &Md5::digest(body)[..]].concat();
    // Field 1 with wire type 7, which does not exist.
    let garbage = frame(&[0x0f]);
    assert_eq!(deaggregate(&garbage), Deaggregated::PassThrough);
    assert_eq!(
        kcl_user_records(&garbage, "p", 0, u128::MAX)[0].data,
        garbage
    );

    let dangling = AggregatedRecord {
        partition_key_table: vec!["p".into()],
        explicit_hash_key_table: vec![],
        records: vec![proto::Record {
            partition_key_index: 1,
            explicit_hash_key_index: None,
            data: vec![1],
            tags: vec![],
        }],
    };
    assert_eq!(
        deaggregate(&frame(&dangling.encode_to_vec())),
        Deaggregated::PassThrough
    );
    let dangling_ehk = AggregatedRecord {
        partition_key_table: vec!["p".into()],
        explicit_hash_key_table: vec![],
        records: vec![proto::Record {
            partition_key_index: 0,
            explicit_hash_key_index: Some(0),
            data: vec![1],
            tags: vec![],
        }],
    };
    assert_eq!(
        deaggregate(&frame(&dangling_ehk.encode_to_vec())),
        Deaggregated::PassThrough
    );
}

/// An explicit hash key that Kinesis would refuse (leading zero, above 2^128-1) fails the
/// shard check even for the full range: the KCL cannot place the record, so it drops the lot.
#[test]
fn unparsable_explicit_hash_key_fails_the_shard_check() {
    for bad in ["01", "340282366920938463463374607431768211456", "-1", ""] {
        let agg = AggregatedRecord {
            partition_key_table: vec!["p".into()],
            explicit_hash_key_table: vec!["5".into(), bad.into()],
            records: vec![
                proto::Record {
                    partition_key_index: 0,
                    explicit_hash_key_index: Some(0),
                    data: vec![1],
                    tags: vec![],
                },
                proto::Record {
                    partition_key_index: 0,
                    explicit_hash_key_index: Some(1),
                    data: vec![2],
                    tags: vec![],
                },
            ],
        };
        let body = agg.encode_to_vec();
        let bytes = [&MAGIC[..], &body, &Md5::digest(&body)[..]].concat();
        let records = user_records(&bytes);
        assert_eq!(records[1].explicit_hash_key.as_deref(), Some(bad));
        assert_eq!(
            check_shard_range(&records, 0, u128::MAX).unwrap_err().index,
            1,
            "{bad:?}"
        );
        assert!(kcl_user_records(&bytes, "p", 0, u128::MAX).is_empty());
    }
}
