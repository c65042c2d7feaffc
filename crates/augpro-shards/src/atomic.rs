//! Crash-safe file writes: [`AtomicFile`] and [`atomic_write`] (temporary name, fsync,
//! rename), [`rename_noreplace`], the names of temporaries and the registry an interrupt
//! clears.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file being written under a temporary name next to its final path.
/// `commit` flushes, fsyncs and renames it; dropping it uncommitted removes the temporary.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Opens `<dir>/.<name>.tmp-<host>-<pid>` for writing; the final name is `dest`.
    pub fn create(dest: &Path) -> Result<Self> {
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        let tmp = temporary_for(dest)?;
        let file = File::create(&tmp).with_context(|| {
            format!(
                "{}: cannot create file (is the directory writable?)",
                tmp.display()
            )
        })?;
        register_temporary(&tmp);
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            file: Some(file),
        })
    }

    /// The temporary path, for writers that take a path rather than a handle.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The open file handle.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file open until commit")
    }

    /// Flushes, fsyncs and renames to the final name, then fsyncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let mut f = self.file.take().expect("file open until commit");
        f.flush()
            .with_context(|| format!("{}: write failed", self.tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("{}: fsync failed", self.tmp.display()))?;
        drop(f);
        fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("{}: rename failed", self.dest.display()))?;
        forget_temporary(&self.tmp);
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
            forget_temporary(&self.tmp);
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file().flush()
    }
}

/// This machine's host name, as it appears in temporary names.
fn hostname() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most `buf.len()` bytes into our buffer.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let h: String = String::from_utf8_lossy(&buf[..end])
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if ok && !h.is_empty() {
            h
        } else {
            "localhost".into()
        }
    })
}

/// The temporary name next to `dest` for this process: `.<name>.tmp-<host>-<pid>`. The host
/// keeps workers on different machines that share a directory from taking each other's
/// temporaries for those of dead processes.
pub fn temporary_for(dest: &Path) -> Result<PathBuf> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .context("destination has no file name")?
        .to_string_lossy();
    Ok(dir.join(temporary_name(&name)))
}

/// This process's temporary name for a file named `name`: `.<name>.tmp-<host>-<pid>`.
pub fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp-{}-{}", hostname(), std::process::id())
}

/// The name of the file a temporary named `temp` stands for (`None` for other names).
pub fn temporary_target(temp: &str) -> Option<&str> {
    let (head, _) = temp.rsplit_once(".tmp-")?;
    head.strip_prefix('.')
}

/// True when `name` is a temporary of a process of this host that is gone. Temporaries of
/// other hosts are never taken for dead (their processes cannot be seen from here).
pub fn is_dead_temporary(name: &str) -> bool {
    let Some((_, owner)) = name.rsplit_once(".tmp-") else {
        return false;
    };
    let Some((host, pid)) = owner.rsplit_once('-') else {
        return false;
    };
    host == hostname()
        && !pid
            .parse::<u32>()
            .is_ok_and(|p| p == std::process::id() || Path::new(&format!("/proc/{p}")).exists())
}

/// True when `name` is a temporary of this very process.
pub fn is_own_temporary(name: &str) -> bool {
    name.ends_with(&format!(".tmp-{}-{}", hostname(), std::process::id()))
}

/// Temporaries (files or directories) this process is writing, removed by
/// [`remove_temporaries`] when it is interrupted.
static TEMPORARIES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Records a temporary path so an interrupt can remove it.
pub fn register_temporary(path: &Path) {
    TEMPORARIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_path_buf());
}

/// Forgets a temporary that was renamed into place or removed.
pub fn forget_temporary(path: &Path) {
    TEMPORARIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
}

/// Removes every registered temporary (called from the SIGINT/SIGTERM handler).
pub fn remove_temporaries() {
    let list = std::mem::take(&mut *TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()));
    for p in list {
        let _ = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

/// Renames `from` to `to` only if `to` does not exist (`renameat2` with
/// `RENAME_NOREPLACE`); fails with `AlreadyExists` otherwise. On a filesystem without that
/// flag a directory falls back to `rename(2)`, which cannot replace a non-empty directory.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
        })
    };
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: both pointers are valid NUL-terminated paths for the duration of the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) if from.is_dir() => fs::rename(from, to),
        _ => Err(e),
    }
}

/// Writes `bytes` to `dest` atomically (temporary name, fsync, rename).
pub fn atomic_write(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(bytes)
        .with_context(|| format!("{}: write failed", dest.display()))?;
    f.commit()
}

#[cfg(test)]
mod temporary_tests {
    use super::*;

    #[test]
    fn only_this_hosts_gone_processes_own_dead_temporaries() {
        let me = temporary_for(Path::new("/x/train.parquet")).unwrap();
        let name = me.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with(".train.parquet.tmp-")
                && is_own_temporary(&name)
                && !is_dead_temporary(&name)
        );
        let gone = format!(".train.parquet.tmp-{}-4294967295", hostname());
        assert!(is_dead_temporary(&gone) && !is_own_temporary(&gone));
        assert!(
            !is_dead_temporary(".train.parquet.tmp-some-other-node-4294967295"),
            "another host's worker may be alive"
        );
        assert!(!is_dead_temporary("train.parquet"));
    }
}
