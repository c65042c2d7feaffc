//! Where a dataset lives: a local (or NFS) directory, or a prefix in an object store
//! (`s3://`, `gs://`, `az://`; `file://` is a local path). This is the only module that
//! knows the difference.
//!
//! Local writes keep their crash safety: a temporary name, fsync, rename (and a hard link
//! for create-only writes). An object store has no rename, so an object is one PUT, or one
//! multipart upload that is aborted on error: it is either complete or absent. Credentials
//! and endpoints come from the usual environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`,
//! `AZURE_STORAGE_ACCOUNT_NAME`, …).

use crate::atomic::{atomic_write, temporary_name, AtomicFile};
use crate::hash::{sha256_bytes, sha256_file};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Objects up to this size are one PUT; larger ones a multipart upload of parts this size,
/// and downloads read ranges of this size (`AUGPRO_PART_SIZE` overrides it, in bytes; S3
/// takes parts of 5 MiB or more).
pub const PART_SIZE: usize = 16 << 20;

fn part_size() -> usize {
    std::env::var("AUGPRO_PART_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(PART_SIZE)
}

/// A file or directory: a local path, or a key (prefix) in an object store.
#[derive(Clone)]
pub enum Location {
    /// A local or network file system path.
    Local(PathBuf),
    /// An object store key, with the URL it was named by.
    Remote {
        /// The store (bucket or container).
        store: Arc<dyn ObjectStore>,
        /// The same store's multipart uploads, addressed by their ids.
        parts: Arc<dyn MultipartStore>,
        /// `scheme://bucket/key`, for messages.
        url: String,
        /// The key within the store.
        key: Key,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote { url, .. } => f.write_str(url),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Location({self})")
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Self {
        Location::Local(p.to_path_buf())
    }
}

/// The runtime that drives object-store requests for the synchronous pipeline.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

impl Location {
    /// Parses a command-line location: `s3://bucket/prefix`, `gs://…`, `az://container/…`,
    /// `file:///path`, or a plain path.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("file://") {
            return Ok(Location::Local(PathBuf::from(p)));
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(s)));
        };
        let s = s.trim_end_matches('/');
        let (store, parts): (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) = match scheme {
            "s3" | "s3a" => both(AmazonS3Builder::from_env().with_url(s).build()?),
            "gs" => both(GoogleCloudStorageBuilder::from_env().with_url(s).build()?),
            "az" | "azure" | "abfs" | "abfss" => {
                both(MicrosoftAzureBuilder::from_env().with_url(s).build()?)
            }
            other => bail!(
                "{s}: unsupported URL scheme `{other}://` (use s3://, gs://, az://, file:// or a path)"
            ),
        };
        let url = url::Url::parse(s).with_context(|| format!("{s}: not a valid URL"))?;
        let path = url.path().trim_matches('/');
        // For az://container/path the container is the host; for abfs it's in the user part.
        let key = Key::from_url_path(path).with_context(|| format!("{s}: not a valid key"))?;
        Ok(Location::Remote {
            store,
            parts,
            url: s.to_string(),
            key,
        })
    }

    /// Parses a location given as a path argument (which may hold a URL).
    pub fn from_arg(p: &Path) -> Result<Self> {
        match p.to_str() {
            Some(s) => Self::parse(s),
            None => Ok(Location::Local(p.to_path_buf())),
        }
    }

    /// The location of `rel` (a `/`-separated relative path) under this one.
    pub fn join(&self, rel: &str) -> Self {
        match self {
            Location::Local(p) => Location::Local(p.join(rel)),
            Location::Remote {
                store,
                parts,
                url,
                key,
            } => {
                let mut k = key.clone();
                for part in rel.split('/').filter(|p| !p.is_empty()) {
                    k = k.join(part);
                }
                Location::Remote {
                    store: store.clone(),
                    parts: parts.clone(),
                    url: format!("{url}/{rel}"),
                    key: k,
                }
            }
        }
    }

    /// The local path, if this is one.
    pub fn as_local(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::Remote { .. } => None,
        }
    }

    /// True for an object store location.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote { .. })
    }

    /// True when a file (object) exists here.
    pub fn exists(&self) -> Result<bool> {
        match self {
            Location::Local(p) => Ok(p.is_file()),
            Location::Remote { store, key, .. } => match block_on(store.head(key)) {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e).with_context(|| format!("{self}: cannot check")),
            },
        }
    }

    /// The file's bytes, or `None` when it does not exist.
    pub fn read_opt(&self) -> Result<Option<Bytes>> {
        match self {
            Location::Local(p) => match std::fs::read(p) {
                Ok(b) => Ok(Some(Bytes::from(b))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("{self}: cannot read")),
            },
            Location::Remote { store, key, .. } => {
                match block_on(async { store.get(key).await?.bytes().await }) {
                    Ok(b) => Ok(Some(b)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("{self}: cannot read")),
                }
            }
        }
    }

    /// Checks that a regular file (object) is here, of exactly `bytes` bytes when that is
    /// given, without reading it: a device, a FIFO or a file of another size is refused.
    pub fn check_size(&self, bytes: Option<u64>) -> Result<()> {
        let size = match self {
            Location::Local(p) => match std::fs::metadata(p) {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => bail!("{self}: not a regular file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{self}: missing"),
                Err(e) => return Err(e).with_context(|| format!("{self}: cannot read")),
            },
            Location::Remote { store, key, .. } => match block_on(store.head(key)) {
                Ok(meta) => meta.size,
                Err(object_store::Error::NotFound { .. }) => bail!("{self}: missing"),
                Err(e) => return Err(e).with_context(|| format!("{self}: cannot read")),
            },
        };
        check_recorded_size(self, size, bytes)
    }

    /// The bytes of a regular file (object), or `None` when it does not exist; refused
    /// unread when its size is not `bytes` (when given), or over [`MAX_UNRECORDED_READ`]
    /// when no size is recorded. A named pipe or device is refused without blocking on it.
    pub fn read_bounded(&self, bytes: Option<u64>) -> Result<Option<Bytes>> {
        match self {
            Location::Local(p) => {
                let mut f = match open_nonblocking(p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e).with_context(|| format!("{self}: cannot read")),
                };
                let meta = f
                    .metadata()
                    .with_context(|| format!("{self}: cannot read"))?;
                if !meta.is_file() {
                    bail!("{self}: not a regular file");
                }
                check_readable_size(self, meta.len(), bytes)?;
                let mut buf = Vec::new();
                buf.try_reserve_exact(meta.len() as usize).map_err(|_| {
                    anyhow::anyhow!("{self}: {} bytes do not fit in memory", meta.len())
                })?;
                std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, meta.len()), &mut buf)
                    .with_context(|| format!("{self}: cannot read"))?;
                Ok(Some(Bytes::from(buf)))
            }
            Location::Remote { store, key, .. } => {
                let got = block_on(async {
                    let r = store.get(key).await?;
                    let size = r.meta.size;
                    if check_readable_size(self, size, bytes).is_err() {
                        return Ok(Err(size));
                    }
                    r.bytes().await.map(Ok)
                });
                match got {
                    Ok(Ok(b)) => Ok(Some(b)),
                    Ok(Err(size)) => check_readable_size(self, size, bytes).map(|_| None),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("{self}: cannot read")),
                }
            }
        }
    }

    /// An object's size and entity tag (`None` for a local file's tag).
    pub fn meta(&self) -> Result<(u64, Option<String>)> {
        match self {
            Location::Local(p) => {
                let m = std::fs::metadata(p).with_context(|| format!("{self}: cannot read"))?;
                Ok((m.len(), None))
            }
            Location::Remote { store, key, .. } => {
                let m =
                    block_on(store.head(key)).with_context(|| format!("{self}: cannot read"))?;
                Ok((m.size, m.e_tag))
            }
        }
    }

    /// Copies the file (object) to the local path `dest` in ranges of [`PART_SIZE`] (or
    /// `AUGPRO_PART_SIZE`), so memory stays flat in its size; written under a temporary
    /// name, fsynced and renamed.
    /// With `etag`, every range of an object is read on condition that its entity tag is
    /// still that one, so a copy never mixes two versions of the object. Returns the hex
    /// sha256 of the bytes copied, hashed as they stream.
    pub fn download(&self, dest: &Path, size: u64, etag: Option<&str>) -> Result<String> {
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        }
        let mut out = AtomicFile::create(dest)?;
        let mut hash = Sha256::new();
        let step = part_size() as u64;
        let mut at = 0u64;
        while at < size {
            let end = (at + step).min(size);
            let chunk = match self {
                Location::Local(p) => read_range(p, at, end),
                Location::Remote { store, key, .. } => get_range_if(store, key, at..end, etag)
                    .map_err(|e| match e {
                        object_store::Error::Precondition { .. } => anyhow::anyhow!(
                            "changed while it was copied (entity tag no longer {})",
                            etag.unwrap_or_default()
                        ),
                        e => e.into(),
                    }),
            }
            .with_context(|| format!("{self}: cannot read bytes {at}..{end}"))?;
            if chunk.len() as u64 != end - at {
                bail!("{self}: changed while it was copied (short read at byte {at})");
            }
            std::io::Write::write_all(&mut out, &chunk)
                .with_context(|| format!("{}: cannot write", dest.display()))?;
            hash.update(&chunk);
            at = end;
            crate::failpoint::failpoint("download-range");
        }
        out.commit()?;
        Ok(hex::encode(hash.finalize()))
    }

    /// The file's bytes.
    pub fn read(&self) -> Result<Bytes> {
        self.read_opt()?
            .with_context(|| format!("{self}: not found"))
    }

    /// sha256 of the file.
    pub fn sha256(&self) -> Result<String> {
        match self {
            Location::Local(p) => sha256_file(p),
            Location::Remote { .. } => Ok(sha256_bytes(&self.read()?)),
        }
    }

    /// Names of the files directly under this directory (prefix), sorted; empty when it
    /// does not exist.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = match self {
            Location::Local(p) => local_entries(p)?
                .into_iter()
                .filter(|(_, t)| t.is_file())
                .map(|(name, _)| name)
                .collect(),
            Location::Remote { store, key, .. } => block_on(store.list_with_delimiter(Some(key)))
                .with_context(|| format!("{self}: cannot list"))?
                .objects
                .into_iter()
                .filter_map(|o| o.location.filename().map(str::to_string))
                .collect(),
        };
        names.sort();
        Ok(names)
    }

    /// Every entry directly under this directory (prefix), sorted: files, links of any kind,
    /// and subdirectories (common prefixes), a subdirectory's name ending in `/`. What a
    /// reader that globs or recurses would see, for checks that nothing unlisted is there.
    pub fn list_entries(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = match self {
            Location::Local(p) => local_entries(p)?
                .into_iter()
                .map(|(name, t)| if t.is_dir() { format!("{name}/") } else { name })
                .collect(),
            Location::Remote { store, key, .. } => {
                let listed = block_on(store.list_with_delimiter(Some(key)))
                    .with_context(|| format!("{self}: cannot list"))?;
                let dirs = listed
                    .common_prefixes
                    .into_iter()
                    .filter_map(|d| d.filename().map(|n| format!("{n}/")));
                listed
                    .objects
                    .into_iter()
                    .filter_map(|o| o.location.filename().map(str::to_string))
                    .chain(dirs)
                    .collect()
            }
        };
        names.sort();
        Ok(names)
    }

    /// Writes the file whole: locally under a temporary name, fsynced and renamed; in an
    /// object store as one PUT, or a multipart upload that is aborted on error.
    pub fn put(&self, bytes: Bytes) -> Result<()> {
        match self {
            Location::Local(p) => atomic_write(p, &bytes),
            Location::Remote { .. } => {
                block_on(upload(self, bytes)).with_context(|| format!("{self}: upload failed"))
            }
        }
    }

    /// Writes the file only if it does not exist (a create-only conditional PUT, or a hard
    /// link locally); returns false, writing nothing, when it exists. `before_commit` runs
    /// once the bytes are staged locally, before they become visible.
    pub fn put_new(&self, bytes: Bytes, before_commit: impl FnOnce()) -> Result<bool> {
        match self {
            Location::Local(p) => {
                let mut f = AtomicFile::create(p)?;
                std::io::Write::write_all(&mut f, &bytes)
                    .with_context(|| format!("{self}: write failed"))?;
                f.file()
                    .sync_all()
                    .with_context(|| format!("{self}: fsync failed"))?;
                before_commit();
                // The temporary is removed when `f` drops; the link is the file.
                match std::fs::hard_link(f.temp_path(), p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
                    // A file system without hard links: a rename that never replaces (the
                    // temporary, renamed away, is then gone when `f` drops).
                    Err(_) => match crate::atomic::rename_noreplace(f.temp_path(), p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                            return Ok(false)
                        }
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("{self}: cannot create it without replacing another")
                            })
                        }
                    },
                }
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Ok(d) = std::fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                Ok(true)
            }
            Location::Remote { store, key, .. } => {
                before_commit();
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match block_on(store.put_opts(key, PutPayload::from(bytes), opts)) {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(e) => Err(e).with_context(|| format!("{self}: create-only upload failed")),
                }
            }
        }
    }

    /// Removes the file; a missing file is not an error.
    pub fn remove(&self) -> Result<()> {
        match self {
            Location::Local(p) => match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("{self}: cannot remove"))
                }
                _ => Ok(()),
            },
            Location::Remote { store, key, .. } => match block_on(store.delete(key)) {
                Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => {
                    Err(e).with_context(|| format!("{self}: cannot remove"))
                }
                _ => Ok(()),
            },
        }
    }

    /// Removes this directory (prefix) and everything under it, at any depth; a link is
    /// removed, never followed.
    pub fn remove_tree(&self) -> Result<()> {
        if let Location::Local(p) = self {
            return match std::fs::remove_dir_all(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("{self}: cannot remove"))
                }
                _ => Ok(()),
            };
        }
        for n in self.list_entries()? {
            self.remove_entry(&n)?;
        }
        Ok(())
    }

    /// Removes the entry `name` of this directory as [`list_entries`](Self::list_entries)
    /// names it: a file or link, or (`name/`) a subdirectory with everything under it.
    pub fn remove_entry(&self, name: &str) -> Result<()> {
        match name.strip_suffix('/') {
            Some(dir) => self.join(dir).remove_tree(),
            None => self.join(name).remove(),
        }
    }
}

