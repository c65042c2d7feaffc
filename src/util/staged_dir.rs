//! A directory's files written together or not at all: they go to a hidden staging
//! directory beside it and move in once every one is there.

use super::{is_dead_temporary, temporary_name};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A staging directory for `dest`, removed on drop unless published.
pub struct StagedDir {
    staging: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl StagedDir {
    /// Creates the staging directory beside `dest`, first removing the ones this host's
    /// gone processes left for the same destination.
    pub fn create(dest: &Path) -> Result<Self> {
        let (parent, name) = parent_and_name(dest)?;
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("{}: cannot create directory", parent.display()))?;
        for e in std::fs::read_dir(&parent)
            .with_context(|| format!("{}: cannot list", parent.display()))?
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!(".{name}.tmp-")) && is_dead_temporary(&n) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let staging = parent.join(temporary_name(&name));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging)
            .with_context(|| format!("{}: cannot create directory", staging.display()))?;
        Ok(Self {
            staging,
            dest: dest.to_path_buf(),
            published: false,
        })
    }

    /// Where the files go until [`StagedDir::publish`].
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the staged files to `dest`: the whole directory by one rename when `dest` does
    /// not exist; else file by file (each a rename, replacing a file of the same name and
    /// leaving the others), `last` after every other.
    pub fn publish(mut self, last: &str) -> Result<()> {
        match std::fs::rename(&self.staging, &self.dest) {
            Ok(()) => {}
            Err(_) if self.dest.is_dir() => {
                let mut names: Vec<_> = std::fs::read_dir(&self.staging)
                    .with_context(|| format!("{}: cannot list", self.staging.display()))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<std::io::Result<_>>()
                    .with_context(|| format!("{}: cannot list", self.staging.display()))?;
                names.sort_by_key(|n| (n == last, n.clone()));
                for n in names {
                    std::fs::rename(self.staging.join(&n), self.dest.join(&n)).with_context(
                        || format!("{}: cannot write", self.dest.join(&n).display()),
                    )?;
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot write", self.dest.display()))
            }
        }
        self.published = true;
        let _ = std::fs::remove_dir(&self.staging);
        let (parent, _) = parent_and_name(&self.dest)?;
        for d in [&parent, &self.dest] {
            if let Ok(d) = std::fs::File::open(d) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// The directory holding `dest` (`.` for a bare name) and `dest`'s own name.
fn parent_and_name(dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .with_context(|| format!("{}: not a directory name", dest.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

#[cfg(test)]
mod tests {
    use super::StagedDir;

    #[test]
    fn a_directory_appears_whole_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("student");
        // Dropped before publishing: nothing is left, beside or at the destination.
        {
            let s = StagedDir::create(&dest).unwrap();
            std::fs::write(s.path().join("model.safetensors"), b"half").unwrap();
        }
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(), Vec::<String>::new());
        // Published where nothing was: the staging directory takes the name.
        let s = StagedDir::create(&dest).unwrap();
        std::fs::write(s.path().join("metrics.json"), b"one").unwrap();
        s.publish("metrics.json").unwrap();
        assert_eq!(names(), ["student"]);
        // Published into a directory with other files: they stay, same names are replaced.
        std::fs::write(dest.join("notes.txt"), b"mine").unwrap();
        let s = StagedDir::create(&dest).unwrap();
        std::fs::write(s.path().join("metrics.json"), b"two").unwrap();
        std::fs::write(s.path().join("model.safetensors"), b"w").unwrap();
        s.publish("metrics.json").unwrap();
        assert_eq!(names(), ["student"]);
        assert_eq!(std::fs::read(dest.join("metrics.json")).unwrap(), b"two");
        assert_eq!(std::fs::read(dest.join("notes.txt")).unwrap(), b"mine");
        assert!(dest.join("model.safetensors").is_file());
    }
}
