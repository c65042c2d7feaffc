//! The module graph reads as the pipeline: every `crate::` reference between top-level
//! modules of `src/` points to a module earlier in [`ORDER`], so there is no cycle and no
//! stage reaches back to a later one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules, each allowed to use only the ones before it. The shard format's
/// crate first (`augpro-shards`, re-exported as `shards`, `storage` and `task`: the
/// on-disk format that `augment` writes and `student` reads, with the task descriptions
/// and storage locations it records, needing neither FAISS nor the model), then base
/// types, then the stages in pipeline order, then the entry points at the edge.
const ORDER: &[&str] = &[
    "shards",
    "storage",
    "task",
    "util",
    "timing",
    "device",
    "precision",
    "config",
    "metrics",
    "data",
    "tokenize",
    "model",
    "train",
    "teacher",
    "augment",
    "student",
    "pipeline",
    "report",
    "slurm",
    "fetch",
    "inspect",
    "cli",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(from, to)` for every `crate::to` mentioned in a file of module `from`.
fn edges(src: &Path) -> BTreeSet<(String, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut out = BTreeSet::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let from = first.trim_end_matches(".rs").to_string();
        if ["lib", "main", "bin"].contains(&from.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            for to in used_modules(&text[i + 7..]) {
                if to != from {
                    out.insert((from.clone(), to));
                }
            }
        }
    }
    out
}

/// The top-level modules named right after `crate::`: one path, or a `{a, b::c}` group.
fn used_modules(after: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = after.strip_prefix('{') else {
        return vec![ident(after)];
    };
    let (mut depth, mut start, mut out) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

#[test]
fn module_graph_is_acyclic_and_follows_the_pipeline() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank = |m: &str| {
        ORDER
            .iter()
            .position(|&o| o == m)
            .unwrap_or_else(|| panic!("module `{m}` is missing from ORDER"))
    };
    let edges = edges(&src);
    assert!(!edges.is_empty());
    let bad: Vec<String> = edges
        .iter()
        .filter(|(from, to)| rank(to) >= rank(from))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    for (from, to) in &edges {
        eprintln!("{from} -> {to}");
    }
    assert!(bad.is_empty(), "edges against the order: {bad:?}");
}
