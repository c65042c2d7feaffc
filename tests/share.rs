//! Sharing through an object store, against a real S3 API (moto's server on 127.0.0.1,
//! installed by `make setup`): an upload killed half way leaves no manifest, the rerun
//! completes it byte-identical to a local run, a second finalize is refused, `verify`,
//! `inspect` and `train-student` read the bucket, and pyarrow, polars, pandas, `datasets`
//! and DuckDB load it with the README's own lines.

mod common;

use common::{augpro_cmd, files};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bucket and prefix the README's loading lines use.
const BUCKET: &str = "team-bucket";
const URL: &str = "s3://team-bucket/augpro";

/// A moto S3 server on a free local port, stopped when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (installed by `make setup`)");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        moto
    }

    /// The environment a client of this server needs.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    fn augpro(&self, args: &[&str], failpoint: Option<&str>) -> Output {
        let mut c = augpro_cmd(args);
        c.envs(self.env());
        if let Some(p) = failpoint {
            c.env("AUGPRO_FAILPOINT", p);
        }
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

    fn python(&self, code: &str, cwd: &Path) -> String {
        let o = Command::new("python3")
            .arg("-c")
            .arg(code)
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

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// The README's "Share with another team" Python block.
fn readme_loading_lines() -> String {
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    let section = readme
        .split("## Share with another team")
        .nth(1)
        .expect("README section");
    let block = section
        .split("```python\n")
        .nth(1)
        .expect("python block")
        .split("```")
        .next()
        .unwrap();
    block.to_string()
}

#[test]
fn s3_upload_resume_finalize_once_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    moto.python(
        &format!("import boto3\nboto3.client('s3').create_bucket(Bucket='{BUCKET}')\n"),
        tmp.path(),
    );
    let dataset = format!("{URL}/sst2/smoke");
    let list = |prefix: &str| -> Vec<String> {
        let out = moto.python(
            &format!(
                "import boto3\nr = boto3.client('s3').list_objects_v2(Bucket='{BUCKET}', Prefix='{prefix}')\n\
                 for o in r.get('Contents', []): print('KEY', o['Key'])\n"
            ),
            tmp.path(),
        );
        out.lines()
            .filter_map(|l| l.strip_prefix("KEY "))
            .map(str::to_string)
            .collect()
    };

    // Killed in the middle of shard 1's upload: shard 0 is complete, no manifest exists.
    let o = moto.augpro(
        &["augment", "pipelines/smoke.toml", "--out", URL],
        Some("shard-upload:1"),
    );
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let keys = list("augpro/sst2/smoke/");
    assert!(
        keys.iter()
            .any(|k| k.ends_with(".train-00000-of-00002.done.json"))
            && !keys.iter().any(|k| k.ends_with("manifest.json"))
            && !keys
                .iter()
                .any(|k| k.ends_with(".train-00001-of-00002.done.json")),
        "{keys:?}"
    );

    // The rerun skips shard 0 and completes; the result equals a local run byte for byte.
    let text = moto.ok(&["augment", "pipelines/smoke.toml", "--out", URL]);
    assert!(
        text.contains("shard 0/2: already complete, skipped"),
        "{text}"
    );
    let local_root = tmp.path().join("local");
    moto.ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        local_root.to_str().unwrap(),
    ]);
    let local = local_root.join("sst2/smoke");
    let mut want = Vec::new();
    tree(&local, "", &mut want);
    let mut got: Vec<String> = list("augpro/sst2/smoke/")
        .into_iter()
        .map(|k| k.trim_start_matches("augpro/sst2/smoke/").to_string())
        .filter(|k| !k.contains("timing"))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the bucket holds the same files as the local run"
    );
    let copy = tmp.path().join("copy");
    moto.python(
        &format!(
            "import boto3, os\ns3 = boto3.client('s3')\nfor k in {got:?}:\n    \
             p = os.path.join('{copy}', k); os.makedirs(os.path.dirname(p), exist_ok=True)\n    \
             s3.download_file('{BUCKET}', 'augpro/sst2/smoke/' + k, p)\n",
            copy = copy.display()
        ),
        tmp.path(),
    );
    for f in &want {
        assert!(
            std::fs::read(local.join(f)).unwrap() == std::fs::read(copy.join(f)).unwrap(),
            "{f} differs between the bucket and the local run"
        );
    }

    // A second finalizer is refused and the manifest is untouched.
    let o = moto.augpro(
        &[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            URL,
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
    assert!(moto.ok(&["verify", &dataset]).contains("ok"));
    assert!(moto.ok(&["inspect", &dataset]).contains("augpro_mix"));
    let student = tmp.path().join("student");
    let text = moto.ok(&[
        "train-student",
        "--shards",
        &dataset,
        "--task",
        "sst2",
        "--out",
        student.to_str().unwrap(),
        "--max-steps",
        "2",
    ]);
    assert!(text.contains("accuracy"), "{text}");

    // Other teams read it with the README's lines, and `label` stays a ClassLabel.
    let mut code = readme_loading_lines();
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
    moto.python(&code, tmp.path());
}
