//! LoRA (Hu et al., arXiv 2106.09685): a frozen weight W plus a trained low-rank update,
//! `y = x·W + s · dropout(x)·A·B` with A `[d_in, r]`, B `[r, d_out]` and s = α/r (rsLoRA,
//! arXiv 2312.03732: α/√r). B starts at zero, so an adapter that has not trained yet changes
//! nothing.
//!
//! Every projection of the decoder is a [`LoraLinear`]; without an adapter it is a plain
//! bias-free linear layer whose weight keeps the path Burn's `Linear` gives (`….wq.weight`).

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::cast_to;
use crate::nn::fused::linear::linear;

/// The projections an adapter can attach to, by the short names configs use. PEFT's module names
/// (`q_proj`, …, `lm_head`) are accepted too.
pub const TARGETS: [&str; 8] = ["q", "k", "v", "o", "gate", "up", "down", "lm_head"];

/// PEFT's module name for one of [`TARGETS`].
pub fn peft_module_name(target: &str) -> &'static str {
    match target {
        "q" => "q_proj",
        "k" => "k_proj",
        "v" => "v_proj",
        "o" => "o_proj",
        "gate" => "gate_proj",
        "up" => "up_proj",
        "down" => "down_proj",
        _ => "lm_head",
    }
}

/// The short name of a target written either way (`q` or `q_proj`).
pub fn canonical_target(name: &str) -> Option<&'static str> {
    TARGETS
        .iter()
        .find(|t| **t == name || peft_module_name(t) == name)
        .copied()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Projections that get an adapter: any of q, k, v, o, gate, up, down, lm_head.
    pub targets: Vec<String>,
    /// Scale by α/√r instead of α/r.
    pub rslora: bool,
    /// Storage of the frozen projection weights: `f32`, or `bf16` / `f16` to halve their
    /// memory (each is cast to the activations' type where it is used; adapters stay in the
    /// model's type).
    pub base_dtype: BaseDType,
}

/// How a LoRA run stores its frozen projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BaseDType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl BaseDType {
    pub fn float_dtype(self) -> FloatDType {
        match self {
            BaseDType::F32 => FloatDType::F32,
            BaseDType::Bf16 => FloatDType::BF16,
            BaseDType::F16 => FloatDType::F16,
        }
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
            rslora: false,
            base_dtype: BaseDType::F32,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let key = |k: &str| format!("{prefix}{k}");
        if self.rank == 0 {
            return Err(Error::config(key("rank"), 0, "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::config(
                key("alpha"),
                self.alpha,
                "must be a positive number",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                key("dropout"),
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::config(
                key("targets"),
                "[]",
                format!("at least one of {TARGETS:?}"),
            ));
        }
        for target in &self.targets {
            if canonical_target(target).is_none() {
                return Err(Error::config(
                    key("targets"),
                    format!("{target:?}"),
                    format!("names from {TARGETS:?} (or PEFT's q_proj, …, down_proj)"),
                ));
            }
        }
        Ok(())
    }

    /// s in `y = x·W + s·x·A·B`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether projection `target` (a short name from [`TARGETS`]) gets an adapter.
    pub fn targets(&self, target: &str) -> bool {
        self.targets
            .iter()
            .any(|t| canonical_target(t) == Some(target))
    }
}

/// The low-rank update of one projection.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[d_in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[r, d_out]`.
    pub b: Param<Tensor<B, 2>>,
    pub dropout: Dropout,
    #[module(skip)]
    pub scale: f64,
    /// Folded into the base weight: the forward pass must not add it again.
    #[module(skip)]
    pub merged: bool,
}

impl<B: Backend> Lora<B> {
    /// A as PEFT initialises it (Kaiming-uniform with a = √5, i.e. U(±1/√d_in)), B zero.
    pub fn new(d_in: usize, d_out: usize, config: &LoraConfig, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Initializer::Uniform {
            min: -bound,
            max: bound,
        }
        .init([d_in, config.rank], device);
        let b = Initializer::Zeros.init([config.rank, d_out], device);
        Self {
            a,
            b,
            dropout: DropoutConfig::new(config.dropout).init(),
            scale: config.scale(),
            merged: false,
        }
    }

    /// s·A·B, the update in the base weight's `[d_in, d_out]` layout.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// A bias-free linear layer, weight `[d_in, d_out]`, with an optional adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> LoraLinear<B> {
    pub fn new(d_in: usize, d_out: usize, init: &Initializer, device: &B::Device) -> Self {
        Self {
            weight: init.init_with([d_in, d_out], Some(d_in), Some(d_out), device),
            lora: None,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // One matrix of rows: given `[batch, seq, d_in]`, Burn's linear backward computes the
        // weight gradient as one product per batch entry and sums them, a pass over
        // `batch × d_in × d_out` values, where `[rows, d_in]` gives one product.
        let mut shape = x.dims();
        let x: Tensor<B, 2> = x.reshape([-1, shape[D - 1] as i64]);
        let out = self.forward_rows(x);
        shape[D - 1] = out.dims()[1];
        out.reshape(shape)
    }

    fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // A base weight stored in a narrower type (`lora.base_dtype`) is widened where it is used.
        // So is any weight under mixed precision (`train.mixed_precision`).
        let weight = cast_to(self.weight.val(), x.dtype());
        let base = linear(x.clone(), weight);
        match &self.lora {
            Some(lora) if !lora.merged => {
                let dtype = x.dtype();
                let low = linear(lora.dropout.forward(x), cast_to(lora.a.val(), dtype));
                base + linear(low, cast_to(lora.b.val(), dtype)).mul_scalar(lora.scale)
            }
            _ => base,
        }
    }

