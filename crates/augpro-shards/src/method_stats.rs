//! Per-method row counters, summed over batches and shards and kept in the manifest.

use serde::{Deserialize, Serialize};

/// Per-method counters, summed over batches and shards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MethodStats {
    /// Rows written.
    pub rows: u64,
    /// Non-special positions in the written rows.
    pub positions: u64,
    /// Positions whose token differs from the source (projected methods).
    pub changed_positions: u64,
    /// Rows identical to their source (written or dropped).
    pub unchanged_rows: u64,
    /// Rows dropped by `drop_unchanged`.
    pub dropped_rows: u64,
    /// Rows whose teacher prediction equals the source's gold label (classification).
    pub teacher_agrees: u64,
}

impl MethodStats {
    /// Adds another counter set.
    pub fn add(&mut self, o: &MethodStats) {
        self.rows += o.rows;
        self.positions += o.positions;
        self.changed_positions += o.changed_positions;
        self.unchanged_rows += o.unchanged_rows;
        self.dropped_rows += o.dropped_rows;
        self.teacher_agrees += o.teacher_agrees;
    }
}
