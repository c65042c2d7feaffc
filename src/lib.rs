//! augpro: Augmentation with Projection (AugPro) for knowledge distillation.
//!
//! The pipeline runs one way: GLUE Parquet ([`data`]) → [`tokenize`] → [`teacher`] →
//! [`augment`] (mix / FGSM / replacement, nearest-token projection) → [`shards`] →
//! [`student`] → [`report`]. [`pipeline`] runs the stages for a pipeline file; the binary
//! only wires flags.

pub mod augment;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod fetch;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod precision;
pub mod report;
pub mod slurm;
pub mod student;
pub mod teacher;
pub mod timing;
pub mod tokenize;
pub mod train;
pub mod util;

/// The shard format, its storage locations and task descriptions (the `augpro-shards` crate).
pub use augpro_shards::{self as shards, storage, task};
