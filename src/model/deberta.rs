//! DeBERTa-v2/v3's disentangled attention: besides content-to-content scores `q·kᵀ`, each
//! layer adds content-to-position (`c2p`: queries against projected relative-position
//! embeddings) and position-to-content (`p2c`: keys against them) scores, indexed by the
//! (log-bucketed) distance between the two tokens. As in transformers'
//! `modeling_deberta_v2.py`, all three share the scale `1/√(d·(1 + #kinds))`.

use super::bert::{BertConfig, Ctx, LayerNorm, Linear};
use super::params::{Init, Params};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// The relative-attention settings of a DeBERTa `config.json`.
#[derive(Debug, Clone)]
pub struct Relative {
    /// Half the number of relative-position embeddings: distances are clamped to ±span.
    span: usize,
    /// Bucket count for log-bucketed distances (0: plain distances).
    buckets: i64,
    /// The largest distance the log buckets reach.
    max_position: i64,
    /// Position projections are the layer's own query and key projections.
    pub share_att_key: bool,
    /// Content-to-position scores on.
    pub c2p: bool,
    /// Position-to-content scores on.
    pub p2c: bool,
    /// LayerNorm (`encoder.LayerNorm`) on the relative-position embeddings.
    norm: bool,
}

fn int(c: &BertConfig, key: &str, default: i64) -> i64 {
    c.extra.get(key).and_then(|v| v.as_i64()).unwrap_or(default)
}

impl Relative {
    /// The settings when `relative_attention` is on, else `None`; settings augpro does not
    /// implement (a convolution layer, a factorised embedding size) are errors.
    pub fn from_config(c: &BertConfig) -> Result<Option<Self>> {
        if int(c, "conv_kernel_size", 0) > 0 {
            bail!("config.json: DeBERTa's conv_kernel_size is not supported (expected 0)");
        }
        if int(c, "embedding_size", c.hidden_size as i64) != c.hidden_size as i64 {
            bail!("config.json: DeBERTa's embedding_size must equal hidden_size");
        }
        let on = c.extra.get("relative_attention").and_then(|v| v.as_bool());
        if on != Some(true) {
            return Ok(None);
        }
        let kinds: Vec<&str> = match c.extra.get("pos_att_type") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            Some(serde_json::Value::String(s)) => s.split('|').map(str::trim).collect(),
            _ => Vec::new(),
        };
        if let Some(k) = kinds.iter().find(|k| !matches!(**k, "c2p" | "p2c")) {
            bail!("config.json: pos_att_type `{k}` is not supported (expected c2p, p2c)");
        }
        let mut max_position = int(c, "max_relative_positions", -1);
        if max_position < 1 {
            max_position = c.max_position_embeddings as i64;
        }
        let buckets = int(c, "position_buckets", -1).max(0);
        let norm_rel = c.extra.get("norm_rel_ebd").and_then(|v| v.as_str());
        Ok(Some(Self {
            span: if buckets > 0 { buckets } else { max_position } as usize,
            buckets,
            max_position,
            share_att_key: c
                .extra
                .get("share_att_key")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            c2p: kinds.contains(&"c2p"),
            p2c: kinds.contains(&"p2c"),
            norm: norm_rel.is_some_and(|s| s.split('|').any(|p| p.trim() == "layer_norm")),
        }))
    }

    /// `1 + #kinds`: the scores' scale is `1/√(d·factor)`.
    pub fn scale_factor(&self) -> usize {
        1 + self.c2p as usize + self.p2c as usize
    }

    /// The distance `rel = i − j` as the model indexes it: exact up to half the bucket
    /// count, then log-bucketed up to `max_position` (transformers' `make_log_bucket_position`,
    /// in f32 as there).
    fn bucket(&self, rel: i64) -> i64 {
        if self.buckets <= 0 {
            return rel;
        }
        let mid = self.buckets / 2;
        let abs = if rel < mid && rel > -mid {
            mid - 1
        } else {
            rel.abs()
        };
        if abs <= mid {
            return rel;
        }
        let base = (((self.max_position - 1) as f64 / mid as f64) as f32).ln();
        let log = ((abs as f32 / mid as f32).ln() / base * (mid - 1) as f32).ceil() + mid as f32;
        log as i64 * rel.signum()
    }

    /// For a length `s`: the c2p index `[s, s]` (query i, key j → embedding row of
    /// `bucket(i − j) + span`) and the p2c index (row x, column y → `span − bucket(x − y)`),
    /// both clamped to the table.
    fn indexes(&self, s: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let top = 2 * self.span as i64 - 1;
        let (mut c2p, mut p2c) = (Vec::with_capacity(s * s), Vec::with_capacity(s * s));
        for i in 0..s as i64 {
            for j in 0..s as i64 {
                let r = self.bucket(i - j);
                c2p.push((r + self.span as i64).clamp(0, top) as u32);
                p2c.push((self.span as i64 - r).clamp(0, top) as u32);
            }
        }
        Ok((
            Tensor::from_vec(c2p, (s, s), dev)?,
            Tensor::from_vec(p2c, (s, s), dev)?,
        ))
    }
}

/// The encoder-level relative-position embeddings (`encoder.rel_embeddings`).
pub struct RelEmbeddings {
    table: Tensor,
    norm: Option<LayerNorm>,
    dropout: f32,
    /// The settings they were loaded for.
    pub settings: Relative,
}