/// The entries of local directory `dir` with their types (a link's own type); none when
/// `dir` does not exist or is not a directory, as a store lists an absent prefix. Any other
/// failure to read it is an error, never an empty listing.
fn local_entries(dir: &Path) -> Result<Vec<(String, std::fs::FileType)>> {
    use std::io::ErrorKind::{NotADirectory, NotFound};
    let rd = match std::fs::read_dir(dir) {
        Err(e) if matches!(e.kind(), NotFound | NotADirectory) => return Ok(Vec::new()),
        rd => rd.with_context(|| format!("{}: cannot list", dir.display()))?,
    };
    rd.map(|e| {
        let e = e.with_context(|| format!("{}: cannot list", dir.display()))?;
        let t = e
            .file_type()
            .with_context(|| format!("{}: cannot read", e.path().display()))?;
        Ok((e.file_name().to_string_lossy().to_string(), t))
    })
    .collect()
}

/// Bytes `range` of an object; with `etag`, on condition that the object's entity tag is
/// still that one ([`object_store::Error::Precondition`] when it is not).
fn get_range_if(
    store: &Arc<dyn ObjectStore>,
    key: &Key,
    range: std::ops::Range<u64>,
    etag: Option<&str>,
) -> object_store::Result<Bytes> {
    let opts = object_store::GetOptions {
        range: Some(range.into()),
        if_match: etag.map(str::to_string),
        ..Default::default()
    };
    block_on(async { store.get_opts(key, opts).await?.bytes().await })
}

