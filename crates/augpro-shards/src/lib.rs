//! The augpro shard format, apart from the pipeline that writes it: what a dataset's rows
//! hold ([`task`], [`schema`]), the streaming [`writer`] and the [`reader`], the
//! [`manifest`] and its verification, the dataset [`card`], and the local or object-store
//! [`storage`] locations they live in. It depends on arrow, parquet and object_store, not on
//! the teacher's engine.
//!
//! Reading a dataset:
//!
//! ```no_run
//! use augpro_shards::manifest::{read_manifest, verify};
//! use augpro_shards::reader::ShardReader;
//! use augpro_shards::storage::Location;
//! use augpro_shards::ShardSchema;
//!
//! # fn main() -> anyhow::Result<()> {
//! // A directory, or an s3://, gs:// or az:// prefix.
//! let dir = Location::parse("out/sst2/default")?;
//! let problems = verify(&dir)?;
//! assert!(problems.is_empty(), "{problems:?}");
//! let manifest = read_manifest(&dir)?;
//! let schema = ShardSchema::new(manifest.task()?);
//! for file in manifest.shards.iter().flat_map(|s| &s.files) {
//!     let mut reader = ShardReader::open(&dir.join(&file.file), &schema)?;
//!     while let Some(rows) = reader.next_rows(&schema)? {
//!         for row in rows {
//!             println!("{} {} {:?}", row.idx, row.method, row.texts);
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod atomic;
pub mod card;
pub mod failpoint;
pub mod hash;
pub mod manifest;
pub mod method_stats;
pub mod reader;
pub mod schema;
pub mod storage;
pub mod task;
pub mod writer;

pub use method_stats::MethodStats;
pub use schema::{Row, ShardSchema};
