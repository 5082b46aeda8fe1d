//! The causal softmax kernel and its gradient kernel (`strata_kernels::softmax`) against a naive
//! f64 computation on the host, f32 tensors: rows shorter and longer than a cube's units, and
//! queries that start past position 0 (a pass of rows, or queries after a cache).
//!
//! Tolerance 1e-5 of the largest entry: the kernel sums in another order, in f32.

use burn::prelude::*;
use strata::nn::fused::kernel::{causal_softmax, causal_softmax_grad};

use crate::common::{assert_close, random, values as host};

/// Naive probabilities, lse and gradient of the raw scores, row by row.
fn naive(
    scores: &[f32],
    grad_probs: &[f32],
    dims: [usize; 4],
    scale: f64,
    first: usize,
) -> [Vec<f32>; 3] {
    let [b, h, rows, kv] = dims;
    let (mut probs, mut lses, mut grads) =
        (vec![0f32; scores.len()], vec![], vec![0f32; scores.len()]);
    for row in 0..b * h * rows {
        let keys = first + row % rows + 1;
        let s = &scores[row * kv..row * kv + keys];
        let max = s.iter().map(|&x| x as f64 * scale).fold(f64::MIN, f64::max);
        let sum: f64 = s.iter().map(|&x| (x as f64 * scale - max).exp()).sum();
        let lse = max + sum.ln();
        lses.push(lse as f32);
        let p: Vec<f64> = s.iter().map(|&x| (x as f64 * scale - lse).exp()).collect();
        let dp = &grad_probs[row * kv..row * kv + keys];
        let delta: f64 = p.iter().zip(dp).map(|(p, &g)| p * g as f64).sum();
        for j in 0..keys {
            probs[row * kv + j] = p[j] as f32;
            grads[row * kv + j] = (p[j] * (dp[j] as f64 - delta) * scale) as f32;
        }
    }
    [probs, lses, grads]
}

fn check<B: Backend>() {
    for (dims, first) in [
        ([2, 3, 5, 77], 72),
        ([1, 2, 40, 40], 0),
        ([1, 1, 3, 300], 297),
        ([1, 2, 7, 300], 100),
    ] {
        let scores = random::<B, 4>(1, dims).mul_scalar(8.0);
        let grad_probs = random::<B, 4>(2, dims);
        let scale = 0.125;
        let (probs, lse) = causal_softmax(scores.clone(), scale, first);
        let (probs_again, grads) = causal_softmax_grad(
            scores.clone(),
            lse.clone(),
            grad_probs.clone(),
            scale,
            first,
        );
        let want = naive(&host(scores), &host(grad_probs), dims, scale as f64, first);
        assert_close(
            &["probs", "lse", "grad", "probs again"],
            &[host(probs), host(lse), host(grads), host(probs_again)],
            &[
                want[0].clone(),
                want[1].clone(),
                want[2].clone(),
                want[0].clone(),
            ],
            1e-5,
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn causal_softmax_kernels_on_wgpu_match_a_naive_softmax() {
    check::<strata::backend::Wgpu>();
}

#[cfg(feature = "cuda")]
#[test]
fn causal_softmax_kernels_on_cuda_match_a_naive_softmax() {
    check::<strata::backend::Cuda<f32>>();
}