/// Bytes `at..end` of a local file.
fn read_range(p: &Path, at: u64, end: u64) -> Result<Bytes> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(p)?;
    f.seek(SeekFrom::Start(at))?;
    let mut buf = Vec::with_capacity((end - at) as usize);
    f.take(end - at).read_to_end(&mut buf)?;
    Ok(Bytes::from(buf))
}

/// The most [`Location::read_bounded`] reads of a file whose size nothing records (a
/// manifest, a shard summary).
pub const MAX_UNRECORDED_READ: u64 = 1 << 30;

/// [`check_recorded_size`], and at most [`MAX_UNRECORDED_READ`] when nothing is recorded.
fn check_readable_size(loc: &Location, size: u64, recorded: Option<u64>) -> Result<()> {
    check_recorded_size(loc, size, recorded)?;
    if recorded.is_none() && size > MAX_UNRECORDED_READ {
        bail!("{loc}: is {size} bytes, more than the {MAX_UNRECORDED_READ} read of a file whose size nothing records");
    }
    Ok(())
}

/// Opens a file for reading without blocking on a named pipe (the flag changes nothing for
/// the reads of a regular file).
fn open_nonblocking(p: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut o, libc::O_NONBLOCK);
    o.open(p)
}

/// Refuses a file whose `size` is not the `recorded` one.
fn check_recorded_size(loc: &Location, size: u64, recorded: Option<u64>) -> Result<()> {
    match recorded {
        Some(want) if want != size => {
            bail!("{loc}: is {size} bytes, not the {want} recorded for it")
        }
        _ => Ok(()),
    }
}

