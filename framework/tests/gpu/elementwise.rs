//! RMSNorm, the SwiGLU gate, the rotary embedding, the cross-entropy loss and the embedding's
//! gradient through their GPU kernels (`strata_kernels::{rows, swiglu, rope, cross_entropy,
//! embedding}`, taken by `strata::nn::fused`
//! on autodiff over a GPU backend) against Burn's composed tensor ops on the CPU: values and
//! every gradient, f32.
//!
//! Tolerance 1e-5 of the largest entry: f32 sums in another order (the norm's row sums, the
//! column sums of dγ, the embedding rows' atomic adds); differences seen are ~1e-7.

use burn::backend::Autodiff;
use burn::module::Param;
use burn::nn::RmsNormConfig;
use burn::tensor::activation::log_softmax;
use burn::tensor::activation::silu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use strata::backend::Cpu;
use strata::model::{cross_entropy, cross_entropy_masked};
use strata::nn::fused::{embedding::embed, norm::rms_norm, rope::rotate_trained, swiglu::swiglu};

use crate::common::{assert_close, random, values as host};

/// Output, dx and dγ of RMSNorm over the last axis of `shape`: through `strata`'s op, or
/// Burn's module (`composed`).
fn norm<B: AutodiffBackend>(shape: [usize; 3], composed: bool) -> Vec<Vec<f32>> {
    let x = random::<B, 3>(1, shape).mul_scalar(3.0).require_grad();
    let w = random::<B, 3>(2, shape);
    let mut module = RmsNormConfig::new(shape[2])
        .with_epsilon(1e-5)
        .init::<B>(&Default::default());
    module.gamma = Param::from_tensor(random::<B, 1>(3, [shape[2]]).add_scalar(0.5));
    let y = if composed {
        module.forward(x.clone())
    } else {
        rms_norm(&module, x.clone())
    };
    let grads = (y.clone() * w).sum().backward();
    vec![
        host(y),
        host(x.grad(&grads).expect("dx")),
        host(module.gamma.grad(&grads).expect("dγ")),
    ]
}

/// Output and dW of an embedding lookup of `[batch, seq]` tokens in a `vocab × d` table, each
/// token used several times: through `strata`'s op, or Burn's `embedding` (`composed`).
fn lookup<B: AutodiffBackend>(
    vocab: usize,
    d: usize,
    [batch, seq]: [usize; 2],
    composed: bool,
) -> Vec<Vec<f32>> {
    let weight = random::<B, 2>(7, [vocab, d]).require_grad();
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 7 + i / 3) % vocab) as i64)
        .collect();
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &Default::default());
    let w = random::<B, 3>(8, [batch, seq, d]);
    let out = if composed {
        burn::tensor::module::embedding(weight.clone(), tokens)
    } else {
        embed(weight.clone(), tokens)
    };
    let grads = (out.clone() * w).sum().backward();
    vec![host(out), host(weight.grad(&grads).expect("dW"))]
}

/// Output, d_gate and d_up of the gate.
fn gate<B: AutodiffBackend>(shape: [usize; 3], composed: bool) -> Vec<Vec<f32>> {
    let g = random::<B, 3>(4, shape).mul_scalar(6.0).require_grad();
    let u = random::<B, 3>(5, shape).require_grad();
    let w = random::<B, 3>(6, shape);
    let out = if composed {
        silu(g.clone()) * u.clone()
    } else {
        swiglu(g.clone(), u.clone())
    };
    let grads = (out.clone() * w).sum().backward();
    vec![
        host(out),
        host(g.grad(&grads).expect("d_gate")),
        host(u.grad(&grads).expect("d_up")),
    ]
}

