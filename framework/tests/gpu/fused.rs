//! The fused causal attention op on a GPU backend (its tensor-op form, in passes) against Burn's
//! composed attention on the CPU: outputs and the gradients of q, k and v, f32. Built with
//! `--features wgpu` (CI runs it on Mesa's software Vulkan) or `--features cuda`.
//!
//! Tolerance 1e-4 of the largest entry: GPU kernels sum in other orders and fuse multiply-adds
//! differently from the CPU; f32 differences here are ~1e-6.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use strata::backend::Cpu;
use strata::nn::attention::{dense_causal, dense_causal_in_passes};
use strata::nn::fused::attention::device;

use crate::common::{assert_close, random, values as host};

fn run<B: AutodiffBackend>(q_len: usize, kv_len: usize, fused: bool) -> Vec<Vec<f32>> {
    let (b, h, d) = (2, 3, 32);
    let q = random::<B, 4>(1, [b, h, q_len, d]).require_grad();
    let k = random::<B, 4>(2, [b, h, kv_len, d]).require_grad();
    let v = random::<B, 4>(3, [b, h, kv_len, d]).require_grad();
    let w = random::<B, 4>(4, [b, h, q_len, d]);
    let out = if fused {
        dense_causal(q.clone(), k.clone(), v.clone())
    } else {
        dense_causal_in_passes(q.clone(), k.clone(), v.clone(), usize::MAX)
    };
    let grads = (out.clone() * w).sum().backward();
    let mut all = vec![host(out)];
    all.extend([q, k, v].map(|x| host(x.grad(&grads).expect("a gradient"))));
    all
}

fn check<B: AutodiffBackend>() {
    for (q_len, kv_len) in [(77, 77), (5, 77)] {
        let got = run::<B>(q_len, kv_len, true);
        let want = run::<Autodiff<Cpu>>(q_len, kv_len, false);
        assert_close(&["out", "dq", "dk", "dv"], &got, &want, 1e-4);
    }
    // Several passes of queries (the form long sequences take) against one.
    let (q, k, v) = (
        random::<B::InnerBackend, 4>(5, [1, 2, 40, 16]),
        random::<B::InnerBackend, 4>(6, [1, 2, 40, 16]),
        random::<B::InnerBackend, 4>(7, [1, 2, 40, 16]),
    );
    let dout = random::<B::InnerBackend, 4>(8, [1, 2, 40, 16]);
    let all = |max_scores: usize, query_passes: usize| {
        let (out, lse) = device::forward(q.clone(), k.clone(), v.clone(), max_scores, query_passes);
        let (dq, dk, dv) = device::backward(
            q.clone(),
            k.clone(),
            v.clone(),
            out.clone(),
            lse.clone(),
            dout.clone(),
            max_scores,
            query_passes,
        );
        [host(out), host(lse), host(dq), host(dk), host(dv)]
    };
    // Passes bounded by memory, and three passes that each read only the keys up to their last
    // query (where the GPU score kernels run).
    let one = all(usize::MAX, 1);
    for passes in [all(2 * 40 * 7, 1), all(usize::MAX, 3)] {
        assert_close(&["out", "lse", "dq", "dk", "dv"], &passes, &one, 1e-5);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn fused_attention_on_wgpu_matches_the_cpu() {
    check::<Autodiff<strata::backend::Wgpu>>();
}

#[cfg(feature = "cuda")]
#[test]
fn fused_attention_on_cuda_matches_the_cpu() {
    check::<Autodiff<strata::backend::Cuda<f32>>>();
}
