//! Paths shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GLUE data: AUGPRO_GLUE_DIR, else ../shared/data/glue.
pub fn glue_dir() -> PathBuf {
    match std::env::var_os("AUGPRO_GLUE_DIR") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => root().join("../shared/data/glue"),
    }
}

/// The default base encoder (installed by `make setup`).
pub fn model_dir() -> PathBuf {
    root().join("data/models/minilm-l6")
}

/// The reference outputs of the base encoder.
pub fn reference() -> serde_json::Value {
    let p = root().join("../shared/reference/minilm_l6_base.json");
    serde_json::from_slice(&std::fs::read(&p).expect("reference file")).expect("reference json")
}
