//! VISOR's settings (seeds/002 §4.2-4.3, Appendix A, Appendix I): the layer
//! schedule as data (the cross-attention layers `L_CA` and the viable
//! self-attention configurations, each a set `L_SA`), how a configuration
//! is chosen (the router, or one fixed), and VISOR-TR's packing ratio. A
//! schedule loads from a model config's JSON ([`VisorConfig::from_json`]).
//!
//! Layer indices are 0-based, the decoder's `model.layers.{i}`.

use candle_core::Result;

use crate::config::ModelConfig;

/// Appendix A's viable self-attention configurations for a 24-layer
/// (0.5B) model, verbatim: each the layers whose full self-attention runs.
pub const APPENDIX_A: [&[usize]; 13] = [
    &[1, 4],
    &[1, 7],
    &[1, 4, 7],
    &[1, 4, 16],
    &[1, 7, 16],
    &[1, 10, 16],
    &[1, 4, 7, 16],
    &[1, 4, 7, 22],
    &[1, 4, 10, 16],
    &[1, 4, 7, 10, 16],
    &[1, 4, 7, 16, 22],
    &[1, 4, 7, 10, 16, 22],
    &[1, 4, 7, 10, 16, 19, 22],
];

/// How a generation picks its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The routing token after each question and the router MLP (§4.3);
    /// per row the costliest of its questions' predictions.
    Router,
    /// This configuration (an index into the list) for every row, no
    /// routing token.
    Fixed(usize),
}

/// What a layer does under one configuration (Eq. 3; self-attention first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `l` in the configuration's `L_SA`: the standard layer over `[V; T]`
    /// in the dense layout, updating the visual tokens.
    SelfAttention,
    /// `l` in `L_CA`: the text queries the visual tokens (cross-attention
    /// added to the text stream), then the layer over the text alone.
    CrossAttention,
    /// Neither: the layer over the text stream alone.
    Text,
}

/// VISOR's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VisorConfig {
    /// `L_CA`, ascending.
    pub cross_attention_layers: Vec<usize>,
    /// The viable configurations, each its self-attention layers, ascending.
    pub configurations: Vec<Vec<usize>>,
    pub route: Route,
    /// VISOR-TR: token_pack's reduction ratio `rho` between the vision
    /// tower and the projector (`None`: no packing).
    pub pack_ratio: Option<f64>,
}

impl VisorConfig {
    /// The paper's schedule for `model`'s decoder of `L` layers: `L_CA` and
    /// the maximal `L_SA` uniformly placed, `L/3` layers each, stride 3,
    /// disjoint: self-attention at `l = 1 mod 3` (`1, 4, ..., 22` for 24
    /// layers, the layers Appendix A names), cross-attention right after
    /// each, at `l = 2 mod 3` (`2, 5, ..., 23`), so that every refinement
    /// of the visual tokens reaches a cross-attention layer. The
    /// configurations are Appendix A's list (verbatim for 24 layers; for
    /// other depths its layers below `L`, duplicates dropped), chosen by the
    /// router; no packing.
    pub fn for_model(model: &ModelConfig) -> Self {
        let layers = model.text.num_layers;
        let mut configurations: Vec<Vec<usize>> = Vec::new();
        for c in APPENDIX_A {
            let kept: Vec<usize> = c.iter().copied().filter(|&l| l < layers).collect();
            if !configurations.contains(&kept) {
                configurations.push(kept);
            }
        }
        let route = if configurations.len() > 1 {
            Route::Router
        } else {
            Route::Fixed(0)
        };
        VisorConfig {
            cross_attention_layers: (0..layers).filter(|l| l % 3 == 2).collect(),
            configurations,
            route,
            pack_ratio: None,
        }
    }

    /// VISOR-TR: [`VisorConfig::for_model`] with token packing at `rho`.
    pub fn packed(model: &ModelConfig, rho: f64) -> Self {
        VisorConfig {
            pack_ratio: Some(rho),
            ..Self::for_model(model)
        }
    }

    /// This configuration with the configuration `index` for every row.
    pub fn fixed(&self, index: usize) -> Self {
        VisorConfig {
            route: Route::Fixed(index),
            ..self.clone()
        }
    }

