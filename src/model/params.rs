//! Named parameters loaded from a checkpoint, optionally as trainable variables.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::HashMap;

/// How to initialise a parameter that the checkpoint does not have.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// The parameter must exist in the checkpoint.
    Required,
    /// Normal(0, std), as Hugging Face initialises new heads.
    Normal(f32),
    /// All zeros (biases).
    Zeros,
}

/// Source of named tensors for building a model. Names are canonical: the encoder's
/// without the family prefix (`encoder.layer.0...`), the head's as in the checkpoint.
pub struct Params {
    tensors: HashMap<String, Tensor>,
    trainable: bool,
    used: RefCell<Vec<(String, Tensor, Option<Var>)>>,
    rng: RefCell<ChaCha8Rng>,
    device: Device,
    dtype: DType,
    /// Dense layers multiply in bf16 (CPU, `--dtype bf16`): parameters stay f32.
    bf16_matmuls: bool,
    source: String,
}

pub use super::family::canonical_name;

impl Params {
    /// Wraps loaded tensors; `source` names the file for error messages.
    pub fn new(
        tensors: HashMap<String, Tensor>,
        device: &Device,
        trainable: bool,
        seed: u64,
        source: &str,
    ) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| (canonical_name(&k), v))
            .collect();
        Self {
            tensors,
            trainable,
            used: RefCell::new(Vec::new()),
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(seed)),
            device: device.clone(),
            dtype: DType::F32,
            bf16_matmuls: false,
            source: source.to_string(),
        }
    }

    /// Loads every parameter in `dtype` instead of f32 (a half-precision teacher on CUDA).
    /// On the CPU, bf16 keeps the parameters and activations in f32 and multiplies the
    /// dense layers' inputs and weights in bf16 (f32 accumulation): inference only, the
    /// weights packed once at load.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        if self.device.is_cpu() && dtype == DType::BF16 {
            self.bf16_matmuls = true;
        } else {
            self.dtype = dtype;
        }
        self
    }

    /// Whether dense layers multiply in bf16 (see [`Params::with_dtype`]).
    pub fn bf16_matmuls(&self) -> bool {
        self.bf16_matmuls
    }

    /// Fetches a parameter by canonical name, checking its shape; initialises it if allowed.
    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match self.tensors.get(name) {
            Some(t) => {
                if t.dims() != shape {
                    bail!(
                        "{}: weight `{name}` has shape {:?}, but config.json implies {:?} (config and weights do not match)",
                        self.source,
                        t.dims(),
                        shape
                    );
                }
                t.to_dtype(self.dtype)?.to_device(&self.device)?
            }
            None => match init {
                Init::Required => bail!(
                    "{}: weight `{name}` is missing (expected shape {shape:?})",
                    self.source
                ),
                Init::Zeros => Tensor::zeros(shape, self.dtype, &self.device)?,
                Init::Normal(std) => {
                    let n: usize = shape.iter().product();
                    let mut rng = self.rng.borrow_mut();
                    let v: Vec<f32> = (0..n).map(|_| normal(&mut rng) * std).collect();
                    Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?
                }
            },
        };
        let (t, var) = if self.trainable {
            let v = Var::from_tensor(&t)?;
            (v.as_tensor().clone(), Some(v))
        } else {
            (t, None)
        };
        self.used
            .borrow_mut()
            .push((name.to_string(), t.clone(), var));
        Ok(t)
    }

    /// True when the checkpoint holds a tensor of this canonical name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// True when parameters are loaded as trainable variables.
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Every parameter the model took, with its variable when trainable.
    pub fn used(&self) -> Vec<(String, Tensor, Option<Var>)> {
        self.used.borrow().clone()
    }

    /// A copy of every trainable variable's current value (to keep a checkpoint in memory).
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        self.used
            .borrow()
            .iter()
            .filter_map(|(_, _, v)| v.as_ref())
            .map(|v| Ok(v.as_tensor().copy()?))
            .collect()
    }

    /// Sets the trainable variables back to a [`Params::snapshot`].
    pub fn restore(&self, snapshot: &[Tensor]) -> Result<()> {
        let used = self.used.borrow();
        let vars: Vec<&Var> = used.iter().filter_map(|(_, _, v)| v.as_ref()).collect();
        anyhow::ensure!(vars.len() == snapshot.len(), "snapshot of another model");
        for (v, t) in vars.into_iter().zip(snapshot) {
            v.set(t)?;
        }
        Ok(())
    }

    /// The dtype parameters are held in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller; deterministic given the seed.
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
