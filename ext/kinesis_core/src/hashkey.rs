//! Kinesis hash keys: where a record lands among a stream's shards.
//!
//! A record's hash key is its explicit hash key when it has one, else the MD5 of its partition
//! key's UTF-8 bytes read as a big-endian unsigned 128-bit integer.

use md5::{Digest, Md5};

/// The largest partition key Kinesis accepts, in Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Why a partition key or explicit hash key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("partition key is empty: Kinesis needs 1 to 256 characters")]
    EmptyPartitionKey,
    #[error("partition key has {0} characters: Kinesis allows at most 256")]
    PartitionKeyTooLong(usize),
    #[error("explicit hash key {0:?} is not a decimal integer between 0 and 2^128-1 without leading zeros")]
    InvalidExplicitHashKey(String),
}

/// Checks the partition key length rule (1 to 256 Unicode scalar values).
pub fn validate_partition_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::EmptyPartitionKey);
    }
    // Fast path: a key of at most 256 bytes has at most 256 characters.
    if key.len() > MAX_PARTITION_KEY_CHARS {
        let chars = key.chars().count();
        if chars > MAX_PARTITION_KEY_CHARS {
            return Err(KeyError::PartitionKeyTooLong(chars));
        }
    }
    Ok(())
}

/// md5(partition key) as a big-endian 128-bit integer.
pub fn partition_key_hash(key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(key.as_bytes()).into())
}

/// Parses an explicit hash key as Kinesis does: `0|([1-9]\d{0,38})`, at most 2^128-1.
pub fn parse_explicit_hash_key(text: &str) -> Result<u128, KeyError> {
    let bad = || KeyError::InvalidExplicitHashKey(text.to_string());
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > 39 || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return Err(bad());
    }
    text.parse::<u128>().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_hash_key_matches_known_values() {
        // md5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(partition_key_hash("a"), 0x0cc175b9c0f1b6a831c399e269772661);
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(partition_key_hash(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }

    #[test]
    fn explicit_hash_keys() {
        assert_eq!(parse_explicit_hash_key("0"), Ok(0));
        assert_eq!(
            parse_explicit_hash_key(&u128::MAX.to_string()),
            Ok(u128::MAX)
        );
        for bad in [
            "",
            "-1",
            "01",
            "1.0",
            " 1",
            "340282366920938463463374607431768211456",
            "12a",
            "9999999999999999999999999999999999999999",
        ] {
            assert!(parse_explicit_hash_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn partition_key_lengths_count_characters_not_bytes() {
        assert!(validate_partition_key(&"é".repeat(256)).is_ok());
        assert_eq!(
            validate_partition_key(&"é".repeat(257)),
            Err(KeyError::PartitionKeyTooLong(257))
        );
        assert!(validate_partition_key(&"x".repeat(256)).is_ok());
        assert_eq!(validate_partition_key(""), Err(KeyError::EmptyPartitionKey));
    }
}
