//! Downloads GLUE Parquet files from the Hugging Face hub layout into `data/glue/`, or the
//! Parquet files of any Hub dataset repository, resumably (a `.part` file continued with an
//! HTTP Range request) and atomically.

use crate::task::TaskSpec;
use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Default base URL of the dataset's files.
pub const DEFAULT_BASE_URL: &str = "https://huggingface.co/datasets/nyu-mll/glue/resolve/main";

/// Downloads every split of `task` into `<glue_dir>/<config>/`; existing files are kept.
pub fn fetch_config(
    task: &TaskSpec,
    glue_dir: &Path,
    base_url: &str,
    splits: Option<&[String]>,
) -> Result<Vec<PathBuf>> {
    let dir = glue_dir.join(&task.name);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let mut out = Vec::new();
    for split in task.all_splits() {
        if let Some(s) = splits {
            if !s.contains(&split) {
                continue;
            }
        }
        let name = format!("{split}-00000-of-00001.parquet");
        let dest = dir.join(&name);
        if dest.is_file() {
            eprintln!("{}: present, skipped", dest.display());
            out.push(dest);
            continue;
        }
        let url = format!("{}/{}/{}", base_url.trim_end_matches('/'), task.name, name);
        download(&url, &dest, None)?;
        out.push(dest);
    }
    Ok(out)
}

/// Default address of the Hugging Face Hub.
pub const DEFAULT_HUB_URL: &str = "https://huggingface.co";

/// One file of a repository listing (`/api/datasets/<repo>/tree/main/<dir>`).
#[derive(Debug, serde::Deserialize)]
struct HubEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    /// Large files carry their sha256 here.
    #[serde(default)]
    lfs: Option<HubLfs>,
}

#[derive(Debug, serde::Deserialize)]
struct HubLfs {
    oid: String,
}

/// Downloads the Parquet files of the Hub dataset repository `repo` (`owner/name`), those
/// under `config` when given, to `<dir>/<owner>/<name>/<path in the repository>`; existing
/// files are kept, and each download is checked against the sha256 the Hub lists for it.
pub fn fetch_repo(
    repo: &str,
    config: Option<&str>,
    dir: &Path,
    hub_url: &str,
) -> Result<Vec<PathBuf>> {
    let ok_name = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo.split_once('/') {
        Some((o, n)) if ok_name(o) && ok_name(n) && !o.starts_with('.') && !n.starts_with('.') => {}
        _ => bail!("--repo {repo:?}: expected owner/name"),
    }
    let hub = hub_url.trim_end_matches('/');
    let listing = format!(
        "{hub}/api/datasets/{repo}/tree/main/{}?recursive=true",
        config.unwrap_or("")
    );
    let text = ureq::get(&listing)
        .timeout(std::time::Duration::from_secs(60))
        .call()
        .context("cannot list the repository")?
        .into_string()
        .with_context(|| format!("{listing}: unreadable listing"))?;
    let entries: Vec<HubEntry> = serde_json::from_str(&text)
        .with_context(|| format!("{listing}: not a repository listing"))?;
    let mut out = Vec::new();
    for e in entries
        .iter()
        .filter(|e| e.kind == "file" && e.path.ends_with(".parquet"))
    {
        if e.path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!(
                "{listing}: file path {:?} is not a plain relative path",
                e.path
            );
        }
        let dest = dir.join(repo).join(&e.path);
        out.push(dest.clone());
        if dest.is_file() {
            eprintln!("{}: present, skipped", dest.display());
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create directory", parent.display()))?;
        }
        download(
            &format!("{hub}/datasets/{repo}/resolve/main/{}", e.path),
            &dest,
            e.lfs.as_ref().map(|l| l.oid.as_str()),
        )?;
    }
    if out.is_empty() {
        bail!(
            "{listing}: no Parquet file in the repository{}",
            config.map(|c| format!(" under `{c}`")).unwrap_or_default()
        );
    }
    Ok(out)
}

/// Removes `path` and fails when its sha256 is not `want` (when the Hub lists one).
fn check_sha256(path: &Path, want: Option<&str>) -> Result<()> {
    let Some(want) = want else {
        return Ok(());
    };
    let got = crate::util::sha256_file(path)?;
    if got != want {
        let _ = std::fs::remove_file(path);
        bail!(
            "{}: sha256 {got} is not the {want} the Hub lists; removed",
            path.display()
        );
    }
    Ok(())
}

/// An HTTP status that retrying cannot change: a 4xx other than 408 (timeout) and 429 (rate
/// limit).
#[derive(Debug)]
struct FinalStatus(u16);

impl std::fmt::Display for FinalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} (not retried)", self.0)
    }
}

impl std::error::Error for FinalStatus {}

/// Downloads `url` to `dest`, resuming a previous partial download, with up to 5 attempts;
/// a final HTTP status (see [`FinalStatus`]) fails at once. With `sha256`, the download is
/// checked before it takes `dest`'s name (a mismatch removes it and fails).
pub fn download(url: &str, dest: &Path, sha256: Option<&str>) -> Result<()> {
    let part = dest.with_extension("parquet.part");
    let mut last_err = None;
    for attempt in 1..=5 {
        match try_download(url, &part) {
            Ok(()) => {
                let f = std::fs::File::open(&part)?;
                f.sync_all()?;
                check_sha256(&part, sha256)?;
                std::fs::rename(&part, dest)
                    .with_context(|| format!("{}: rename failed", dest.display()))?;
                return Ok(());
            }
            Err(e) if e.downcast_ref::<FinalStatus>().is_some() => {
                return Err(e).with_context(|| format!("{url}: download failed"));
            }
            Err(e) => {
                eprintln!("{url}: attempt {attempt} failed: {e:#}; resuming");
                last_err = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(200 * attempt));
            }
        }
    }
    let kept = std::fs::metadata(&part).is_ok_and(|m| m.len() > 0);
    Err(last_err.expect("at least one attempt")).with_context(|| {
        if kept {
            format!(
                "{url}: download failed (partial data kept in {} for the next run)",
                part.display()
            )
        } else {
            format!("{url}: download failed after 5 attempts")
        }
    })
}

fn try_download(url: &str, part: &Path) -> Result<()> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = ureq::get(url).timeout(std::time::Duration::from_secs(60));
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
        Err(ureq::Error::Status(code, _))
            if (400..500).contains(&code) && ![408, 429].contains(&code) =>
        {
            return Err(FinalStatus(code).into())
        }
        Err(ureq::Error::Status(code, _)) => bail!("{url}: HTTP {code}"),
        Err(e) => return Err(e).with_context(|| format!("{url}: request failed")),
    };
    let resumed = resp.status() == 206;
    let remaining: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let total = if resumed {
        remaining.map(|r| r + have)
    } else {
        remaining
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .with_context(|| format!("{}: cannot write", part.display()))?;
    let start = if resumed { have } else { 0 };
    let pb = crate::util::progress(total.unwrap_or(0), "download");
    pb.set_position(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("{url}: connection lost after {got} bytes"))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        got += n as u64;
        pb.set_position(got);
    }
    pb.finish_and_clear();
    file.flush()?;
    if let Some(t) = total {
        if got != t {
            bail!("{url}: connection closed after {got} of {t} bytes");
        }
    }
    Ok(())
}
