//! Small building blocks shared by the model's modules: activations and the
//! SwiGLU MLP.

use candle_core::{Result, Tensor};
use candle_nn::{linear_b, Activation, Linear, Module, VarBuilder};

/// `act(xs)`, or OpenAI CLIP's quick GELU `x * sigmoid(1.702 x)`.
pub(crate) fn activate(xs: &Tensor, act: Activation, quick_gelu: bool) -> Result<Tensor> {
    if quick_gelu {
        xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?
    } else {
        act.forward(xs)
    }
}

/// The gated MLP of Qwen2-style blocks: `down(act(gate(x)) * up(x))`
/// (SwiGLU with `act` SiLU).
#[derive(Debug, Clone)]
pub(crate) struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl SwiGlu {
    /// SiLU, no biases (the decoder's MLP).
    pub(crate) fn new(vb: VarBuilder, hidden: usize, intermediate: usize) -> Result<Self> {
        Self::with(vb, hidden, intermediate, Activation::Silu, false)
    }

    /// Any activation, with or without biases (GlimpsePrune's predictor:
    /// biases, `attn_fuse_hidden_act`).
    pub(crate) fn with(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        Ok(SwiGlu {
            gate_proj: linear_b(hidden, intermediate, bias, vb.pp("gate_proj"))?,
            up_proj: linear_b(hidden, intermediate, bias, vb.pp("up_proj"))?,
            down_proj: linear_b(intermediate, hidden, bias, vb.pp("down_proj"))?,
            act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = (self.act.forward(&self.gate_proj.forward(xs)?)? * self.up_proj.forward(xs)?)?;
        self.down_proj.forward(&h)
    }
}
