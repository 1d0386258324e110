//! The LLaVA multi-modal projector: `linear_1`, activation (GELU), `linear_2`,
//! from the vision width to the text width (HF names under
//! `multi_modal_projector`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Activation, Linear, VarBuilder};

#[derive(Debug, Clone)]
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl Projector {
    pub fn new(
        vb: VarBuilder,
        vision_hidden: usize,
        text_hidden: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Projector {
            linear_1: linear(vision_hidden, text_hidden, vb.pp("linear_1"))?,
            linear_2: linear(text_hidden, text_hidden, vb.pp("linear_2"))?,
            act,
        })
    }

    /// `[B, Np, C_vision]` -> `[B, Np, C_text]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.linear_1.forward(features)?)?;
        self.linear_2.forward(&h)
    }
}
