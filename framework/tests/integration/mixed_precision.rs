//! Mixed precision (`train.mixed_precision = "bf16"`) against the f32 model it must track.
//!
//! The reference is the same model computing in f32. bf16 keeps 8 significant bits (unit
//! roundoff 2⁻⁸ ≈ 3.9e-3), and a tiny model's logits pass through about ten rounded products
//! and element-wise ops, so they move by about 1e-2 of their norm: the bound is 3e-2. They
//! must also move by more than 1e-4, or the bf16 path was not taken at all (f32 gives 0).

use crate::common;

use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::model::{Llama, ModelConfig};
use strata::nn::lora::LoraConfig;
use strata::train::ids_tensor;
use strata::train::optim::grad_squares_by_path;

type B = Autodiff<Cpu>;

const IDS: [u32; 24] = [
    3, 17, 42, 5, 9, 63, 0, 11, 28, 7, 50, 1, 33, 2, 19, 60, 8, 44, 12, 30, 6, 57, 21, 14,
];

fn tiny(extra: &[(&str, &str)]) -> ModelConfig {
    let mut table: toml::Table = toml::from_str(
        "vocab_size = 64\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\n\
         ffn_hidden = 48\nmax_seq_len = 32\ntie_embeddings = false\ninit_std = 0.1\n",
    )
    .unwrap();
    for (key, value) in extra {
        let value: toml::Table = toml::from_str(&format!("v = {value}")).unwrap();
        table.insert(key.to_string(), value["v"].clone());
    }
    let config: ModelConfig = table.try_into().unwrap();
    config.validate("model.").unwrap();
    config
}

/// ‖a − b‖ / ‖b‖.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// Logits and the gradient of their mean square with respect to every parameter (sum of
/// squares and sum of each gradient, by path).
fn run(model: &Llama<B>) -> (Vec<f32>, Vec<(String, f64)>) {
    let device = Default::default();
    let logits = model.forward(ids_tensor(&IDS, [1, IDS.len()], &device));
    // In the compute type, as autocast gives them; the loss reads them in f32.
    let compute = model.compute_dtype.map_or(DType::F32, Into::into);
    assert_eq!(
        logits.dtype(),
        compute,
        "logits come back in the compute type"
    );
    let logits = logits.cast(DType::F32);
    let values = logits
        .clone()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let grads = GradientsParams::from_grads(logits.square().mean().backward(), model);
    let squares = grad_squares_by_path(model, &grads)
        .into_iter()
        .map(|(path, (sum, _))| (path, sum))
        .collect();
    (values, squares)
}

#[test]
fn bf16_compute_tracks_f32_in_every_variant() {
    let variants: [(&str, Vec<(&str, &str)>); 6] = [
        ("dense", vec![]),
        ("tied", vec![("tie_embeddings", "true")]),
        (
            "coord3d+kv_share",
            vec![
                ("attention", "\"coord3d\""),
                ("coord3d_block_len", "4"),
                ("coord3d_window", "2"),
                ("kv_share", "2"),
            ],
        ),
        (
            "seq_block",
            vec![
                ("attention", "\"seq_block\""),
                ("seq_block_len", "8"),
                ("seq_block_summaries", "2"),
            ],
        ),
        (
            "attnres_block",
            vec![("residual", "\"attnres_block\""), ("attnres_blocks", "2")],
        ),
        ("rescaled", vec![("residual", "\"rescaled\"")]),
    ];
    let device = Default::default();
    for (name, extra) in variants {
        B::seed(&device, 11);
        let model: Llama<B> = tiny(&extra).init(&device);
        // AttnRes queries start at zero (uniform depth weights); give them values so that the
        // depth softmax is exercised.
        let model = perturb_zero_params(model);
        check(name, &model);
    }
    // LoRA adapters (B random so that they contribute) on a frozen base.
    B::seed(&device, 12);
    let base: Llama<B> = tiny(&[]).init(&device);
    let lora = base
        .with_lora(&LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        })
        .unwrap();
    check("lora", &perturb_zero_params(lora));
}