/// Output and dx of the rotate-half rotation of `x: [batch, seq, heads, head_dim]` (a
/// transposed view) by tables `[table_batch, seq, 1, head_dim]`. Any table values do: the op
/// and the composition apply the same formula to them.
fn rotation<B: AutodiffBackend>(
    [b, seq, heads, d]: [usize; 4],
    table_batch: usize,
    composed: bool,
) -> Vec<Vec<f32>> {
    let x = random::<B, 4>(7, [b, heads, seq, d]).require_grad();
    let xt = x.clone().swap_dims(1, 2);
    let cos = random::<B, 4>(8, [table_batch, seq, 1, d]);
    let sin = random::<B, 4>(9, [table_batch, seq, 1, d]);
    let w = random::<B, 4>(10, [b, seq, heads, d]);
    let out = if composed {
        let half = d / 2;
        let (x1, x2) = (
            xt.clone().slice_dim(3, 0..half),
            xt.clone().slice_dim(3, half..d),
        );
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        xt * cos + rotated * sin
    } else {
        rotate_trained(xt, cos, sin).expect("the op runs on this backend")
    };
    let grads = (out.clone() * w).sum().backward();
    vec![host(out), host(x.grad(&grads).expect("dx"))]
}

/// Loss and d_logits of the cross-entropy of logits `[batch, seq, vocab]`, with a mask or not.
fn loss<B: AutodiffBackend>(shape: [usize; 3], masked: bool, composed: bool) -> Vec<Vec<f32>> {
    let [batch, seq, vocab] = shape;
    let device = Default::default();
    let logits = random::<B, 3>(11, shape).mul_scalar(10.0).require_grad();
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| (i * 7919 % vocab) as i64)
        .collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let mask_values: Vec<f32> = (0..batch * seq)
        .map(|i| (i % 3 != 0) as u8 as f32)
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask_values, [batch, seq]), &device);
    let value = if composed {
        let rows = batch * seq;
        let picked = log_softmax(logits.clone().reshape([rows, vocab]), 1)
            .gather(1, targets.reshape([rows, 1]))
            .reshape([rows]);
        if masked {
            let mask = mask.reshape([rows]);
            (picked * mask.clone()).sum().neg() / mask.sum()
        } else {
            picked.mean().neg()
        }
    } else if masked {
        cross_entropy_masked(logits.clone(), targets, mask)
    } else {
        cross_entropy(logits.clone(), targets)
    };
    let grads = value.clone().mul_scalar(3.0).backward();
    vec![host(value), host(logits.grad(&grads).expect("d_logits"))]
}

fn check<B: AutodiffBackend>() {
    // Rows longer than a cube's 256 units, and shorter.
    for (shape, masked) in [
        ([2, 3, 300], false),
        ([2, 3, 300], true),
        ([1, 4, 37], true),
    ] {
        let want = loss::<Autodiff<Cpu>>(shape, masked, true);
        let got = loss::<B>(shape, masked, false);
        assert_close(&["loss", "d_logits"], &got, &want, 1e-5);
    }
    for (shape, table_batch) in [([2, 5, 3, 8], 1), ([2, 4, 2, 64], 2)] {
        let want = rotation::<Autodiff<Cpu>>(shape, table_batch, true);
        assert_close(
            &["out", "dx"],
            &rotation::<B>(shape, table_batch, false),
            &want,
            1e-5,
        );
    }
    // Rows longer and shorter than a cube's 256 units, tokens repeated up to 25 times.
    for (vocab, d, tokens) in [(37, 300, [4, 60]), (5, 7, [2, 3])] {
        let want = lookup::<Autodiff<Cpu>>(vocab, d, tokens, true);
        assert_close(
            &["out", "dW"],
            &lookup::<B>(vocab, d, tokens, false),
            &want,
            1e-5,
        );
    }
    // Rows longer and shorter than a cube's 256 units; more rows than dγ's first pass sums per
    // block (64), so that its second pass runs.
    for shape in [[2, 5, 300], [1, 3, 7], [3, 100, 40]] {
        let want = norm::<Autodiff<Cpu>>(shape, true);
        assert_close(&["y", "dx", "dγ"], &norm::<B>(shape, false), &want, 1e-5);
        let want = gate::<Autodiff<Cpu>>(shape, true);
        assert_close(
            &["out", "d_gate", "d_up"],
            &gate::<B>(shape, false),
            &want,
            1e-5,
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn norm_gate_rope_and_loss_kernels_on_wgpu_match_the_cpu() {
    check::<Autodiff<strata::backend::Wgpu>>();
}

#[cfg(feature = "cuda")]
#[test]
fn norm_gate_rope_and_loss_kernels_on_cuda_match_the_cpu() {
    check::<Autodiff<strata::backend::Cuda<f32>>>();
}
