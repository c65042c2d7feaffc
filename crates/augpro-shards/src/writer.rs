//! Streaming shard writer: rows arrive in batches and become zstd-compressed Parquet row
//! groups, written under temporary names and renamed when complete.

use crate::atomic::AtomicFile;
use crate::hash::sha256_bytes;
use crate::manifest::{shard_files, ShardFile};
use crate::schema::{is_virtual, Row, ShardSchema};
use crate::storage::Location;
use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray,
};
use arrow::datatypes::{Float32Type, Int32Type, Int8Type};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::borrow::Borrow;
use std::io::Write;
use std::sync::Arc;

/// Where a shard file's bytes go while it is written: a local temporary (renamed when
/// complete), or memory (uploaded whole when complete: an object store has no rename).
enum Sink {
    Local(AtomicFile),
    Memory(Vec<u8>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Local(f) => f.write(buf),
            Sink::Memory(v) => v.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Local(f) => f.flush(),
            Sink::Memory(_) => Ok(()),
        }
    }
}

/// One Parquet file of a shard being written.
struct Part {
    writer: ArrowWriter<Sink>,
    file: String,
    loc: Location,
    rows: u64,
}

/// Writes the files of one shard: real token rows to `data/train-…`, virtual rows (MixUp,
/// FGSM) to `data/virtual-…`, so each loads as its own `datasets` config.
pub struct ShardWriter {
    parts: Vec<Part>,
    schema: ShardSchema,
    index: usize,
}

impl ShardWriter {
    /// Starts shard `i` of `n` in `out` (its files are visible only after
    /// [`finish`](Self::finish)).
    pub fn create(out: &Location, i: usize, n: usize, schema: &ShardSchema) -> Result<Self> {
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .set_created_by(format!("augpro {}", env!("CARGO_PKG_VERSION")))
            .set_max_row_group_row_count(Some(4096))
            // Readers that take schema metadata from the Parquet key-value pairs (not from
            // the embedded Arrow schema) see the `datasets` features too.
            .set_key_value_metadata(Some(
                schema
                    .schema
                    .metadata()
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                    .collect(),
            ))
            .build();
        let mut parts = Vec::new();
        for file in shard_files(i, n) {
            let loc = out.join(&file);
            let sink = match loc.as_local() {
                Some(p) => Sink::Local(AtomicFile::create(p)?),
                None => Sink::Memory(Vec::new()),
            };
            let writer = ArrowWriter::try_new(sink, schema.schema.clone(), Some(props.clone()))
                .with_context(|| format!("{loc}: cannot start Parquet writer"))?;
            parts.push(Part {
                writer,
                file,
                loc,
                rows: 0,
            });
        }
        Ok(Self {
            parts,
            schema: schema.clone(),
            index: i,
        })
    }

    /// Appends rows, each to its file, as one record batch per file.
    pub fn write(&mut self, rows: &[Row]) -> Result<()> {
        let (virt, real): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| is_virtual(r.method));
        for (part, rows) in self.parts.iter_mut().zip([real, virt]) {
            if rows.is_empty() {
                continue;
            }
            let batch = to_batch(&self.schema, &rows)?;
            part.writer
                .write(&batch)
                .with_context(|| format!("{}: write failed", part.loc))?;
            part.rows += rows.len() as u64;
        }
        Ok(())
    }

    /// Closes the Parquet footers, then fsyncs and renames each file (or uploads it whole);
    /// returns each file's name, row count and sha256.
    pub fn finish(self) -> Result<Vec<ShardFile>> {
        let mut files = Vec::new();
        for (k, part) in self.parts.into_iter().enumerate() {
            if k > 0 {
                crate::failpoint::failpoint(&format!("shard-upload:{}", self.index));
            }
            let sink = part
                .writer
                .into_inner()
                .with_context(|| format!("{}: cannot finish Parquet file", part.loc))?;
            let (sha256, size) = match sink {
                Sink::Local(f) => {
                    f.commit()?;
                    let p = part
                        .loc
                        .as_local()
                        .expect("a local sink writes a local file");
                    let size = std::fs::metadata(p)
                        .with_context(|| format!("{}: cannot read back", part.loc))?
                        .len();
                    (part.loc.sha256()?, size)
                }
                Sink::Memory(bytes) => {
                    let (sha, size) = (sha256_bytes(&bytes), bytes.len() as u64);
                    part.loc.put(bytes.into())?;
                    (sha, size)
                }
            };
            files.push(ShardFile {
                sha256,
                file: part.file,
                rows: part.rows,
                bytes: Some(size),
            });
        }
        Ok(files)
    }
}

