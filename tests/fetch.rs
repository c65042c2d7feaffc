//! `data fetch` against a local HTTP server on 127.0.0.1 serving the shared GLUE files,
//! including one that drops the connection half-way.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

struct Server {
    base: String,
    ranges: Arc<Mutex<Vec<String>>>,
    /// Requests received so far.
    requests: Arc<AtomicUsize>,
}

/// Serves `root` for up to `max_requests` requests; the first `drop_first` responses stop
/// half-way through the body.
fn serve(root: std::path::PathBuf, drop_first: usize, max_requests: usize) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    std::thread::spawn(move || {
        for stream in l.incoming().take(max_requests) {
            let mut s = stream.unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h
                    .strip_prefix("Range: ")
                    .or_else(|| h.strip_prefix("range: "))
                {
                    range = Some(v.trim().to_string());
                }
            }
            let n = count.fetch_add(1, Ordering::SeqCst);
            let path = path.split('?').next().unwrap_or("/").to_string();
            let file = root.join(path.trim_start_matches('/'));
            let Ok(body) = std::fs::read(&file) else {
                let _ = s.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            if let Some(r) = &range {
                seen.lock().unwrap().push(r.clone());
            }
            let part = &body[start..];
            let head = if range.is_some() {
                format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n", part.len(), body.len() - 1, body.len())
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    part.len()
                )
            };
            s.write_all(head.as_bytes()).unwrap();
            if n < drop_first {
                let _ = s.write_all(&part[..part.len() / 2]);
                let _ = s.flush();
                drop(s);
                continue;
            }
            let _ = s.write_all(part);
        }
    });
    Server {
        base,
        ranges,
        requests,
    }
}

#[test]
fn fetches_a_config_atomically() {
    let dest = tempfile::tempdir().unwrap();
    let srv = serve(common::glue_dir(), 0, 4);
    let task = augpro::task::glue("sst2").unwrap();
    let files = augpro::fetch::fetch_config(
        task,
        dest.path(),
        &srv.base,
        Some(&["validation".to_string()]),
    )
    .unwrap();
    assert_eq!(files.len(), 1);
    let got = std::fs::read(&files[0]).unwrap();
    let want =
        std::fs::read(common::glue_dir().join("sst2/validation-00000-of-00001.parquet")).unwrap();
    assert_eq!(got, want);
    let n = augpro::data::SplitReader::open(dest.path(), task, "validation")
        .unwrap()
        .read_all(None)
        .unwrap()
        .len();
    assert_eq!(n, 872);
    let leftovers: Vec<_> = std::fs::read_dir(dest.path().join("sst2"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn resumes_after_a_dropped_connection() {
    let dest = tempfile::tempdir().unwrap();
    let srv = serve(common::glue_dir(), 1, 4);
    let task = augpro::task::glue("mrpc").unwrap();
    let files = augpro::fetch::fetch_config(
        task,
        dest.path(),
        &srv.base,
        Some(&["validation".to_string()]),
    )
    .unwrap();
    let want =
        std::fs::read(common::glue_dir().join("mrpc/validation-00000-of-00001.parquet")).unwrap();
    assert_eq!(std::fs::read(&files[0]).unwrap(), want);
    let ranges = srv.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges,
        vec![format!("bytes={}-", want.len() / 2)],
        "second request resumes where the first stopped"
    );
}

#[test]
fn missing_file_is_an_error_and_leaves_no_file() {
    let dest = tempfile::tempdir().unwrap();
    let srv = serve(common::glue_dir(), 0, 8);
    let task = augpro::task::glue("qnli").unwrap();
    let err = augpro::fetch::fetch_config(
        task,
        dest.path(),
        &srv.base,
        Some(&["validation".to_string()]),
    )
    .err()
    .unwrap();
    // A 404 is final: one request, one clear message, no talk of partial data.
    let err = format!("{err:#}");
    assert!(err.contains("HTTP 404 (not retried)"), "{err}");
    assert!(!err.contains("partial"), "{err}");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 1);
    assert!(!dest
        .path()
        .join("qnli/validation-00000-of-00001.parquet")
        .exists());
}

/// A mirror of a Hub dataset repository under `root`: its listing of `config` (with each
/// file's sha256, `bad` for the named file) and its files, copied from GLUE MRPC.
fn repo_mirror(root: &std::path::Path, repo: &str, config: &str, bad: Option<&str>) {
    let mut entries = Vec::new();
    for split in ["train", "validation"] {
        let name = format!("{split}-00000-of-00001.parquet");
        let src = common::glue_dir().join("mrpc").join(&name);
        let dest = root.join(format!("datasets/{repo}/resolve/main/{config}/{name}"));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&src, &dest).unwrap();
        let sha = if bad == Some(split) {
            "0".repeat(64)
        } else {
            augpro::util::sha256_file(&src).unwrap()
        };
        entries.push(serde_json::json!({"type": "file", "path": format!("{config}/{name}"), "lfs": {"oid": sha}}));
    }
    entries.push(serde_json::json!({"type": "file", "path": format!("{config}/README.md")}));
    let listing = root.join(format!("api/datasets/{repo}/tree/main/{config}"));
    std::fs::create_dir_all(listing.parent().unwrap()).unwrap();
    std::fs::write(listing, serde_json::Value::from(entries).to_string()).unwrap();
}

#[test]
fn fetches_a_hub_repository_by_name() {
    let mirror = tempfile::tempdir().unwrap();
    repo_mirror(mirror.path(), "acme/entail", "main", None);
    let srv = serve(mirror.path().to_path_buf(), 0, 8);
    let dest = tempfile::tempdir().unwrap();
    let files =
        augpro::fetch::fetch_repo("acme/entail", Some("main"), dest.path(), &srv.base).unwrap();
    let got: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(dest.path()).unwrap().to_path_buf())
        .collect();
    assert_eq!(
        got,
        [
            "acme/entail/main/train-00000-of-00001.parquet",
            "acme/entail/main/validation-00000-of-00001.parquet"
        ]
        .map(std::path::PathBuf::from)
    );
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(common::glue_dir().join("mrpc").join(name)).unwrap()
        );
    }
    // A second run keeps the files: only the listing is requested.
    let before = srv.requests.load(Ordering::SeqCst);
    augpro::fetch::fetch_repo("acme/entail", Some("main"), dest.path(), &srv.base).unwrap();
    assert_eq!(srv.requests.load(Ordering::SeqCst), before + 1);

    // A file whose sha256 is not the listed one is refused and removed.
    let mirror = tempfile::tempdir().unwrap();
    repo_mirror(mirror.path(), "acme/broken", "main", Some("validation"));
    let srv = serve(mirror.path().to_path_buf(), 0, 8);
    let err = augpro::fetch::fetch_repo("acme/broken", Some("main"), dest.path(), &srv.base)
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(err.contains("is not the 0000"), "{err}");
    for f in [
        "validation-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet.part",
    ] {
        assert!(
            !dest.path().join("acme/broken/main").join(f).exists(),
            "{f}"
        );
    }
    let err = augpro::fetch::fetch_repo("../up", None, dest.path(), &srv.base)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("expected owner/name"));
}