/// The store as both of its interfaces.
fn both<S: ObjectStore + MultipartStore>(s: S) -> (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) {
    let s = Arc::new(s);
    (s.clone(), s)
}

/// A multipart upload under way: its object, its id, and the record object beside it
/// (`.<name>.tmp-<host>-<pid>`, holding the id) by which a rerun finds and aborts it if this
/// process dies.
struct Upload {
    object: Location,
    id: String,
    record: Location,
}

/// This process's uploads under way, aborted by [`abort_uploads_in_flight`] on an interrupt.
static IN_FLIGHT: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// One PUT for small objects; otherwise a multipart upload whose parts go one after the
/// other, recorded beside the object while it runs and aborted (its parts discarded) if any
/// part or the completion fails.
async fn upload(loc: &Location, bytes: Bytes) -> object_store::Result<()> {
    let Location::Remote {
        store, parts, key, ..
    } = loc
    else {
        unreachable!("upload is for object-store locations")
    };
    let size = part_size();
    if bytes.len() <= size {
        store.put(key, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let up = Upload {
        object: loc.clone(),
        id: parts.create_multipart(key).await?,
        record: record_of(loc),
    };
    let Location::Remote { key: record, .. } = &up.record else {
        unreachable!()
    };
    // Registered before its record exists, so an interrupt from here on aborts it.
    in_flight(&up, true);
    crate::failpoint::failpoint("upload-record");
    let recorded = store
        .put(record, PutPayload::from(up.id.clone().into_bytes()))
        .await;
    let res = match recorded {
        Ok(_) => upload_parts(parts.as_ref(), key, &up.id, &bytes, size).await,
        Err(e) => Err(e),
    };
    match &res {
        Ok(()) => {
            let _ = store.delete(record).await;
        }
        // The record stays when the abort fails, for a rerun to abort it.
        Err(_) => {
            let _ = abort(&up).await;
        }
    }
    in_flight(&up, false);
    res
}

async fn upload_parts(
    parts: &dyn MultipartStore,
    key: &Key,
    id: &String,
    bytes: &Bytes,
    size: usize,
) -> object_store::Result<()> {
    let mut done: Vec<PartId> = Vec::new();
    for (idx, start) in (0..bytes.len()).step_by(size).enumerate() {
        if idx > 0 {
            crate::failpoint::failpoint("upload-part");
        }
        let part = bytes.slice(start..(start + size).min(bytes.len()));
        done.push(parts.put_part(key, id, idx, PutPayload::from(part)).await?);
    }
    parts.complete_multipart(key, id, done).await.map(|_| ())
}

/// The record object of this process's upload to `loc`, beside it in the same store.
fn record_of(loc: &Location) -> Location {
    let Location::Remote {
        store,
        parts,
        url,
        key,
    } = loc
    else {
        unreachable!("records are for object-store locations")
    };
    let (dir_url, name) = url.rsplit_once('/').unwrap_or(("", url));
    let record = temporary_name(name);
    let mut dir: Vec<_> = key.parts().collect();
    dir.pop();
    Location::Remote {
        store: store.clone(),
        parts: parts.clone(),
        url: format!("{dir_url}/{record}"),
        key: Key::from_iter(dir).join(record.as_str()),
    }
}

fn in_flight(up: &Upload, running: bool) {
    let entry = (up.object.to_string(), up.id.clone());
    let mut list = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
    if running {
        list.push(entry);
    } else {
        list.retain(|e| e != &entry);
    }
}

/// Aborts this process's multipart uploads under way and removes their records (called from
/// the SIGINT/SIGTERM handler, on clients and a runtime of its own, within ten seconds).
pub fn abort_uploads_in_flight() {
    let list = std::mem::take(&mut *IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()));
    if list.is_empty() {
        return;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    for (url, id) in list {
        let Ok(object) = Location::parse(&url) else {
            continue;
        };
        let up = Upload {
            record: record_of(&object),
            object,
            id,
        };
        let _ =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), abort(&up)).await });
    }
}

