//! `FluentPluginKinesisRs::Native.aggregate` / `.deaggregate`: KPL aggregated records.
//!
//! Ruby values are converted to owned Rust data first; the work itself ([`aggregate_records`])
//! is plain Rust, testable with `cargo test` and ready to run without the GVL later.

use kinesis_core::hashkey::{parse_explicit_hash_key, validate_partition_key, KeyError};
use kinesis_core::kpl::{self, AggregateBuilder, Deaggregated, AGGREGATE_PARTITION_KEY};
use magnus::{function, prelude::*, Error, RArray, RModule, RString, Ruby, Value};

use crate::errors::{to_ruby_error, RubyErrorClass};

/// One user record to aggregate, owned by Rust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInput {
    pub data: Vec<u8>,
    pub partition_key: String,
    pub explicit_hash_key: Option<u128>,
}

/// Why a batch of records could not be aggregated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggregationError {
    RecordTooLarge {
        index: usize,
        size: usize,
        max_bytes: usize,
    },
    InvalidKey {
        index: usize,
        source: KeyError,
    },
}

impl std::fmt::Display for AggregationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AggregationError::RecordTooLarge { index, size, max_bytes } => write!(
                f,
                "record {index} needs {size} bytes as an aggregate (data, partition key and framing), more than max_bytes {max_bytes}"
            ),
            AggregationError::InvalidKey { index, source } => write!(f, "record {index}: {source}"),
        }
    }
}

impl std::error::Error for AggregationError {}

impl RubyErrorClass for AggregationError {
    fn ruby_class_name(&self) -> &'static str {
        match self {
            AggregationError::RecordTooLarge { .. } => "RecordTooLargeError",
            AggregationError::InvalidKey { .. } => "InvalidKeyError",
        }
    }
}

/// Packs records, in order, into as few aggregates as the greedy rule gives: each aggregate
/// (data plus the outer partition key "a") stays within `max_bytes`, and a new one starts when
/// the next record does not fit.
pub fn aggregate_records(
    records: &[RecordInput],
    max_bytes: usize,
) -> Result<Vec<Vec<u8>>, AggregationError> {
    let mut out = Vec::new();
    let mut builder = AggregateBuilder::new(max_bytes, AGGREGATE_PARTITION_KEY.len());
    for (index, record) in records.iter().enumerate() {
        let key = record.partition_key.as_str();
        if builder.try_add(key, record.explicit_hash_key, &record.data) {
            continue;
        }
        if !builder.is_empty() {
            out.push(builder.finish());
            if builder.try_add(key, record.explicit_hash_key, &record.data) {
                continue;
            }
        }
        // It does not fit even an empty aggregate.
        let size = builder.size_with(key, record.explicit_hash_key, record.data.len());
        return Err(AggregationError::RecordTooLarge {
            index,
            size,
            max_bytes,
        });
    }
    if !builder.is_empty() {
        out.push(builder.finish());
    }
    Ok(out)
}

/// Copies one `[data, partition_key, explicit_hash_key_or_nil]` entry into Rust.
fn record_from_ruby(
    index: usize,
    entry: Value,
) -> Result<Result<RecordInput, AggregationError>, Error> {
    let (data, partition_key, explicit_hash_key) =
        <(RString, String, Option<String>)>::try_convert(entry)?;
    // SAFETY: the bytes are copied at once; no Ruby code runs while the slice is borrowed.
    let data = unsafe { data.as_slice() }.to_vec();
    let parsed = validate_partition_key(&partition_key)
        .and_then(|()| {
            explicit_hash_key
                .as_deref()
                .map(parse_explicit_hash_key)
                .transpose()
        })
        .map_err(|source| AggregationError::InvalidKey { index, source });
    Ok(parsed.map(|explicit_hash_key| RecordInput {
        data,
        partition_key,
        explicit_hash_key,
    }))
}

