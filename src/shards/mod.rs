//! Enriched Parquet shards: one schema (used by writer, reader and `verify`), the
//! streaming writer, the manifest and the dataset card.

pub mod card;
pub mod manifest;
pub mod reader;
pub mod schema;
pub mod stats;
pub mod writer;

pub use schema::{Row, ShardSchema};
pub use stats::MethodStats;