fn check(name: &str, model: &Llama<B>) {
    check_in(name, model, FloatDType::BF16, 1e-4, 3e-2, 6e-2);
    // f16 keeps 11 significant bits (unit roundoff 4.9e-4): bounds an eighth of bf16's.
    check_in(name, model, FloatDType::F16, 1e-5, 4e-3, 8e-3);
}

/// `model` computing in `dtype` against itself in f32: the logits move by a share of their
/// norm within `least..most`, and each parameter's gradient norm by at most `grad_tolerance`.
fn check_in(
    name: &str,
    model: &Llama<B>,
    dtype: FloatDType,
    least: f64,
    most: f64,
    grad_tolerance: f64,
) {
    let name = format!("{name} {dtype:?}");
    let (want, want_grads) = run(model);
    let mixed = model.clone().with_compute_dtype(Some(dtype));
    let (got, got_grads) = run(&mixed);
    let error = relative(&got, &want);
    eprintln!("{name}: ‖Δlogits‖/‖logits‖ = {error:.2e}");
    assert!(
        (least..most).contains(&error),
        "{name}: logits moved by {error:.2e} of their norm"
    );
    // Parameters stay f32; so do their gradients (the optimizer reads them).
    assert_eq!(mixed.blocks[0].mlp.w_up.weight.val().dtype(), DType::F32);
    assert_eq!(
        got_grads.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        want_grads.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        "{name}: the same parameters receive gradients"
    );
    // Gradient norms per parameter: a product of several rounded factors, so twice the bound.
    for ((path, got), (_, want)) in got_grads.iter().zip(&want_grads) {
        let (g, w) = (got.sqrt(), want.sqrt());
        assert!(
            (g - w).abs() <= grad_tolerance * w + 1e-12,
            "{name}: ‖∂/∂{path}‖ = {g:.4e} mixed, {w:.4e} in f32"
        );
    }
}

/// Replaces parameters that are all zero (AttnRes queries, LoRA's B) by small values drawn
/// from a fixed stream, so that every path carries signal. Small (±0.05), as trained adapters
/// are: with ±0.3 LoRA's scaled update dominates each projection and the network amplifies
/// rounding more (3.1e-2 measured, against 6.6e-3 at ±0.05).
fn perturb_zero_params(model: Llama<B>) -> Llama<B> {
    struct Fill(u64);
    impl burn::module::ModuleMapper<B> for Fill {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let zero = tensor.clone().abs().max().into_scalar() == 0.0;
            let tensor = if zero {
                self.0 += 1;
                let shape = tensor.shape();
                let mut draw = common::uniform(self.0);
                let values: Vec<f32> = (0..shape.num_elements()).map(|_| 0.05 * draw()).collect();
                let fresh =
                    Tensor::<B, D>::from_data(TensorData::new(values, shape), &tensor.device());
                if tensor.is_require_grad() {
                    fresh.require_grad()
                } else {
                    fresh
                }
            } else {
                tensor
            };
            burn::module::Param::from_mapped_value(id, tensor, mapper)
        }
    }
    model.map(&mut Fill(0x5eed))
}

fn config(test: &str, mixed: &str, seed: u64) -> ExperimentConfig {
    let toml = format!(
        r#"
name = "mixed"
[model]
vocab_size = 259
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 128
max_seq_len = 64
[data]
path = "{}"
validation = ["doc3.txt"]
[train]
seed = {seed}
batch_size = 8
seq_len = 64
max_steps = 300
warmup_steps = 20
lr = 3e-3
log_interval = 10
eval_interval = 50
eval_batches = 4
checkpoint_interval = 300
sample_tokens = 0
mixed_precision = "{mixed}"
"#,
        common::text_corpus(test).display()
    );
    ExperimentConfig::from_toml(&toml, &[]).unwrap()
}

/// The training loss at every logged step of a run (the mean over the steps since the last).
fn loss_curve(test: &str, mixed: &str, seed: u64) -> (Vec<f64>, Llama<Cpu>) {
    let (losses, model, _) =
        common::train_logged(&config(test, mixed, seed), &format!("mixed-{mixed}-{seed}"));
    (losses, model)
}

