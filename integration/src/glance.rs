//! Glance2Gaze's Glance Fusion in the vision path (SPEC "Glance2Gaze";
//! foveal glance_fusion): the ViT's hidden states of the layers `L` (the
//! paper's {7, 13, 19, 23} of a 24-layer ViT), each through its own
//! projection to the decoder's width, fused per token under the instruction
//! (its token embeddings through a per-layer linear map), replacing the
//! single layer's features LLaVA feeds the decoder.
//!
//! The layer LLaVA already feeds (the model's feature layer, 23 of 24 in the
//! paper's set) is projected by LLaVA's own projector, `multi_modal_projector`
//! (what the paper's first stage trains, seeds/000 A.3.1); every other
//! layer `l` has a projector of the same shape, `glance.projectors.{l}.
//! linear_{1,2}`. The instruction maps are `glance.instruction.{l}.{weight,
//! bias}` (`dt -> dt`). With a single fused layer its weight is 1 whatever
//! the instruction (glance_fusion with S = 1 is the identity), so that layer
//! needs no instruction and no map: with the feature layer alone the fused
//! tokens are LLaVA's.

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use foveal::glance_fusion::Lengths;

use crate::config::ModelConfig;
use crate::model::LlavaModel;
use crate::ops;
use crate::projector::Projector;

/// The fused layers' projections and instruction maps.
#[derive(Debug, Clone)]
pub struct GlanceFusion {
    /// The fused hidden states (indices as HF's `output_hidden_states`: 0
    /// the embeddings, `i` the output of encoder layer `i`), ascending.
    layers: Vec<usize>,
    /// Per fused layer its projection; `None`: LLaVA's projector.
    projectors: Vec<Option<Projector>>,
    /// Per fused layer the instruction's map (empty with one layer).
    instruction: Vec<Linear>,
}

impl GlanceFusion {
    /// The fused `layers` of `model`'s tower (checked: at least one,
    /// ascending, each at most the tower's depth), under `vb` at the root
    /// of a checkpoint.
    pub fn new(vb: VarBuilder, model: &ModelConfig, layers: &[usize]) -> Result<Self> {
        let depth = model.vision.num_layers;
        if layers.is_empty() {
            candle_core::bail!("Glance Fusion: no ViT layer to fuse");
        }
        if layers.windows(2).any(|w| w[0] >= w[1]) || layers[layers.len() - 1] > depth {
            candle_core::bail!(
                "Glance Fusion: layers {layers:?} must ascend within the tower's hidden states 0..={depth}"
            );
        }
        let (dv, dt) = (model.vision.hidden_size, model.text.hidden_size);
        let feature = model.feature_layer_index();
        let projectors = layers
            .iter()
            .map(|&l| match l == feature {
                true => Ok(None),
                false => Projector::new(
                    vb.pp(format!("glance.projectors.{l}")),
                    dv,
                    dt,
                    model.projector_act,
                )
                .map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        let instruction = match layers.len() {
            1 => Vec::new(),
            _ => layers
                .iter()
                .map(|l| linear(dt, dt, vb.pp(format!("glance.instruction.{l}"))))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(GlanceFusion {
            layers: layers.to_vec(),
            projectors,
            instruction,
        })
    }

    /// The fused hidden states' indices.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Whether the fusion weighs layers by an instruction (more than one layer).
    pub fn needs_instruction(&self) -> bool {
        self.layers.len() > 1
    }

    /// `Vq [S, U, N, dt]`: the fused layers of images `pixels [U, 3, s, s]`,
    /// each through its projection.
    pub fn project(&self, model: &LlavaModel, pixels: &Tensor) -> Result<Tensor> {
        let last = self.layers[self.layers.len() - 1];
        let states = model.vision.forward_upto(pixels, last)?;
        let projected = self
            .layers
            .iter()
            .zip(&self.projectors)
            .map(|(&l, p)| match p {
                Some(p) => p.forward(&states[l]),
                None => model.projector.forward(&states[l]),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&projected, 0)
    }

    /// `E [S, U, M, dt]`: the instruction's token embeddings `[U, M, dt]`
    /// through each layer's map.
    pub fn instruct(&self, embeds: &Tensor) -> Result<Tensor> {
        if !self.needs_instruction() {
            candle_core::bail!("Glance Fusion: one fused layer has no instruction map");
        }
        let mapped = self
            .instruction
            .iter()
            .map(|m| m.forward(embeds))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&mapped, 0)
    }

    /// The fused tokens `[U, N, dt]` of images `pixels [U, 3, s, s]` under
    /// their instructions: token embeddings `[U, M, dt]` with `m_len[u]`
    /// valid tokens each (each at least 1; unused, and may be `None`, with
    /// one fused layer).
    pub fn fuse(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        instruction: Option<(&Tensor, &[usize])>,
    ) -> Result<Tensor> {
        Ok(self.fuse_with(model, pixels, instruction, false)?.0)
    }

    /// [`GlanceFusion::fuse`], and with `weights` the layer weights `[U, N,
    /// S]` f32 the fusion used (none with one fused layer).
    pub fn fuse_with(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        instruction: Option<(&Tensor, &[usize])>,
        weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let vq = self.project(model, pixels)?;
        if !self.needs_instruction() {
            return Ok((vq.get(0)?, None));
        }
        let Some((embeds, m_len)) = instruction else {
            candle_core::bail!(
                "Glance Fusion: {} layers are weighed by an instruction, none given",
                self.layers.len()
            )
        };
        let (_, u, n, _) = vq.dims4()?;
        let lengths = Lengths::new(&vec![n; u], m_len).map_err(candle_core::Error::wrap)?;
        let e = self.instruct(embeds)?;
        if weights {
            let (fused, w) = ops::glance_fusion_weights(&vq, &e, &lengths)?;
            Ok((fused, Some(w)))
        } else {
            Ok((ops::glance_fusion(&vq, &e, &lengths)?, None))
        }
    }
}
