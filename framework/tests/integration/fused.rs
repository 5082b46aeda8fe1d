//! The ops with their own backward pass (`strata::nn::fused`) against the same maths composed
//! of tensor ops, whose gradients Burn's autodiff derives op by op: causal attention against
//! Burn's `attention` (outputs, gradients of q, k and v), rotary embeddings against
//! rotate-half written with slices, RMSNorm against `burn::nn::RmsNorm`, the SwiGLU gate
//! against `silu(gate) · up`, and the cross-entropy loss against log-softmax and gather.
//!
//! Tolerance 1e-5 of the largest entry: f32 throughout, sums over at most a few dozen keys
//! taken in a different order (observed differences are ~1e-7). The host loops work in blocks
//! of 32 query rows: the lengths cover one block, several, a partial last one and queries that
//! start after the first key.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use strata::backend::{Cpu, NdArray};
use strata::nn::attention::{dense_causal, dense_causal_in_passes};
use strata::nn::fused::attention::{device, host};
use strata::nn::fused::loss::cross_entropy_trained;
use strata::nn::fused::norm::rms_norm;
use strata::nn::fused::rope::rotate_trained;
use strata::nn::fused::swiglu::swiglu;

use crate::common::{assert_close, random, values as host_values};

/// Output and the gradients of q, k, v of `sum(attend(q, k, v) ∘ w)` for a fixed random `w`.
fn run<B: AutodiffBackend>(
    q_len: usize,
    kv_len: usize,
    attend: fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Vec<Vec<f32>> {
    let (b, h, d) = (2, 3, 20); // d = 20: the dot product's 8-wide chunks and its tail
    let q = random::<B, 4>(1, [b, h, q_len, d]).require_grad();
    let k = random::<B, 4>(2, [b, h, kv_len, d]).require_grad();
    let v = random::<B, 4>(3, [b, h, kv_len, d]).require_grad();
    let w = random::<B, 4>(4, [b, h, q_len, d]);
    let out = attend(q.clone(), k.clone(), v.clone());
    let grads = (out.clone() * w).sum().backward();
    let mut all = vec![host_values(out)];
    for x in [q, k, v] {
        all.push(host_values(x.grad(&grads).expect("a gradient")));
    }
    all
}

fn composed<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    dense_causal_in_passes(q, k, v, usize::MAX)
}

const NAMES: [&str; 4] = ["out", "dq", "dk", "dv"];

#[test]
fn fused_matches_composed_attention_on_the_cpu_backends() {
    for (q_len, kv_len) in [(37, 37), (5, 37), (1, 9), (70, 90)] {
        let want = run::<Autodiff<Cpu>>(q_len, kv_len, composed);
        let got = run::<Autodiff<Cpu>>(q_len, kv_len, dense_causal);
        assert_close(&NAMES, &got, &want, 1e-5);
        let got = run::<Autodiff<NdArray>>(q_len, kv_len, dense_causal);
        assert_close(&NAMES, &got, &want, 1e-5);
    }
}

/// The tensor-op form the GPU backends take, run on the CPU in several passes of queries,
/// against the fused host loops: output, log-sum-exp and the three gradients.
#[test]
fn tensor_op_form_in_passes_matches_the_host_loops() {
    let (b, h, d) = (2, 2, 16);
    for (q_len, kv_len) in [(29, 29), (7, 29)] {
        let q = random::<Cpu, 4>(5, [b, h, q_len, d]);
        let k = random::<Cpu, 4>(6, [b, h, kv_len, d]);
        let v = random::<Cpu, 4>(7, [b, h, kv_len, d]);
        let dout = random::<Cpu, 4>(8, [b, h, q_len, d]);
        // 2·2·29·3 scores: passes of three query rows, the last one shorter.
        let max_scores = b * h * kv_len * 3;
        let (out_h, lse_h) = host::forward(q.clone(), k.clone(), v.clone());
        let (out_d, lse_d) = device::forward(q.clone(), k.clone(), v.clone(), max_scores, 1);
        let (dq_h, dk_h, dv_h) = host::backward(
            q.clone(),
            k.clone(),
            v.clone(),
            out_h.clone(),
            lse_h.clone(),
            dout.clone(),
        );
        let (dq_d, dk_d, dv_d) =
            device::backward(q, k, v, out_d.clone(), lse_d.clone(), dout, max_scores, 1);
        let host_all = [
            host_values(out_h),
            host_values(lse_h),
            host_values(dq_h),
            host_values(dk_h),
            host_values(dv_h),
        ];
        let device_all = [
            host_values(out_d),
            host_values(lse_d),
            host_values(dq_d),
            host_values(dk_d),
            host_values(dv_d),
        ];
        assert_close(
            &["out", "lse", "dq", "dk", "dv"],
            &device_all,
            &host_all,
            1e-5,
        );
    }
}