/// Aborts an upload, then removes its record; a failed abort keeps the record and is the
/// error (an upload or record already gone is not).
async fn abort(up: &Upload) -> object_store::Result<()> {
    let (
        Location::Remote {
            parts, key: object, ..
        },
        Location::Remote { store, key, .. },
    ) = (&up.object, &up.record)
    else {
        return Ok(());
    };
    match parts.abort_multipart(object, &up.id).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(
                "{}: abort of upload {} failed ({e}); its record {} stays for a rerun to abort it",
                up.object,
                up.id,
                up.record
            );
            return Err(e);
        }
    }
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Location {
    /// Aborts the multipart uploads recorded in this directory (prefix) whose record names
    /// `doomed` accepts (see [`crate::atomic::is_dead_temporary`]), and removes the records;
    /// returns how many. An upload whose abort fails is warned of and keeps its record. A
    /// local directory has none.
    pub fn abort_uploads(&self, doomed: impl Fn(&str) -> bool) -> Result<usize> {
        if !self.is_remote() {
            return Ok(0);
        }
        let mut n = 0;
        for name in self.list()? {
            let Some(target) = crate::atomic::temporary_target(&name).filter(|_| doomed(&name))
            else {
                continue;
            };
            let record = self.join(&name);
            let Some(id) = record.read_opt()? else {
                continue;
            };
            let up = Upload {
                object: self.join(target),
                id: String::from_utf8_lossy(&id).into_owned(),
                record,
            };
            // An abort that fails was warned of, and its record stays for the next rerun.
            if block_on(abort(&up)).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}
