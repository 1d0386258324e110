//! Small helpers shared by the model's modules: activations, and the list of
//! named parameters each module contributes (for saving with HF names).

use candle_core::{Result, Tensor};
use candle_nn::{linear_no_bias, Activation, LayerNorm, Linear, Module, RmsNorm, VarBuilder};

/// Named parameters, in the order the modules list them.
pub type Named = Vec<(String, Tensor)>;

pub(crate) fn push_linear(out: &mut Named, prefix: &str, l: &Linear) {
    out.push((format!("{prefix}.weight"), l.weight().clone()));
    if let Some(b) = l.bias() {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

pub(crate) fn push_layer_norm(out: &mut Named, prefix: &str, n: &LayerNorm) {
    out.push((format!("{prefix}.weight"), n.weight().clone()));
    if let Some(b) = n.bias() {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

pub(crate) fn push_rms_norm(out: &mut Named, prefix: &str, n: &RmsNorm) {
    out.push((format!("{prefix}.weight"), n.weight().clone()));
}

/// `act(xs)`, or OpenAI CLIP's quick GELU `x * sigmoid(1.702 x)`.
pub(crate) fn activate(xs: &Tensor, act: Activation, quick_gelu: bool) -> Result<Tensor> {
    if quick_gelu {
        xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?
    } else {
        act.forward(xs)
    }
}

/// The SwiGLU MLP of Qwen2-style blocks: `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug, Clone)]
pub(crate) struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    pub(crate) fn new(vb: VarBuilder, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(SwiGlu {
            gate_proj: linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = (self.gate_proj.forward(xs)?.silu()? * self.up_proj.forward(xs)?)?;
        self.down_proj.forward(&h)
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named) {
        push_linear(out, &format!("{prefix}.gate_proj"), &self.gate_proj);
        push_linear(out, &format!("{prefix}.up_proj"), &self.up_proj);
        push_linear(out, &format!("{prefix}.down_proj"), &self.down_proj);
    }
}