/// rotate_half(x) ∘ sin + x ∘ cos with slices, as HF Llama writes it.
fn rope_composed<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let (x1, x2) = (
        x.clone().narrow(3, 0, half),
        x.clone().narrow(3, half, half),
    );
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[test]
fn fused_rope_matches_the_composed_rotation() {
    type AD = Autodiff<Cpu>;
    let (b, seq, heads, d) = (3, 11, 2, 12);
    // Tables shared by the batch (text) and one per sequence (3-D coordinates).
    for table_batch in [1, b] {
        let run = |fused: bool| {
            let x = random::<AD, 4>(9, [b, seq, heads, d]).require_grad();
            let angle = random::<AD, 4>(10, [table_batch, seq, 1, d]).mul_scalar(3.0);
            let (cos, sin) = (angle.clone().cos(), angle.sin());
            let w = random::<AD, 4>(11, [b, seq, heads, d]);
            let out = if fused {
                match rotate_trained(x.clone(), cos, sin) {
                    Ok(out) => out,
                    Err(_) => panic!("Autodiff<Cpu> takes the op"),
                }
            } else {
                rope_composed(x.clone(), cos, sin)
            };
            let grads = (out.clone() * w).sum().backward();
            vec![
                host_values(out),
                host_values(x.grad(&grads).expect("a gradient")),
            ]
        };
        assert_close(&["out", "dx"], &run(true), &run(false), 1e-6);
    }
}

type Ad = Autodiff<Cpu>;

/// Output and input gradients of `sum(op(a, b) ∘ w)` for a fixed random `w`.
fn two_input_grads(
    shape: [usize; 3],
    op: impl Fn(Tensor<Ad, 3>, Tensor<Ad, 3>) -> Tensor<Ad, 3>,
) -> Vec<Vec<f32>> {
    // Gates in (−4, 4): the sigmoid's curved part and both tails.
    let a = (random::<Ad, 3>(11, shape) * 4.0).require_grad();
    let b = random::<Ad, 3>(12, shape).require_grad();
    let w = random::<Ad, 3>(13, shape);
    let out = op(a.clone(), b.clone());
    let grads = (out.clone() * w).sum().backward();
    vec![
        host_values(out),
        host_values(a.grad(&grads).expect("a gradient")),
        host_values(b.grad(&grads).expect("a gradient")),
    ]
}

/// Tolerance 1e-5 of the largest entry: f32, the same formulas, a different exp (a polynomial
/// within 2e-7 of e^x against libm's).
#[test]
fn fused_swiglu_matches_the_composed_gate() {
    use burn::tensor::activation::silu;
    // 2·5·37 elements: one task and vector tails; 2·100·200 = 40 000: three tasks.
    for shape in [[2, 5, 37], [2, 100, 200]] {
        let want = two_input_grads(shape, |g, u| silu(g) * u);
        let got = two_input_grads(shape, swiglu);
        assert_close(&["out", "d_gate", "d_up"], &got, &want, 1e-5);
    }
}

