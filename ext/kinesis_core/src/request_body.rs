//! The JSON bodies of PutRecords (Kinesis) and PutRecordBatch (Firehose), written in one pass
//! into one buffer of the right size.
//!
//! The SDK's own serializer copies every record's data into a `Blob` per attempt, base64-encodes
//! it into a fresh `String`, scans that string again for characters to escape, and appends it
//! to a body that grows by doubling. For a 5 MiB call that is four copies of the data and
//! several reallocations; here the data is read once, by the base64 encoder, straight from the
//! planned record into the body. The body then replaces the (empty) one the SDK serialized,
//! before signing, so signing, endpoints, credentials, timeouts and response parsing stay the
//! SDK's.
//!
//! The JSON is what the SDK writes (awsJson1.1): `Data` in standard base64 with padding, the
//! strings escaped, `ExplicitHashKey` as a decimal string.

use bytes::Bytes;

use crate::batch::KinesisRecord;
use crate::chunk::json_string;

/// Base64 of `n` bytes, with padding.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Room for a record's fixed JSON text and its escaped key, assuming no escapes: the buffer
/// grows (once) only for keys with characters to escape.
const RECORD_OVERHEAD: usize = r#"{"Data":"","PartitionKey":"","ExplicitHashKey":""},"#.len() + 39;

/// The body of a PutRecords call carrying `records` to `stream`.
pub fn put_records<'a>(
    stream: &str,
    records: impl Iterator<Item = &'a KinesisRecord> + Clone,
) -> Bytes {
    batch_body(
        "StreamName",
        stream,
        records,
        |r| base64_len(r.data.len()) + r.partition_key.len() + RECORD_OVERHEAD,
        |out, r| {
            out.extend_from_slice(b"{\"Data\":\"");
            base64_simd::STANDARD.encode_append(&r.data, out);
            out.extend_from_slice(b"\",\"PartitionKey\":");
            json_string(out, &r.partition_key);
            if let Some(h) = r.explicit_hash_key {
                out.extend_from_slice(b",\"ExplicitHashKey\":\"");
                out.extend_from_slice(itoa::Buffer::new().format(h).as_bytes());
                out.push(b'"');
            }
            out.push(b'}');
        },
    )
}

/// The body of a PutRecordBatch call carrying the data of `records` to `delivery_stream`.
pub fn put_record_batch<'a>(
    delivery_stream: &str,
    records: impl Iterator<Item = &'a [u8]> + Clone,
) -> Bytes {
    batch_body(
        "DeliveryStreamName",
        delivery_stream,
        records,
        |d| base64_len(d.len()) + r#"{"Data":""},"#.len(),
        |out, d| {
            out.extend_from_slice(b"{\"Data\":\"");
            base64_simd::STANDARD.encode_append(d, out);
            out.extend_from_slice(b"\"}");
        },
    )
}

/// `{"<name_key>":"<name>","Records":[...]}` with each record written by `write`, in a buffer
/// of the size `room` says the records need.
fn batch_body<I: Iterator + Clone>(
    name_key: &str,
    name: &str,
    records: I,
    room: impl Fn(&I::Item) -> usize,
    write: impl Fn(&mut Vec<u8>, I::Item),
) -> Bytes {
    let capacity =
        records.clone().map(|r| room(&r)).sum::<usize>() + name_key.len() + name.len() + 24;
    let mut out = Vec::with_capacity(capacity);
    out.push(b'{');
    json_string(&mut out, name_key);
    out.push(b':');
    json_string(&mut out, name);
    out.extend_from_slice(b",\"Records\":[");
    for (i, r) in records.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(&mut out, r);
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn record(data: &[u8], key: &str, hash: Option<u128>) -> KinesisRecord {
        KinesisRecord {
            data: data.to_vec(),
            partition_key: key.into(),
            explicit_hash_key: hash,
            shard: 0,
            members: vec![0],
            lands_safely_anywhere: true,
        }
    }

    fn b64(d: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(d)
    }

    #[test]
    fn put_records_body_is_the_json_the_service_reads() {
        let records = [
            record(b"", "k", None),
            record(
                &[0xf3, 0x89, 0x9a, 0xc2, 0, 1, 2],
                "a \"quoted\"\\ key\n\u{1}é",
                Some(u128::MAX),
            ),
            record(&vec![7u8; 1000], "plain", Some(0)),
            record(b"ab", "x", None),
        ];
        let body = put_records("my \"stream\"", records.iter());
        assert!(
            body.len()
                <= records
                    .iter()
                    .map(|r| base64_len(r.data.len()) + r.partition_key.len() + RECORD_OVERHEAD)
                    .sum::<usize>()
                    + 64,
            "no growth beyond the estimate for short escapes"
        );
        let v: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["StreamName"], "my \"stream\"");
        let got = v["Records"].as_array().unwrap();
        assert_eq!(got.len(), records.len());
        for (g, r) in got.iter().zip(&records) {
            assert_eq!(g["Data"], b64(&r.data));
            assert_eq!(g["PartitionKey"], r.partition_key.as_str());
            match r.explicit_hash_key {
                Some(h) => assert_eq!(g["ExplicitHashKey"], h.to_string()),
                None => assert!(g.get("ExplicitHashKey").is_none()),
            }
        }
    }

    #[test]
    fn put_record_batch_body_is_the_json_the_service_reads() {
        let data: [&[u8]; 3] = [b"line\n", &[0xff; 4], b""];
        let body = put_record_batch("delivery", data.iter().copied());
        let v: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["DeliveryStreamName"], "delivery");
        let got = v["Records"].as_array().unwrap();
        assert_eq!(got.len(), 3);
        for (g, d) in got.iter().zip(data) {
            assert_eq!(g["Data"], b64(d));
            assert_eq!(g.as_object().unwrap().len(), 1);
        }
    }

    #[test]
    fn empty_calls_are_well_formed() {
        let v: Value = serde_json::from_slice(&put_records("s", [].iter())).unwrap();
        assert_eq!(v["Records"].as_array().unwrap().len(), 0);
    }
}
