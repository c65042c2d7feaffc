//! Streaming shard writer: rows arrive in batches and become zstd-compressed Parquet row
//! groups, written under temporary names and renamed when complete.

use super::manifest::{shard_files, ShardFile};
use super::schema::{is_virtual, Row, ShardSchema};
use crate::storage::Location;
use crate::util::{sha256_bytes, AtomicFile};
use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, BooleanBuilder, FixedSizeListBuilder, Float32Builder, Int32Builder, Int64Builder,
    Int8Builder, ListBuilder, RecordBatch, StringBuilder,
};
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
                crate::util::failpoint(&format!("shard-upload:{}", self.index));
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
    let n = rows.len();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (c, _) in schema.text_columns.iter().enumerate() {
        let mut b = StringBuilder::new();
        for r in &rows {
            b.append_value(r.texts.get(c).map(String::as_str).unwrap_or(""));
        }
        cols.push(Arc::new(b.finish()));
    }
    if schema.regression {
        let mut b = Float32Builder::with_capacity(n);
        rows.iter().for_each(|r| b.append_option(r.label));
        cols.push(Arc::new(b.finish()));
    } else {
        let mut b = Int64Builder::with_capacity(n);
        rows.iter()
            .for_each(|r| b.append_option(r.label.map(|l| l as i64)));
        cols.push(Arc::new(b.finish()));
    }
    let mut idx = Int32Builder::with_capacity(n);
    let mut method = StringBuilder::new();
    let mut virt = BooleanBuilder::with_capacity(n);
    let mut copy = Int32Builder::with_capacity(n);
    let mut partner = Int32Builder::with_capacity(n);
    let mut lambda = Float32Builder::with_capacity(n);
    let mut eps = Float32Builder::with_capacity(n);
    let mut ids = ListBuilder::new(Int32Builder::new());
    let mut types = ListBuilder::new(Int8Builder::new());
    let mut changed = Int32Builder::with_capacity(n);
    let mut logits = FixedSizeListBuilder::new(Float32Builder::new(), schema.num_labels as i32);
    let mut pids = ListBuilder::new(Int32Builder::new());
    let mut ptypes = ListBuilder::new(Int8Builder::new());
    let mut pert = ListBuilder::new(Int8Builder::new());
    let mut lambdas = ListBuilder::new(Float32Builder::new());
    let int32 = |v: i64| {
        i32::try_from(v)
            .with_context(|| format!("source idx {v} does not fit the int32 `idx` column"))
    };
    for r in &rows {
        idx.append_value(int32(r.idx)?);
        method.append_value(r.method);
        virt.append_value(is_virtual(r.method));
        copy.append_value(r.copy as i32);
        partner.append_option(r.partner_idx.map(int32).transpose()?);
        lambda.append_option(r.lambda);
        eps.append_option(r.epsilon);
        ids.append_value(r.input_ids.iter().map(|&x| Some(x as i32)));
        types.append_value(r.token_type_ids.iter().map(|&x| Some(x as i8)));
        changed.append_option(r.changed_tokens.map(|c| c as i32));
        anyhow::ensure!(
            r.teacher_logits.len() == schema.num_labels,
            "row has {} logits, schema expects {}",
            r.teacher_logits.len(),
            schema.num_labels
        );
        logits.values().append_slice(&r.teacher_logits);
        logits.append(true);
        pids.append_option(
            r.partner_input_ids
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x as i32)).collect::<Vec<_>>()),
        );
        ptypes.append_option(
            r.partner_token_type_ids
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x as i8)).collect::<Vec<_>>()),
        );
        pert.append_option(
            r.perturbation
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x)).collect::<Vec<_>>()),
        );
        lambdas.append_option(
            r.lambdas
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x)).collect::<Vec<_>>()),
        );
    }
    cols.push(Arc::new(idx.finish()));
    cols.push(Arc::new(method.finish()));
    cols.push(Arc::new(virt.finish()));
    cols.push(Arc::new(copy.finish()));
    cols.push(Arc::new(partner.finish()));
    cols.push(Arc::new(lambda.finish()));
    cols.push(Arc::new(eps.finish()));
    cols.push(Arc::new(ids.finish()));
    cols.push(Arc::new(types.finish()));
    cols.push(Arc::new(changed.finish()));
    cols.push(Arc::new(logits.finish()));
    cols.push(Arc::new(pids.finish()));
    cols.push(Arc::new(ptypes.finish()));
    cols.push(Arc::new(pert.finish()));
    cols.push(Arc::new(lambdas.finish()));
    // The builders produce nullable child fields named "item", as the schema declares.
    Ok(RecordBatch::try_new(schema.schema.clone(), cols)?)
}