#[test]
fn fused_rms_norm_matches_burns_rms_norm() {
    use burn::module::Param;
    use burn::nn::RmsNormConfig;
    // 3·300 rows of 40: three tasks of 409 rows at most, so dγ is summed across tasks.
    let shape = [3, 300, 40];
    let run = |fused: bool| {
        let mut norm = RmsNormConfig::new(40).init::<Ad>(&Default::default());
        norm.gamma = Param::from_tensor(random::<Ad, 1>(21, [40]) + 1.0);
        let x = (random::<Ad, 3>(22, shape) * 3.0).require_grad();
        let w = random::<Ad, 3>(23, shape);
        let out = if fused {
            rms_norm(&norm, x.clone())
        } else {
            norm.forward(x.clone())
        };
        let grads = (out.clone() * w).sum().backward();
        vec![
            host_values(out),
            host_values(x.grad(&grads).expect("a gradient")),
            host_values(norm.gamma.val().grad(&grads).expect("a gradient")),
        ]
    };
    assert_close(&["out", "dx", "d_gamma"], &run(true), &run(false), 1e-5);
}

#[test]
fn fused_cross_entropy_matches_log_softmax_and_gather() {
    // 150 rows of 259 logits: three tasks of 63 rows at most.
    let (rows, vocab) = (150, 259);
    let targets: Vec<i64> = (0..rows as i64)
        .map(|i| (i * 37 + 11) % vocab as i64)
        .collect();
    let mask: Vec<f32> = (0..rows).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let run = |fused: bool, masked: bool| {
        let device = Default::default();
        let logits = (random::<Ad, 2>(31, [rows, vocab]) * 5.0).require_grad();
        let t = Tensor::<Ad, 1, Int>::from_data(TensorData::new(targets.clone(), [rows]), &device);
        let m = Tensor::<Ad, 1>::from_data(TensorData::new(mask.clone(), [rows]), &device);
        let loss = if fused {
            let inputs = (logits.clone(), t, masked.then_some(m));
            cross_entropy_trained(inputs).unwrap_or_else(|_| panic!("the fused op runs"))
        } else {
            let picked = burn::tensor::activation::log_softmax(logits.clone(), 1)
                .gather(1, t.reshape([rows, 1]))
                .reshape([rows]);
            if masked {
                -(picked * m.clone()).sum() / m.sum()
            } else {
                -picked.mean()
            }
        };
        let grads = loss.clone().backward();
        vec![
            host_values(loss),
            host_values(logits.grad(&grads).expect("a gradient")),
        ]
    };
    for masked in [false, true] {
        assert_close(
            &["loss", "d_logits"],
            &run(true, masked),
            &run(false, masked),
            1e-5,
        );
    }
}

/// Tolerance 1e-5 of the largest entry: the same products, summed by the same kernels in other
/// blockings.
#[test]
fn fused_linear_matches_burns_linear() {
    use strata::nn::fused::linear::linear;
    // Rows as they lie, and a transposed view (not contiguous: the op copies it to rows).
    for transposed_input in [false, true] {
        let run = |fused: bool| {
            let shape = if transposed_input {
                [40, 300]
            } else {
                [300, 40]
            };
            let x = random::<Ad, 2>(41, shape).require_grad();
            let w = random::<Ad, 2>(42, [40, 24]).require_grad();
            let out_weights = random::<Ad, 2>(43, [300, 24]);
            let input = if transposed_input {
                x.clone().transpose()
            } else {
                x.clone()
            };
            let y = if fused {
                linear(input, w.clone())
            } else {
                burn::tensor::module::linear(input, w.clone(), None)
            };
            let grads = (y.clone() * out_weights).sum().backward();
            vec![
                host_values(y),
                host_values(x.grad(&grads).expect("a gradient")),
                host_values(w.grad(&grads).expect("a gradient")),
            ]
        };
        assert_close(&["y", "dx", "dw"], &run(true), &run(false), 1e-5);
    }
}
