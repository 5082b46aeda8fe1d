//! The ops with their own backward pass (`strata::nn::fused`) against the same maths composed
//! of tensor ops, whose gradients Burn's autodiff derives op by op: causal attention against
//! Burn's `attention` (outputs, gradients of q, k and v), rotary embeddings against
//! rotate-half written with slices.
//!
//! Tolerance 1e-5 of the largest entry: f32 throughout, sums over at most a few dozen keys
//! taken in a different order (observed differences are ~1e-7).

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use strata::backend::{Cpu, NdArray};
use strata::nn::attention::{dense_causal, dense_causal_in_passes};
use strata::nn::fused::attention::{device, host};
use strata::nn::fused::rope::rotate_trained;

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
    for (q_len, kv_len) in [(37, 37), (5, 37), (1, 9)] {
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
        let (out_d, lse_d) = device::forward(q.clone(), k.clone(), v.clone(), max_scores);
        let (dq_h, dk_h, dv_h) = host::backward(
            q.clone(),
            k.clone(),
            v.clone(),
            out_h.clone(),
            lse_h.clone(),
            dout.clone(),
        );
        let (dq_d, dk_d, dv_d) =
            device::backward(q, k, v, out_d.clone(), lse_d.clone(), dout, max_scores);
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
