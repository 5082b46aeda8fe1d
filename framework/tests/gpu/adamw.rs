//! The one-launch AdamW update on a GPU backend: against a naive f64 update on the host, at a
//! length past the kernel's grid (so units stride over several elements), and inside
//! `train::optim::AdamW` against the same optimizer's tensor-op update (`STRATA_FUSED_ADAMW=0`).
//!
//! Tolerance 1e-5 of the largest entry: the kernel computes in f32 in another order than the
//! reference (differences ~1e-7 of the entries).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use strata::nn::fused::kernel::{AdamWStep, adamw};
use strata::train::optim::{AdamW, AdamWConfig};

use crate::common::{assert_close, random, values};

/// `[p, m, v]` after one update, in f64.
fn naive(p: &[f32], g: &[f32], m: &[f32], v: &[f32], s: &AdamWStep) -> [Vec<f32>; 3] {
    let f = |x: f32| x as f64;
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..p.len() {
        let g = f(g[i]) * f(s.grad_scale);
        let m = f(s.beta1) * f(m[i]) + (1.0 - f(s.beta1)) * g;
        let v = f(s.beta2) * f(v[i]) + (1.0 - f(s.beta2)) * g * g;
        let (m_hat, v_hat) = (m / f(s.bias_correction1), v / f(s.bias_correction2));
        let p = f(p[i]) * (1.0 - f(s.lr) * f(s.weight_decay))
            - f(s.lr) * m_hat / (v_hat.sqrt() + f(s.eps));
        out[0].push(p as f32);
        out[1].push(m as f32);
        out[2].push(v as f32);
    }
    out
}

fn kernel_matches_a_naive_update<B: Backend>() {
    let step = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 0.5,
        bias_correction1: 1.0 - 0.9f32.powi(3),
        bias_correction2: 1.0 - 0.95f32.powi(3),
    };
    // 65 535 cubes of 256 units cover 16 777 216 elements; the second length needs a stride.
    for n in [1001, 65_535 * 256 + 1001] {
        let [p, g, m] = [31, 32, 33].map(|seed| random::<B, 1>(seed, [n]));
        let v = random::<B, 1>(34, [n]).abs();
        let want = naive(
            &values(p.clone()),
            &values(g.clone()),
            &values(m.clone()),
            &values(v.clone()),
            &step,
        );
        let got = adamw([p, g, m, v], step).unwrap_or_else(|_| panic!("the kernel ran"));
        assert_close(&["p", "m", "v"], &got.map(values), &want, 1e-5);
    }
}

/// Three steps of AdamW on a linear layer (a decayed matrix, an undecayed bias), with the
/// kernel and with the tensor-op update.
fn optimizer_steps<G: AutodiffBackend>(fused: bool) -> Vec<Vec<f32>> {
    // SAFETY: tests run one at a time (.cargo/config.toml sets RUST_TEST_THREADS=1), so no
    // other thread reads the environment meanwhile.
    unsafe { std::env::set_var("STRATA_FUSED_ADAMW", if fused { "1" } else { "0" }) };
    let device = Default::default();
    let mut layer: Linear<G> = LinearConfig::new(24, 40).init(&device);
    layer = layer.load_record(
        Linear {
            weight: burn::module::Param::from_tensor(random::<G, 2>(41, [24, 40])),
            bias: Some(burn::module::Param::from_tensor(random::<G, 1>(42, [40]))),
        }
        .into_record(),
    );
    let mut optim = AdamW::<G::InnerBackend>::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        decay_embeddings: false,
        decay_vectors: false,
    });
    for step in 0..3 {
        let x = random::<G, 2>(43 + step, [16, 24]);
        let loss = layer.forward(x).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(1e-2, layer, grads, 0.8);
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var("STRATA_FUSED_ADAMW") };
    let bias = layer.bias.expect("a bias").val();
    vec![values(layer.weight.val()), values(bias)]
}

fn optimizer_matches_the_tensor_ops<G: AutodiffBackend>() {
    let (fused, tensor_ops) = (optimizer_steps::<G>(true), optimizer_steps::<G>(false));
    assert_close(&["weight", "bias"], &fused, &tensor_ops, 1e-5);
}

#[cfg(feature = "wgpu")]
#[test]
fn fused_adamw_on_wgpu_matches_a_naive_update() {
    use strata::backend::Wgpu;
    kernel_matches_a_naive_update::<Wgpu>();
    optimizer_matches_the_tensor_ops::<burn::backend::Autodiff<Wgpu>>();
}

#[cfg(feature = "cuda")]
#[test]
fn fused_adamw_on_cuda_matches_a_naive_update() {
    use strata::backend::Cuda;
    kernel_matches_a_naive_update::<Cuda>();
    optimizer_matches_the_tensor_ops::<burn::backend::Autodiff<Cuda>>();
}
