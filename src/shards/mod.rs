//! Enriched Parquet shards: one schema (used by writer, reader and `verify`), the
//! streaming writer, the manifest and the dataset card.

pub mod card;
pub mod manifest;
pub mod method_stats;
pub mod reader;
pub mod schema;
pub mod writer;

pub use method_stats::MethodStats;
pub use schema::{Row, ShardSchema};