    /// Attaches a fresh adapter (replacing any).
    pub fn with_lora(mut self, config: &LoraConfig) -> Self {
        let [d_in, d_out] = self.weight.val().dims();
        let device = self.weight.val().device();
        self.lora = Some(Lora::new(d_in, d_out, config, &device));
        self
    }

    /// Stores the weight in `dtype` (see [`LoraConfig::base_dtype`]); gradient tracking is kept.
    pub fn with_weight_dtype(mut self, dtype: FloatDType) -> Self {
        self.weight = keep_grad(self.weight, |w| w.cast(dtype));
        self
    }

    /// W ← W + s·A·B; the adapter stays (marked merged) so that [`Self::unmerge`] can undo it.
    pub fn merge(self) -> Self {
        self.fold(1.0, true)
    }

    /// W ← W − s·A·B: the inverse of [`Self::merge`] up to rounding.
    pub fn unmerge(self) -> Self {
        self.fold(-1.0, false)
    }

    fn fold(mut self, sign: f64, merged: bool) -> Self {
        let Some(lora) = self.lora.as_mut() else {
            return self;
        };
        if lora.merged == merged {
            return self;
        }
        lora.merged = merged;
        let delta = lora.delta().mul_scalar(sign);
        // A narrower base weight is widened to the adapter's type first: merged weights keep
        // the adapter's precision.
        self.weight = keep_grad(self.weight, |w| w.cast(delta.dtype()) + delta);
        self
    }

    /// The merged weight alone, adapter dropped: a plain linear layer for export.
    pub fn merged_plain(self) -> Self {
        let mut merged = self.merge();
        merged.lora = None;
        merged
    }
}

/// Replaces a parameter's value by `f(value)`, keeping whether it tracks gradients (a new
/// tensor would not).
fn keep_grad<B: Backend>(
    param: Param<Tensor<B, 2>>,
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Param<Tensor<B, 2>> {
    param.map(|w| {
        let require_grad = w.is_require_grad();
        let w = f(w);
        if require_grad { w.require_grad() } else { w }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    fn sample(seed: u64, shape: [usize; 2]) -> Tensor<B, 2> {
        let mut state = seed;
        let values: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn layer_with_trained_adapter() -> LoraLinear<B> {
        let device = Default::default();
        let config = LoraConfig {
            rank: 3,
            alpha: 6.0,
            ..Default::default()
        };
        let mut layer = LoraLinear::<B>::new(
            8,
            5,
            &Initializer::Normal {
                mean: 0.0,
                std: 0.3,
            },
            &device,
        )
        .with_lora(&config);
        let lora = layer.lora.as_mut().unwrap();
        lora.b = Param::from_tensor(sample(3, [3, 5]));
        layer
    }

    /// The forward pass against the formula evaluated in f64 on the host.
    #[test]
    fn forward_is_base_plus_scaled_low_rank_product() {
        let layer = layer_with_trained_adapter();
        let x = sample(9, [4, 8]);
        let got: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
        let host = |t: Tensor<B, 2>| -> Vec<f64> {
            t.into_data()
                .to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let (xs, w) = (host(x), host(layer.weight.val()));
        let lora = layer.lora.as_ref().unwrap();
        let (a, b) = (host(lora.a.val()), host(lora.b.val()));
        for row in 0..4 {
            for col in 0..5 {
                let base: f64 = (0..8).map(|i| xs[row * 8 + i] * w[i * 5 + col]).sum();
                let low: f64 = (0..3)
                    .map(|r| {
                        (0..8).map(|i| xs[row * 8 + i] * a[i * 3 + r]).sum::<f64>() * b[r * 5 + col]
                    })
                    .sum();
                let want = base + 2.0 * low;
                let have = f64::from(got[row * 5 + col]);
                assert!((have - want).abs() < 1e-5, "{have} vs {want}");
            }
        }
    }

    #[test]
    fn a_fresh_adapter_changes_nothing() {
        let layer = layer_with_trained_adapter();
        let plain = LoraLinear {
            weight: layer.weight.clone(),
            lora: None,
        };
        let fresh = plain.clone().with_lora(&LoraConfig::default());
        let x = sample(5, [2, 8]);
        fresh
            .forward(x.clone())
            .into_data()
            .assert_eq(&plain.forward(x).into_data(), true);
    }

    #[test]
    fn merge_keeps_outputs_and_unmerge_restores_the_weight() {
        let layer = layer_with_trained_adapter();
        let x = sample(7, [3, 8]);
        let before = layer.forward(x.clone());
        let w0 = layer.weight.val();
        let merged = layer.merge();
        before
            .clone()
            .into_data()
            .assert_approx_eq::<f32>(&merged.forward(x.clone()).into_data(), Default::default());
        let merged = merged.merge(); // merging twice is a no-op
        let restored = merged.unmerge();
        w0.into_data().assert_approx_eq::<f32>(
            &restored.weight.val().into_data(),
            burn::tensor::Tolerance::absolute(1e-6),
        );
        before
            .into_data()
            .assert_approx_eq::<f32>(&restored.forward(x).into_data(), Default::default());
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = LoraConfig {
            targets: vec!["qkv".into()],
            ..Default::default()
        };
        let e = bad.validate("lora.").unwrap_err().to_string();
        assert!(e.contains("lora.targets") && e.contains("qkv"), "{e}");
        let e = LoraConfig {
            rank: 0,
            ..Default::default()
        }
        .validate("lora.")
        .unwrap_err()
        .to_string();
        assert!(e.contains("lora.rank"), "{e}");
        assert!(
            LoraConfig {
                targets: vec!["q_proj".into(), "down".into()],
                ..Default::default()
            }
            .validate("lora.")
            .is_ok()
        );
    }
}
