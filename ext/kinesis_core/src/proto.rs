//! Hand-written prost messages for `proto/kpl_aggregation.proto` (proto2).
//!
//! Written by hand so that building the gem needs no `protoc`. The test
//! `schema_matches_proto_file` keeps the field numbers and types in line with the schema file.

/// `AggregatedRecord`: the protobuf body of a KPL aggregated Kinesis record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// `Tag`: part of the schema, never written by this producer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// `Record`: one user record inside an aggregate.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[cfg(test)]
mod tests {
    /// Parses the `.proto` reference (a tiny, schema-specific reader) and checks every field of
    /// the hand-written messages against it: name, label, type and tag number.
    #[test]
    fn schema_matches_proto_file() {
        let text = include_str!("../../../proto/kpl_aggregation.proto");
        let mut fields = Vec::new();
        let mut message = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("message ") {
                message = rest.trim_end_matches(" {").trim().to_string();
            } else if line.starts_with("required ")
                || line.starts_with("optional ")
                || line.starts_with("repeated ")
            {
                let words: Vec<&str> = line
                    .trim_end_matches(';')
                    .split_whitespace()
                    .filter(|w| *w != "=")
                    .collect();
                fields.push(format!(
                    "{message}.{} {} {} {}",
                    words[2], words[0], words[1], words[3]
                ));
            }
        }
        let expected = vec![
            "AggregatedRecord.partition_key_table repeated string 1",
            "AggregatedRecord.explicit_hash_key_table repeated string 2",
            "AggregatedRecord.records repeated Record 3",
            "Tag.key required string 1",
            "Tag.value optional string 2",
            "Record.partition_key_index required uint64 1",
            "Record.explicit_hash_key_index optional uint64 2",
            "Record.data required bytes 3",
            "Record.tags repeated Tag 4",
        ];
        assert_eq!(
            fields, expected,
            "proto file and proto.rs disagree: update both together"
        );
        // The derive attributes above must say the same: check through prost's encoding, with
        // every field set to a value whose wire form shows its tag.
        use prost::Message;
        let rec = super::Record {
            partition_key_index: 1,
            explicit_hash_key_index: Some(2),
            data: vec![3],
            tags: vec![super::Tag {
                key: "k".into(),
                value: Some("v".into()),
            }],
        };
        assert_eq!(
            rec.encode_to_vec(),
            vec![0x08, 1, 0x10, 2, 0x1a, 1, 3, 0x22, 6, 0x0a, 1, b'k', 0x12, 1, b'v']
        );
        let agg = super::AggregatedRecord {
            partition_key_table: vec!["p".into()],
            explicit_hash_key_table: vec!["9".into()],
            records: vec![super::Record {
                partition_key_index: 0,
                explicit_hash_key_index: None,
                data: vec![],
                tags: vec![],
            }],
        };
        assert_eq!(
            agg.encode_to_vec(),
            vec![0x0a, 1, b'p', 0x12, 1, b'9', 0x1a, 4, 0x08, 0, 0x1a, 0]
        );
    }
}