/// The mean of the last five logged losses (the last 50 steps).
fn tail(curve: &[f64]) -> f64 {
    curve[curve.len() - 5..].iter().sum::<f64>() / 5.0
}

/// 300 steps of a small model on real text: the bf16- and f16-compute runs' training loss
/// follows the f32 run of the same seed within the spread between two f32 seeds, and their
/// weights stay f32.
#[test]
fn mixed_training_follows_the_f32_loss_curve() {
    let (f32_a, _) = loss_curve("curve", "none", 1);
    let (f32_b, _) = loss_curve("curve", "none", 2);
    assert!(
        tail(&f32_a) < f32_a[0] - 1.0,
        "the f32 run learns: {f32_a:?}"
    );
    let seed_spread = (tail(&f32_a) - tail(&f32_b)).abs();
    for mixed in ["bf16", "f16"] {
        let (mixed_a, model) = loss_curve("curve", mixed, 1);
        assert_eq!(model.norm.gamma.val().dtype(), DType::F32);
        assert_eq!(f32_a.len(), mixed_a.len());
        for (i, ((a, b), m)) in f32_a.iter().zip(&f32_b).zip(&mixed_a).enumerate() {
            eprintln!("log {i}: f32 seed 1 {a:.4}, f32 seed 2 {b:.4}, {mixed} seed 1 {m:.4}");
        }
        let gap = (tail(&f32_a) - tail(&mixed_a)).abs();
        assert!(
            gap <= seed_spread.max(0.05),
            "final training loss: f32 {:.4}, {mixed} {:.4} (seed spread {seed_spread:.4})",
            tail(&f32_a),
            tail(&mixed_a)
        );
    }
}

/// An initial loss scale far too large for f16 (2³⁰; f16 ends at 65504): the first steps'
/// gradients overflow, each is skipped and halves the scale, and once they fit the run trains.
#[test]
fn f16_loss_scaling_skips_overflowing_steps_and_recovers() {
    let mut config = config("overflow", "f16", 1);
    config.train.loss_scale = 2f64.powi(30);
    config.train.max_steps = 60;
    let (losses, _, summary) = common::train_logged(&config, "mixed-overflow");
    let scaler = summary
        .loss_scale
        .expect("f16 runs report their loss scale");
    eprintln!("{scaler:?}, losses {losses:?}");
    assert!(
        scaler.skipped_steps >= 5 && scaler.scale < 2f64.powi(25),
        "{scaler:?}"
    );
    assert_eq!(scaler.scale, 2f64.powi(30 - scaler.skipped_steps as i32));
    assert!(
        summary.final_train_loss < losses[0] - 0.5,
        "the run trains after the skips: {losses:?}"
    );
}

#[test]
fn loss_scale_halves_on_overflow_and_doubles_after_a_clean_stretch() {
    use strata::train::LossScale;
    let mut scaler = LossScale::new(1024.0);
    assert!(!scaler.update(false));
    assert_eq!((scaler.scale, scaler.skipped_steps), (512.0, 1));
    for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
        assert!(scaler.update(true));
    }
    assert_eq!(scaler.scale, 512.0);
    assert!(scaler.update(true));
    assert_eq!((scaler.scale, scaler.good_steps), (1024.0, 0));
    // An overflow restarts the clean stretch.
    scaler.update(true);
    scaler.update(false);
    assert_eq!(
        (scaler.scale, scaler.good_steps, scaler.skipped_steps),
        (512.0, 0, 2)
    );
}

#[test]
fn bf16_compute_on_wgpu_is_refused_by_name() {
    use strata::train::MixedPrecision;
    let error = MixedPrecision::Bf16.check_backend("wgpu-f32").unwrap_err();
    assert!(
        error.to_string().contains("train.mixed_precision"),
        "{error}"
    );
    MixedPrecision::Bf16.check_backend("cuda-f32").unwrap();
    MixedPrecision::None.check_backend("wgpu-f32").unwrap();
}
