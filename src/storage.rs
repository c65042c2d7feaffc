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

use crate::util::{atomic_write, sha256_bytes, sha256_file, AtomicFile};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Objects up to this size are one PUT; larger ones a multipart upload of parts this size.
pub const PART_SIZE: usize = 16 << 20;

/// A file or directory: a local path, or a key (prefix) in an object store.
#[derive(Clone)]
pub enum Location {
    /// A local or network file system path.
    Local(PathBuf),
    /// An object store key, with the URL it was named by.
    Remote {
        /// The store (bucket or container).
        store: Arc<dyn ObjectStore>,
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
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => Arc::new(AmazonS3Builder::from_env().with_url(s).build()?),
            "gs" => Arc::new(GoogleCloudStorageBuilder::from_env().with_url(s).build()?),
            "az" | "azure" | "abfs" | "abfss" => {
                Arc::new(MicrosoftAzureBuilder::from_env().with_url(s).build()?)
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
            Location::Remote { store, url, key } => {
                let mut k = key.clone();
                for part in rel.split('/').filter(|p| !p.is_empty()) {
                    k = k.join(part);
                }
                Location::Remote {
                    store: store.clone(),
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
            Location::Local(p) => match std::fs::read_dir(p) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect(),
                Err(_) => Vec::new(),
            },
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

    /// Writes the file whole: locally under a temporary name, fsynced and renamed; in an
    /// object store as one PUT, or a multipart upload that is aborted on error.
    pub fn put(&self, bytes: Bytes) -> Result<()> {
        match self {
            Location::Local(p) => atomic_write(p, &bytes),
            Location::Remote { store, key, .. } => block_on(upload(store.as_ref(), key, bytes))
                .with_context(|| format!("{self}: upload failed")),
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
                    // A file system without hard links: check, then rename (not race-free).
                    Err(_) if p.exists() => return Ok(false),
                    Err(_) => f.commit()?,
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
}

/// One PUT for small objects; otherwise a multipart upload whose parts go one after the
/// other, aborted (its parts discarded) if any part or the completion fails.
async fn upload(store: &dyn ObjectStore, key: &Key, bytes: Bytes) -> object_store::Result<()> {
    if bytes.len() <= PART_SIZE {
        store.put(key, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let mut up = store.put_multipart(key).await?;
    let mut res = Ok(());
    for start in (0..bytes.len()).step_by(PART_SIZE) {
        let part = bytes.slice(start..(start + PART_SIZE).min(bytes.len()));
        res = up.put_part(PutPayload::from(part)).await;
        if res.is_err() {
            break;
        }
    }
    if res.is_ok() {
        res = up.complete().await.map(|_| ());
    }
    if res.is_err() {
        let _ = up.abort().await;
    }
    res
}
