//! A Hugging Face model folder as it ships: `config.json` ([`crate::hf_config`]),
//! the weights as one `model.safetensors` or as shards named by
//! `model.safetensors.index.json` (memory-mapped, converted to the model's
//! dtype as each tensor is fetched), and `tokenizer.json` when the folder
//! has one (the `tokenizers` crate).
//!
//! Tensor names: llava-hf's (`language_model.model.…`,
//! `language_model.lm_head.…`, `vision_tower.…`, `multi_modal_projector.…`)
//! as the model fetches them, or the layout transformers 4.52 and later
//! save (`model.language_model.…`, `lm_head.…`, `model.vision_tower.…`,
//! `model.multi_modal_projector.…`), renamed on the fly. A method's own
//! parameters (GlimpsePrune's `learnable_embeddings`, FocusLLaVA's
//! `multi_modal_projector.selector`, …) are fetched from the same folder.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result};
use candle_nn::VarBuilder;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::model::LlavaModel;

/// The index of sharded safetensors: tensor name -> shard file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights when they are not sharded.
pub const SINGLE_FILE: &str = "model.safetensors";

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// How the folder names the LLaVA model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameLayout {
    /// llava-hf's names, as [`LlavaModel`] fetches them.
    Llava,
    /// transformers >= 4.52: `model.language_model.…`, `lm_head.…`,
    /// `model.vision_tower.…`, `model.multi_modal_projector.…`.
    Transformers452,
}

impl NameLayout {
    /// The folder's name for the name a module fetches.
    fn stored(self, name: &str) -> String {
        if self == NameLayout::Llava {
            return name.to_string();
        }
        if let Some(rest) = name.strip_prefix("language_model.model.") {
            format!("model.language_model.{rest}")
        } else if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
            format!("lm_head.{rest}")
        } else if name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.") {
            format!("model.{name}")
        } else {
            name.to_string()
        }
    }
}

/// An opened model folder: its config, its weight files (checked against
/// the index) and its tokenizer.
pub struct HfFolder {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The safetensors files, in the index's order of first mention.
    pub shards: Vec<PathBuf>,
    pub layout: NameLayout,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer: Option<Tokenizer>,
}

impl std::fmt::Debug for HfFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfFolder")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("shards", &self.shards)
            .field("layout", &self.layout)
            .field("tokenizer", &self.tokenizer.is_some())
            .finish()
    }
}

/// Maps `path`'s safetensors file.
fn map(path: &Path) -> Result<MmapedSafetensors> {
    if !path.is_file() {
        bail!("{}: no such safetensors file", path.display());
    }
    // SAFETY: the file is mapped read-only; the mapping is valid as long as
    // nothing truncates or rewrites the file while it is mapped, which a
    // model folder being read does not do (the same contract as
    // transformers' and candle's loaders). safetensors checks the header
    // against the file's length before any tensor is read.
    unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

impl HfFolder {
    /// Reads `dir/config.json`, checks the weights (every shard the index
    /// names exists and holds the tensors the index puts there) and loads
    /// `dir/tokenizer.json` if present. Nothing is read of the tensors'
    /// data yet.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = ModelConfig::from_hf_file(dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let (shards, names) = if index_path.is_file() {
            Self::check_index(&dir, &index_path)?
        } else if dir.join(SINGLE_FILE).is_file() {
            let path = dir.join(SINGLE_FILE);
            let names = map(&path)?.tensors().into_iter().map(|(n, _)| n).collect();
            (vec![path], names)
        } else {
            bail!("{}: no {INDEX_FILE} and no {SINGLE_FILE}", dir.display());
        };
        let layout = if names.iter().any(|n| n.starts_with("model.language_model.")) {
            NameLayout::Transformers452
        } else {
            NameLayout::Llava
        };
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Some(
                Tokenizer::from_file(&tok_path)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tok_path.display())))?,
            )
        } else {
            None
        };
        Ok(HfFolder {
            dir,
            config,
            shards,
            layout,
            tokenizer,
        })
    }

    /// The shards of `index` in order of first mention, and every tensor name.
    fn check_index(dir: &Path, index: &Path) -> Result<(Vec<PathBuf>, HashSet<String>)> {
        let text = std::fs::read_to_string(index)?;
        let index: Index = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", index.display())))?;
        let mut shards: Vec<String> = Vec::new();
        for file in index.weight_map.values() {
            if !shards.contains(file) {
                shards.push(file.clone());
            }
        }
        if shards.is_empty() {
            bail!("{INDEX_FILE}: the weight_map is empty");
        }
        let mut names = HashSet::new();
        for file in &shards {
            if Path::new(file).components().count() != 1 {
                bail!("{INDEX_FILE}: shard {file:?} is not a file name in the folder");
            }
            let path = dir.join(file);
            if !path.is_file() {
                bail!(
                    "{INDEX_FILE} names shard {file:?}, which is not in {}",
                    dir.display()
                );
            }
            let held: BTreeSet<String> =
                map(&path)?.tensors().into_iter().map(|(n, _)| n).collect();
            if let Some((name, _)) = index
                .weight_map
                .iter()
                .find(|(n, f)| *f == file && !held.contains(*n))
            {
                bail!(
                    "{INDEX_FILE} puts tensor {name:?} in shard {file:?}, which does not hold it"
                );
            }
            names.extend(held);
        }
        Ok((shards.iter().map(|f| dir.join(f)).collect(), names))
    }

    /// Every tensor of the folder, memory-mapped, converted to `dtype` on
    /// `device` when fetched, under the names the model fetches.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: as in `map`: read-only mappings of files nothing rewrites
        // while they are mapped; headers checked against the file lengths.
        let tensors = unsafe { MmapedSafetensors::multi(&self.shards) }?;
        let vb = VarBuilder::from_backend(Box::new(tensors), dtype, device.clone());
        let layout = self.layout;
        Ok(match layout {
            NameLayout::Llava => vb,
            NameLayout::Transformers452 => vb.rename_f(move |n| layout.stored(n)),
        })
    }

    /// The LLaVA model of the folder's config and weights.
    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<LlavaModel> {
        LlavaModel::new(self.var_builder(dtype, device)?, &self.config)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.dir.display())))
    }

    /// `text`'s token ids (no special tokens added), each checked against
    /// the vocabulary; an error when the folder has no tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let Some(tok) = &self.tokenizer else {
            bail!("{}: no tokenizer.json", self.dir.display());
        };
        let ids = tok
            .encode(text, false)
            .map_err(|e| candle_core::Error::Msg(format!("tokenizer.json: {e}")))?
            .get_ids()
            .to_vec();
        let vocab = self.config.text.vocab_size;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("tokenizer.json gives id {id}, outside the model's vocabulary of {vocab}");
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens skipped); `None` without a tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<Option<String>> {
        self.tokenizer
            .as_ref()
            .map(|t| {
                t.decode(ids, true)
                    .map_err(|e| candle_core::Error::Msg(format!("tokenizer.json: {e}")))
            })
            .transpose()
    }
}
