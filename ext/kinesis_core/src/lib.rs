//! The pure-Rust core of fluent-plugin-kinesis-rs: KPL aggregation, shard prediction and
//! delivery to Kinesis Data Streams. Nothing here knows about Ruby.

pub mod batch;
pub mod cancel;
pub mod chunk;
pub mod client;
pub mod config;
pub mod delivery;
pub mod error;
pub mod hashkey;
pub mod kpl;
pub mod md5x;
pub mod metrics;
pub mod msgpack;
pub mod msgpack_write;
pub mod pipe;
pub mod producer;
pub mod progress;
pub mod proto;
pub mod rate_limit;
pub mod request_body;
pub mod runtime;
pub mod shard_map;
