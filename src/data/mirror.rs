//! A described dataset in an object store (`s3://`, `gs://`, `az://`): the objects a split's
//! pattern matches are copied into a local mirror directory when the split is first listed,
//! in ranges (memory stays flat in their size) each on condition that the object's entity
//! tag is unchanged, and read from there like local files. An object already mirrored with
//! the same size and entity tag is not fetched again; a mirrored file whose object is gone
//! is removed.

use crate::storage::Location;
use crate::util::atomic_write;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a described dataset's files are read from: the source directory itself, or, for
/// an object-store URL, its mirror under `AUGPRO_DATA_MIRROR` (default `runs/data-mirror`),
/// with the URL as the origin.
pub fn place(source: &str) -> Result<(PathBuf, Option<String>)> {
    match Location::parse(source)? {
        Location::Local(p) => Ok((p, None)),
        remote => {
            let url = remote.to_string();
            let root = std::env::var_os("AUGPRO_DATA_MIRROR")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from("runs/data-mirror"), PathBuf::from);
            let id = &crate::util::sha256_bytes(url.as_bytes())[..16];
            Ok((root.join(id), Some(url)))
        }
    }
}

/// Mirrors into `dir` the objects under `origin` that the pattern of `split` matches (a
/// pattern with `/` names a sub-prefix); none is an error. Once per process for each
/// origin, mirror and pattern: a run reads the one snapshot it mirrored, and every later listing
/// of the split costs no request.
pub fn sync(origin: &str, dir: &Path, split: &str, pattern: &str) -> Result<()> {
    static SYNCED: Mutex<BTreeSet<(String, PathBuf, String)>> = Mutex::new(BTreeSet::new());
    let key = (origin.to_string(), dir.to_path_buf(), pattern.to_string());
    let mut synced = SYNCED.lock().unwrap_or_else(|e| e.into_inner());
    if synced.contains(&key) {
        return Ok(());
    }
    fetch_matching(origin, dir, split, pattern)?;
    synced.insert(key);
    Ok(())
}

/// Copies every object the pattern matches (see [`sync`]).
fn fetch_matching(origin: &str, dir: &Path, split: &str, pattern: &str) -> Result<()> {
    let (sub, name) = pattern.rsplit_once('/').unwrap_or(("", pattern));
    let base = Location::parse(origin)?;
    let folder = if sub.is_empty() { base } else { base.join(sub) };
    let names: Vec<String> = folder
        .list()?
        .into_iter()
        .filter(|n| super::split_file_matches(name, n))
        .collect();
    if names.is_empty() {
        bail!("{folder}: no object matches `data.splits.{split}` = {pattern:?}");
    }
    // `list` gives the names sorted, as `prune` needs them.
    for n in &names {
        let tag = dir.join(".etags").join(sub).join(n);
        fetch(&folder.join(n), &dir.join(sub).join(n), &tag)?;
    }
    prune(&dir.join(sub), &dir.join(".etags").join(sub), name, &names)
}

/// Removes the mirrored files in `local` that `pattern` matches but the origin no longer
/// holds (not in `kept`, sorted), with their entity-tag records: the split is read from the
/// mirror by the same pattern, so a stale copy would be read as data. Subdirectories (other
/// splits' sub-prefixes) stay, and so do the temporaries of copies still running.
fn prune(local: &Path, tags: &Path, pattern: &str, kept: &[String]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(local) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        let n = e.file_name().to_string_lossy().to_string();
        let file = e.file_type().is_ok_and(|t| !t.is_dir());
        let temporary = crate::util::temporary_target(&n).is_some();
        let stale = if temporary {
            crate::util::is_dead_temporary(&n)
        } else {
            super::split_file_matches(pattern, &n) && kept.binary_search(&n).is_err()
        };
        if file && stale {
            std::fs::remove_file(e.path())
                .with_context(|| format!("{}: cannot remove the stale copy", e.path().display()))?;
            let _ = std::fs::remove_file(tags.join(&n));
        }
    }
    Ok(())
}

/// Copies one object to `dest` unless the copy there has its size and entity tag
/// (recorded in `tag_file`); every range is read on condition that the tag is unchanged.
fn fetch(obj: &Location, dest: &Path, tag_file: &Path) -> Result<()> {
    let (size, tag) = obj.meta()?;
    let same_size = std::fs::metadata(dest).is_ok_and(|m| m.is_file() && m.len() == size);
    let recorded = std::fs::read_to_string(tag_file).ok();
    if same_size && tag.is_some() && recorded == tag {
        return Ok(());
    }
    obj.download(dest, size, tag.as_deref())?;
    if let Some(t) = tag {
        if let Some(d) = tag_file.parent() {
            std::fs::create_dir_all(d)?;
        }
        atomic_write(tag_file, t.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prune;

    /// Only this pattern's files that the origin no longer holds go, with their tag
    /// records, and dead processes' temporaries; subdirectories, other splits' files and
    /// live temporaries stay.
    #[test]
    fn prune_removes_only_stale_copies_and_dead_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let (local, tags) = (d.path().join("m"), d.path().join("m/.etags"));
        std::fs::create_dir_all(local.join("train-sub")).unwrap();
        std::fs::create_dir_all(&tags).unwrap();
        let live = crate::util::temporary_name("train-d.csv");
        let dead = live.replace(&format!("-{}", std::process::id()), "-4000000000");
        for n in ["train-a.csv", "train-b.csv", "validation.csv", &live, &dead] {
            std::fs::write(local.join(n), n).unwrap();
        }
        for n in ["train-a.csv", "train-b.csv"] {
            std::fs::write(tags.join(n), "etag").unwrap();
        }
        prune(&local, &tags, "train*", &["train-a.csv".to_string()]).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&local)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        let mut want = vec![
            ".etags",
            "train-a.csv",
            "train-sub",
            "validation.csv",
            &live,
        ];
        want.sort();
        assert_eq!(left, want);
        assert!(tags.join("train-a.csv").exists() && !tags.join("train-b.csv").exists());
    }
}