impl RelEmbeddings {
    /// Loads the table (`2·span` rows) and its LayerNorm when `norm_rel_ebd` asks for one.
    pub fn load(p: &Params, c: &BertConfig, settings: Relative) -> Result<Self> {
        let table = p.get(
            "encoder.rel_embeddings.weight",
            &[2 * settings.span, c.hidden_size],
            Init::Required,
        )?;
        let norm = settings
            .norm
            .then(|| LayerNorm::load(p, "encoder.LayerNorm", c.hidden_size, c.layer_norm_eps))
            .transpose()?;
        Ok(Self {
            table,
            norm,
            dropout: c.hidden_dropout_prob,
            settings,
        })
    }

    /// The per-forward state for sequences padded to `s`: the (normalised, dropped-out)
    /// embeddings and both index matrices.
    pub fn state(&self, s: usize, ctx: &mut Ctx) -> Result<RelState> {
        let emb = match &self.norm {
            Some(n) => n.forward(&self.table, ctx)?,
            None => self.table.clone(),
        };
        let emb = ctx.dropout(&emb, self.dropout)?;
        let (c2p, p2c) = self.settings.indexes(s, self.table.device())?;
        Ok(RelState { emb, c2p, p2c })
    }
}

/// What every layer's disentangled scores need for one forward pass.
pub struct RelState {
    emb: Tensor,
    c2p: Tensor,
    p2c: Tensor,
}

/// One layer's position projections: its own query and key ones when `share_att_key`,
/// else `pos_query_proj` / `pos_key_proj`.
pub struct PosProjections {
    query: Option<Linear>,
    key: Option<Linear>,
}

impl PosProjections {
    /// Loads `pos_key_proj` / `pos_query_proj` under `prefix` when the layer has its own.
    pub fn load(p: &Params, prefix: &str, h: usize, r: &Relative) -> Result<Self> {
        let own = |on: bool, name: &str| {
            (on && !r.share_att_key)
                .then(|| Linear::load(p, &format!("{prefix}.{name}"), h, h, Init::Required))
                .transpose()
        };
        Ok(Self {
            key: own(r.c2p, "pos_key_proj")?,
            query: own(r.p2c, "pos_query_proj")?,
        })
    }
}

/// The c2p + p2c scores `[b, heads, s, s]` (already scaled) for per-head queries and keys
/// `[b, heads, s, d]`; `qk` are the layer's query and key projections.
pub fn scores(
    q: &Tensor,
    k: &Tensor,
    qk: (&Linear, &Linear),
    own: &PosProjections,
    st: &RelState,
    r: &Relative,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let scale = 1.0 / ((d * r.scale_factor()) as f64).sqrt();
    let per_head = |l: &Linear| -> Result<Tensor> {
        let rows = st.emb.dim(0)?;
        Ok(l.forward(&st.emb)?
            .reshape((rows, heads, d))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?)
    };
    let index =
        |i: &Tensor| -> Result<Tensor> { Ok(i.broadcast_as((b, heads, s, s))?.contiguous()?) };
    let mut total = Tensor::zeros((b, heads, s, s), q.dtype(), q.device())?;
    if r.c2p {
        let pos_key = per_head(own.key.as_ref().unwrap_or(qk.1))?;
        let att = q.broadcast_matmul(&pos_key.t()?)?;
        total = (total + att.gather(&index(&st.c2p)?, 3)?)?;
    }
    if r.p2c {
        let pos_query = per_head(own.query.as_ref().unwrap_or(qk.0))?;
        let att = k.broadcast_matmul(&pos_query.t()?)?;
        total = (total + att.gather(&index(&st.p2c)?, 3)?.transpose(2, 3)?)?;
    }
    Ok((total * scale)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(buckets: i64, max_position: i64) -> Relative {
        Relative {
            span: if buckets > 0 { buckets } else { max_position } as usize,
            buckets,
            max_position,
            share_att_key: true,
            c2p: true,
            p2c: true,
            norm: false,
        }
    }

    /// Values of transformers' `make_log_bucket_position(rel, 256, 512)` (DeBERTa-v3's
    /// setting): exact within ±128, log-spaced beyond, odd in the distance.
    #[test]
    fn log_buckets_match_transformers() {
        let r = settings(256, 512);
        for (rel, want) in [
            (0, 0),
            (5, 5),
            (-127, -127),
            (128, 128),
            (129, 129),
            (200, 169),
            (-200, -169),
            (511, 255),
        ] {
            assert_eq!(r.bucket(rel), want, "distance {rel}");
        }
        assert_eq!(
            settings(0, 12).bucket(-40),
            -40,
            "no buckets: plain distance"
        );
    }

    #[test]
    fn indexes_are_clamped_to_the_table() {
        let r = settings(0, 2);
        let (c2p, p2c) = r.indexes(4, &Device::Cpu).unwrap();
        let c2p: Vec<Vec<u32>> = c2p.to_vec2().unwrap();
        let p2c: Vec<Vec<u32>> = p2c.to_vec2().unwrap();
        assert_eq!(c2p[0], [2, 1, 0, 0]);
        assert_eq!(c2p[3], [3, 3, 3, 2]);
        assert_eq!(p2c[0], [2, 3, 3, 3]);
    }
}
