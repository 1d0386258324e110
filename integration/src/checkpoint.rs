//! Learned parameters, one way for the model and every method: where they
//! come from (a seeded random initialisation, a safetensors file with
//! Hugging Face-style names, or a PyTorch checkpoint as `torch.save` writes
//! it) and the names they are saved under.
//!
//! A module names each parameter once, when it fetches it from its
//! [`VarBuilder`]; [`Checkpoint::record`] keeps every tensor fetched under
//! its full name, so saving writes exactly the names loading reads (no second
//! list of names to keep in step).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Named parameters, in the order they were fetched.
pub type Named = Vec<(String, Tensor)>;

/// The parameters a module fetched while it was built, under their names
/// (relative to the [`VarBuilder`] given to [`Checkpoint::record`]).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    tensors: Named,
}

impl Checkpoint {
    /// No parameters (a method without learned parts).
    pub const fn empty() -> Checkpoint {
        Checkpoint {
            tensors: Vec::new(),
        }
    }

    /// Runs `build` on a builder that reads from `vb` and records every
    /// tensor fetched; returns what `build` made and the record.
    pub fn record<T>(
        vb: VarBuilder,
        build: impl FnOnce(VarBuilder) -> Result<T>,
    ) -> Result<(T, Checkpoint)> {
        let seen = Arc::new(Mutex::new(Named::new()));
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let recorder = Recorder {
            inner: vb,
            seen: seen.clone(),
        };
        let built = build(VarBuilder::from_backend(Box::new(recorder), dtype, device))?;
        let tensors = std::mem::take(&mut *seen.lock().expect("the recorder never panics"));
        Ok((built, Checkpoint { tensors }))
    }

    /// Every recorded parameter with its name.
    pub fn named(&self) -> &Named {
        &self.tensors
    }

    /// Writes every recorded parameter (its dtype as built) to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let map: HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, path)
    }
}

/// A deterministic random initialisation: every parameter drawn from a
/// generator seeded by `seed` and its name (so the same seed gives the same
/// weights whatever the construction order). Norm weights near 1, biases
/// small, matrices normal with std `1/sqrt(fan_in)`, embeddings of std 1.
pub fn seeded(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededInit { seed }), dtype, device.clone())
}

/// The tensors of a safetensors file, converted to `dtype` on `device`
/// (tensors no module asks for are ignored).
pub fn load(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device)?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// The tensors of a PyTorch checkpoint (`torch.save`: a zip archive holding
/// a pickle, read by candle's pickle reader), converted to `dtype` on
/// `device`. The top level is a dictionary; a value that is itself a
/// dictionary (a module's `state_dict`, as in GlimpsePrune's
/// `new_modules_gp.pt`, which maps each new module's name to its state dict
/// and `learnable_embeddings` to a tensor) is flattened with a dot:
/// `attn_fuser` -> `attn_fuser.attn_in_proj.weight`. Entries that are not
/// tensors (a state dict's `_metadata`) are skipped; deeper nesting is not
/// read.
pub fn load_pth(
    path: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let path = path.as_ref();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::pickle::read_all(path)?.into_iter().collect();
    for module in nested_dicts(path)? {
        for (name, t) in candle_core::pickle::read_all_with_key(path, Some(&module))? {
            tensors.insert(format!("{module}.{name}"), t);
        }
    }
    if tensors.is_empty() {
        candle_core::bail!("{}: no tensors in this PyTorch checkpoint", path.display());
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// The keys of a `torch.save` file's top-level dictionary whose values are
/// dictionaries.
fn nested_dicts(path: &Path) -> Result<Vec<String>> {
    use candle_core::pickle::{Object, Stack};
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(std::fs::File::open(path)?))
        .map_err(candle_core::Error::wrap)?;
    let names = zip
        .file_names()
        .map(|f| f.map(|f| f.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(candle_core::Error::wrap)?;
    let Some(pkl) = names.into_iter().find(|f| f.ends_with("data.pkl")) else {
        candle_core::bail!(
            "{}: no data.pkl (not a torch.save zip archive)",
            path.display()
        );
    };
    let mut stack = Stack::empty();
    stack.read_loop(&mut std::io::BufReader::new(
        zip.by_name(&pkl).map_err(candle_core::Error::wrap)?,
    ))?;
    Ok(match stack.finalize()? {
        Object::Dict(items) => items
            .into_iter()
            .filter_map(|(k, v)| match (k, v) {
                (Object::Unicode(k), Object::Dict(_)) => Some(k),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// The backend behind [`Checkpoint::record`]: reads through `inner`, keeps
/// what it returns (the first time a name is asked for).
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    seen: Arc<Mutex<Named>>,
}

impl SimpleBackend for Recorder<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.keep(name, t.to_device(dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.keep(name, t.to_device(dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

impl Recorder<'_> {
    fn keep(&self, name: &str, t: Tensor) -> Result<Tensor> {
        let mut seen = self.seen.lock().expect("the recorder never panics");
        if !seen.iter().any(|(n, _)| n == name) {
            seen.push((name.to_string(), t.clone()));
        }
        Ok(t)
    }
}

/// The backend behind [`seeded`].
struct SeededInit {
    seed: u64,
}

impl SeededInit {
    /// Standard deviation and mean of the parameter `name` of shape `dims`.
    fn scale(name: &str, dims: &[usize]) -> (f32, f32) {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let is_norm = ["norm", "layrnorm", "layer_norm"]
            .iter()
            .any(|n| name.contains(n));
        if is_norm && leaf == "weight" {
            (0.1, 1.0)
        } else if leaf == "bias" {
            (0.02, 0.0)
        } else if name.ends_with("embed_tokens.weight") {
            (1.0, 0.0)
        } else if name.ends_with("position_embedding.weight") || name.ends_with("class_embedding") {
            (0.5, 0.0)
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            ((fan_in as f32).powf(-0.5), 0.0)
        }
    }
}

/// FNV-1a, a stable hash of a parameter name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(name));
        let (std, mean) = Self::scale(name, s.dims());
        let n = s.elem_count();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller: two normals per pair of uniforms.
            let u1 = 1.0 - rng.random::<f32>();
            let u2 = rng.random::<f32>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f32::consts::TAU * u2;
            v.push(mean + std * r * t.cos());
            if v.len() < n {
                v.push(mean + std * r * t.sin());
            }
        }
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded init: {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