/// Converts rows to a record batch of the shard schema.
pub fn to_batch<R: Borrow<Row>>(schema: &ShardSchema, rows: &[R]) -> Result<RecordBatch> {
    let rows: Vec<&Row> = rows.iter().map(Borrow::borrow).collect();
    if let Some(r) = rows
        .iter()
        .find(|r| r.teacher_logits.len() != schema.num_labels)
    {
        anyhow::bail!(
            "row has {} logits, schema expects {}",
            r.teacher_logits.len(),
            schema.num_labels
        );
    }
    let mut cols = text_and_label_columns(schema, &rows);
    cols.extend(provenance_columns(&rows)?);
    cols.extend(token_columns(schema, &rows));
    // The list arrays have nullable child fields named "item", as the schema declares.
    Ok(RecordBatch::try_new(schema.schema.clone(), cols)?)
}

/// The text columns, then the label (float for regression, else int64).
fn text_and_label_columns(schema: &ShardSchema, rows: &[&Row]) -> Vec<ArrayRef> {
    let mut cols: Vec<ArrayRef> = (0..schema.text_columns.len())
        .map(|c| {
            let texts = rows
                .iter()
                .map(|r| r.texts.get(c).map(String::as_str).unwrap_or(""));
            Arc::new(StringArray::from_iter_values(texts)) as ArrayRef
        })
        .collect();
    cols.push(if schema.regression {
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.label)))
    } else {
        Arc::new(Int64Array::from_iter(
            rows.iter().map(|r| r.label.map(|l| l as i64)),
        ))
    });
    cols
}

/// Where each row comes from: source idx, method, virtual flag, copy, partner, λ, ε.
fn provenance_columns(rows: &[&Row]) -> Result<Vec<ArrayRef>> {
    let int32 = |v: i64| {
        i32::try_from(v)
            .with_context(|| format!("source idx {v} does not fit the int32 `idx` column"))
    };
    let idx: Vec<i32> = rows.iter().map(|r| int32(r.idx)).collect::<Result<_>>()?;
    let partner: Vec<Option<i32>> = rows
        .iter()
        .map(|r| r.partner_idx.map(int32).transpose())
        .collect::<Result<_>>()?;
    Ok(vec![
        Arc::new(Int32Array::from(idx)),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.method))),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(is_virtual(r.method))),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.copy as i32),
        )),
        Arc::new(Int32Array::from(partner)),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.lambda))),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.epsilon))),
    ])
}

/// The token sequence, its changes and logits, the partner's tokens, the perturbation and
/// per-position λ.
fn token_columns(schema: &ShardSchema, rows: &[&Row]) -> Vec<ArrayRef> {
    let list_i32 = |v: &[u32]| Some(v.iter().map(|&x| Some(x as i32)).collect::<Vec<_>>());
    let list_i8 = |v: &[u8]| Some(v.iter().map(|&x| Some(x as i8)).collect::<Vec<_>>());
    let logits = rows.iter().map(|r| {
        Some(
            r.teacher_logits
                .iter()
                .map(|&x| Some(x))
                .collect::<Vec<_>>(),
        )
    });
    vec![
        Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(
            rows.iter().map(|r| list_i32(&r.input_ids)),
        )),
        Arc::new(ListArray::from_iter_primitive::<Int8Type, _, _>(
            rows.iter().map(|r| list_i8(&r.token_type_ids)),
        )),
        Arc::new(Int32Array::from_iter(
            rows.iter().map(|r| r.changed_tokens.map(|c| c as i32)),
        )),
        Arc::new(
            FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
                logits,
                schema.num_labels as i32,
            ),
        ),
        Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(
            rows.iter()
                .map(|r| r.partner_input_ids.as_deref().and_then(list_i32)),
        )),
        Arc::new(ListArray::from_iter_primitive::<Int8Type, _, _>(
            rows.iter()
                .map(|r| r.partner_token_type_ids.as_deref().and_then(list_i8)),
        )),
        Arc::new(ListArray::from_iter_primitive::<Int8Type, _, _>(
            rows.iter().map(|r| {
                r.perturbation
                    .as_ref()
                    .map(|v| v.iter().map(|&x| Some(x)).collect::<Vec<_>>())
            }),
        )),
        Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(
            rows.iter().map(|r| {
                r.lambdas
                    .as_ref()
                    .map(|v| v.iter().map(|&x| Some(x)).collect::<Vec<_>>())
            }),
        )),
    ]
}
