//! Small helpers shared by the model's modules: activations, and the list of
//! named parameters each module contributes (for saving with HF names).

use candle_core::{Result, Tensor};
use candle_nn::{Activation, LayerNorm, Linear, Module, RmsNorm};

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