    /// `L_SA`: every layer some configuration runs with self-attention.
    pub fn self_attention_layers(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.configurations.concat();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The cost of a configuration: its self-attention layers (each costs
    /// the same: one full layer over the visual and text tokens).
    pub fn cost(&self, index: usize) -> usize {
        self.configurations[index].len()
    }

    /// The costliest configuration (most self-attention layers; ties to the
    /// lower index).
    pub fn costliest(&self) -> usize {
        self.costliest_of(&(0..self.configurations.len()).collect::<Vec<_>>())
    }

    /// The costliest of the given configurations (the multi-question rule;
    /// ties to the lower index). `picks` must not be empty.
    pub fn costliest_of(&self, picks: &[usize]) -> usize {
        picks.iter().copied().fold(picks[0], |best, c| {
            let (cc, cb) = (self.cost(c), self.cost(best));
            if cc > cb || (cc == cb && c < best) {
                c
            } else {
                best
            }
        })
    }

    /// The first layer some configuration runs with self-attention and
    /// another skips, if any.
    pub fn first_skippable(&self) -> Option<usize> {
        self.self_attention_layers()
            .into_iter()
            .find(|l| !self.configurations.iter().all(|c| c.contains(l)))
    }

    /// The router's block: the one before the first skippable
    /// self-attention layer; it reads the routing tokens' hidden states
    /// after this layer. `None` when nothing is skippable.
    pub fn router_layer(&self) -> Option<usize> {
        self.first_skippable().map(|l| l.saturating_sub(1))
    }

    /// What each of a decoder's `layers` does under configuration `index`.
    pub fn kinds(&self, index: usize, layers: usize) -> Vec<LayerKind> {
        let sa = &self.configurations[index];
        (0..layers)
            .map(|l| {
                if sa.contains(&l) {
                    LayerKind::SelfAttention
                } else if self.cross_attention_layers.contains(&l) {
                    LayerKind::CrossAttention
                } else {
                    LayerKind::Text
                }
            })
            .collect()
    }

    /// Checks the settings against `model`: layer sets ascending and inside
    /// the decoder, at least one configuration and no two equal, the fixed
    /// index in range, a router only over two or more configurations whose
    /// first skippable layer has a block before it, and a packing ratio
    /// that leaves the tower's grid at least one token per side.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let layers = model.text.num_layers;
        let ascending = |what: &str, set: &[usize]| -> Result<()> {
            if set.windows(2).any(|w| w[0] >= w[1]) || set.iter().any(|&l| l >= layers) {
                candle_core::bail!(
                    "VisorConfig: {what} {set:?} must be ascending layers of the decoder's {layers}"
                );
            }
            Ok(())
        };
        ascending("cross-attention layers", &self.cross_attention_layers)?;
        if self.configurations.is_empty() {
            candle_core::bail!("VisorConfig: no configuration");
        }
        for (i, c) in self.configurations.iter().enumerate() {
            ascending(&format!("configuration {i}"), c)?;
            if self.configurations[..i].contains(c) {
                candle_core::bail!("VisorConfig: configuration {i} {c:?} is listed twice");
            }
        }
        let n = self.configurations.len();
        match self.route {
            Route::Fixed(i) if i >= n => {
                candle_core::bail!("VisorConfig: fixed configuration {i} of {n}")
            }
            Route::Fixed(_) => {}
            Route::Router if n < 2 => candle_core::bail!(
                "VisorConfig: a router over {n} configuration: nothing to choose (use Route::Fixed(0))"
            ),
            Route::Router => {
                if self.first_skippable() == Some(0) {
                    candle_core::bail!(
                        "VisorConfig: layer 0 is skippable: the router has no block before it"
                    );
                }
            }
        }
        if let Some(rho) = self.pack_ratio {
            let side = model.vision.patches_per_side();
            foveal::token_pack::resized_grid(side, side, rho).map_err(|e| {
                candle_core::Error::msg(format!(
                    "VisorConfig: packing ratio {rho} on a {side} x {side} grid: {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// The settings from a model config's JSON object (the keys of
    /// [`VisorConfig::to_json`]; a missing `routing` is the router, a
    /// missing `token_pack_ratio` no packing).
    pub fn from_json(text: &str) -> Result<Self> {
        use serde_json::Value;
        let bad = |what: &str| candle_core::Error::msg(format!("VisorConfig JSON: {what}"));
        let v: Value = serde_json::from_str(text).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let layers = |x: &Value, what: &str| -> Result<Vec<usize>> {
            x.as_array()
                .ok_or_else(|| bad(&format!("{what} is not a list")))?
                .iter()
                .map(|l| {
                    l.as_u64()
                        .map(|l| l as usize)
                        .ok_or_else(|| bad(&format!("{what}: {l} is not a layer index")))
                })
                .collect()
        };
        let cross_attention_layers = layers(
            v.get("cross_attention_layers")
                .ok_or_else(|| bad("no cross_attention_layers"))?,
            "cross_attention_layers",
        )?;
        let configurations = v
            .get("self_attention_configurations")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no self_attention_configurations list"))?
            .iter()
            .map(|c| layers(c, "a self-attention configuration"))
            .collect::<Result<Vec<_>>>()?;
        let route = match v.get("routing") {
            None => Route::Router,
            Some(Value::String(s)) if s == "router" => Route::Router,
            Some(x) => Route::Fixed(
                x.get("fixed")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("routing is \"router\" or {\"fixed\": index}"))?
                    as usize,
            ),
        };
        let pack_ratio = match v.get("token_pack_ratio") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                x.as_f64()
                    .ok_or_else(|| bad("token_pack_ratio is a number"))?,
            ),
        };
        Ok(VisorConfig {
            cross_attention_layers,
            configurations,
            route,
            pack_ratio,
        })
    }

    /// The settings as a JSON object: `cross_attention_layers`,
    /// `self_attention_configurations`, `routing` (`"router"` or `{"fixed":
    /// i}`), `token_pack_ratio` (a number or null).
    pub fn to_json(&self) -> String {
        let routing = match self.route {
            Route::Router => serde_json::json!("router"),
            Route::Fixed(i) => serde_json::json!({ "fixed": i }),
        };
        serde_json::json!({
            "cross_attention_layers": self.cross_attention_layers,
            "self_attention_configurations": self.configurations,
            "routing": routing,
            "token_pack_ratio": self.pack_ratio,
        })
        .to_string()
    }
}