/// `Native.aggregate(records, max_bytes)` → Array of binary Strings.
fn aggregate(ruby: &Ruby, records: RArray, max_bytes: usize) -> Result<RArray, Error> {
    let mut inputs = Vec::with_capacity(records.len());
    // Indexing (not a slice) because a conversion may call Ruby (to_str), which could change
    // the array under us.
    for index in 0..records.len() {
        let entry: Value = records.entry(index as isize)?;
        let record = record_from_ruby(index, entry)?.map_err(|e| to_ruby_error(ruby, &e))?;
        inputs.push(record);
    }
    let aggregates = aggregate_records(&inputs, max_bytes).map_err(|e| to_ruby_error(ruby, &e))?;
    let out = ruby.ary_new_capa(aggregates.len());
    for bytes in &aggregates {
        out.push(ruby.str_from_slice(bytes))?;
    }
    Ok(out)
}

/// `Native.deaggregate(bytes)` → nil if `bytes` is not an aggregate (as the KCL reads it),
/// else Array of `[partition_key, explicit_hash_key_or_nil, data]`.
fn deaggregate(ruby: &Ruby, bytes: RString) -> Result<Option<RArray>, Error> {
    // SAFETY: deaggregate only reads the slice and copies what it keeps; no Ruby code runs
    // while it is borrowed.
    let result = kpl::deaggregate(unsafe { bytes.as_slice() });
    let records = match result {
        Deaggregated::PassThrough => return Ok(None),
        Deaggregated::Aggregate(records) => records,
    };
    let out = ruby.ary_new_capa(records.len());
    for record in records {
        let entry = ruby.ary_new_capa(3);
        entry.push(ruby.str_new(&record.partition_key))?;
        entry.push(record.explicit_hash_key.map(|k| ruby.str_new(&k)))?;
        entry.push(ruby.str_from_slice(&record.data))?;
        out.push(entry)?;
    }
    Ok(Some(out))
}

pub fn init(_ruby: &Ruby, native: RModule) -> Result<(), Error> {
    native.define_module_function("aggregate", function!(aggregate, 2))?;
    native.define_module_function("deaggregate", function!(deaggregate, 1))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[u8], partition_key: &str, explicit_hash_key: Option<u128>) -> RecordInput {
        RecordInput {
            data: data.to_vec(),
            partition_key: partition_key.to_string(),
            explicit_hash_key,
        }
    }

    fn user_records(aggregates: &[Vec<u8>]) -> Vec<kpl::UserRecord> {
        aggregates
            .iter()
            .flat_map(|a| match kpl::deaggregate(a) {
                Deaggregated::Aggregate(records) => records,
                Deaggregated::PassThrough => panic!("not an aggregate"),
            })
            .collect()
    }

    #[test]
    fn round_trips_in_order() {
        let records = vec![
            record(b"\x00\xff", "k1", None),
            record(b"two", "k\u{e9}", Some(7)),
            record(b"", "k1", None),
        ];
        let aggregates = aggregate_records(&records, kpl::DEFAULT_MAX_RECORD_BYTES).unwrap();
        assert_eq!(aggregates.len(), 1);
        let back = user_records(&aggregates);
        assert_eq!(back.len(), 3);
        for (got, want) in back.iter().zip(&records) {
            assert_eq!(got.data, want.data);
            assert_eq!(got.partition_key, want.partition_key);
            assert_eq!(
                got.explicit_hash_key,
                want.explicit_hash_key.map(|k| k.to_string())
            );
        }
    }

    #[test]
    fn starts_a_new_aggregate_when_full() {
        let records: Vec<_> = (0..10)
            .map(|i| record(&[i as u8; 100], "k", None))
            .collect();
        let aggregates = aggregate_records(&records, 300).unwrap();
        assert!(aggregates.len() > 1);
        assert!(aggregates
            .iter()
            .all(|a| a.len() + AGGREGATE_PARTITION_KEY.len() <= 300));
        assert_eq!(user_records(&aggregates).len(), 10);
    }

    #[test]
    fn refuses_a_record_that_fits_nowhere() {
        let records = vec![record(b"small", "k", None), record(&[0; 400], "k", None)];
        match aggregate_records(&records, 300) {
            Err(AggregationError::RecordTooLarge {
                index: 1,
                size,
                max_bytes: 300,
            }) => assert!(size > 300),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_input_gives_no_aggregates() {
        assert_eq!(aggregate_records(&[], 300).unwrap(), Vec::<Vec<u8>>::new());
    }
}
