//! Small building blocks shared by the model's modules: activations and the
//! SwiGLU MLP.

use candle_core::{Result, Tensor};
use candle_nn::{linear_no_bias, Activation, Linear, Module, VarBuilder};

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
}
