//! Small shared helpers: thread and allocator set-up, the progress bar, a directory written
//! whole or not at all, and (from the shards crate) crash-safe file writes, fault-injection
//! points, hashing and seed derivation.

pub mod progress;
pub mod staged_dir;
pub mod threads;

pub use augpro_shards::atomic::{
    atomic_write, forget_temporary, is_dead_temporary, is_own_temporary, register_temporary,
    remove_temporaries, rename_noreplace, temporary_for, temporary_name, temporary_target,
    AtomicFile,
};
pub use augpro_shards::failpoint::{failpoint, install_failpoint_hook};
pub use augpro_shards::hash::{derive_seed, sha256_bytes, sha256_file};
pub use progress::progress;
pub use staged_dir::StagedDir;
pub use threads::{init_threads, limit_native_threads, tune_allocator, with_one_native_thread};
