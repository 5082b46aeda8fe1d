//! RMSNorm, the SwiGLU gate, the rotary embedding, the cross-entropy loss and the embedding's
//! gradient through their GPU kernels (`strata_kernels::{rows, swiglu, rope, cross_entropy,
//! embedding}`, taken by `strata::nn::fused`
//! on autodiff over a GPU backend) against Burn's composed tensor ops on the CPU: values and
//! every gradient, f32.
//!
//! Tolerance 1e-5 of the largest entry: f32 sums in another order (the norm's row sums, the
//! column sums of dγ, the embedding rows' atomic adds); differences seen are ~1e-7.
//!
//! Mixed precision (`mixed`): the kernels that take two types (the norm writing a narrower
//! type than its f32 input, the rotation of narrow activations by f32 tables, the loss of
//! narrow logits) against the same kernels in f32 on the same device, rounded where the mixed
//! path rounds. The arithmetic is the same f32 in both, so the results should agree exactly
//! (they do on Mesa's f16); results in f32 (the loss, dx and dγ of the norm) are held to
//! 1e-5, results in the narrow type to 1e-2, one bf16 step (2^-8 of a value) should a compiler
//! contract the two kernels' f32 products differently and one value round the other way.

use burn::backend::Autodiff;
use burn::module::Param;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::activation::silu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use strata::backend::Cpu;
use strata::model::{cross_entropy, cross_entropy_masked};
use strata::nn::fused::norm::{rms_norm, rms_norm_as};
use strata::nn::fused::{embedding::embed, rope::rotate_trained, swiglu::swiglu};

use crate::common::{assert_close, random, values as host};

/// RMSNorm's input `x` (tracked), a weighting `w` of its output for the loss, and the norm.
fn norm_inputs<B: AutodiffBackend>(shape: [usize; 3]) -> (Tensor<B, 3>, Tensor<B, 3>, RmsNorm<B>) {
    let x = random::<B, 3>(1, shape).mul_scalar(3.0).require_grad();
    let w = random::<B, 3>(2, shape);
    let mut module = RmsNormConfig::new(shape[2])
        .with_epsilon(1e-5)
        .init::<B>(&Default::default());
    module.gamma = Param::from_tensor(random::<B, 1>(3, [shape[2]]).add_scalar(0.5));
    (x, w, module)
}

/// Output, dx and dγ of RMSNorm over the last axis of `shape`: through `strata`'s op, or
/// Burn's module (`composed`).
fn norm<B: AutodiffBackend>(shape: [usize; 3], composed: bool) -> Vec<Vec<f32>> {
    let (x, w, module) = norm_inputs::<B>(shape);
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

/// RMSNorm of an f32 `x` given in `half` (`mixed`) or in f32 then rounded to `half`: output,
/// dx and dγ, the gradient arriving in `half` either way.
fn norm_mixed<B: AutodiffBackend>(half: DType, mixed: bool) -> Vec<Vec<f32>> {
    let (x, w, module) = norm_inputs::<B>([3, 100, 300]);
    let y = if mixed {
        rms_norm_as(&module, x.clone(), half)
    } else {
        rms_norm(&module, x.clone()).cast(half)
    };
    assert_eq!(y.dtype(), half);
    let grads = (y.clone().cast(DType::F32) * w).sum().backward();
    vec![
        host(y),
        host(x.grad(&grads).expect("dx")),
        host(module.gamma.grad(&grads).expect("dγ")),
    ]
}

/// The rotation of `half` activations by f32 tables (`mixed`), or of the activations widened
/// to f32 and rounded back: output and dx (of the f32 values the activations were cast from).
fn rotation_mixed<B: AutodiffBackend>(half: DType, mixed: bool) -> Vec<Vec<f32>> {
    let [b, seq, heads, d] = [2, 4, 3, 64];
    let x = random::<B, 4>(7, [b, seq, heads, d]).require_grad();
    let narrow = x.clone().cast(half);
    let cos = random::<B, 4>(8, [1, seq, 1, d]);
    let sin = random::<B, 4>(9, [1, seq, 1, d]);
    let w = random::<B, 4>(10, [b, seq, heads, d]);
    let out = if mixed {
        rotate_trained(narrow, cos, sin).expect("the kernel runs on this backend")
    } else {
        let wide = narrow.cast(DType::F32);
        rotate_trained(wide, cos, sin)
            .expect("the kernel")
            .cast(half)
    };
    assert_eq!(out.dtype(), half);
    let grads = (out.clone().cast(DType::F32) * w).sum().backward();
    vec![host(out), host(x.grad(&grads).expect("dx"))]
}

/// The loss of `half` logits (`mixed`: read as they are), or of those logits widened to f32:
/// loss and d_logits (of the f32 values the logits were cast from).
fn loss_mixed<B: AutodiffBackend>(half: DType, mixed: bool) -> Vec<Vec<f32>> {
    let [batch, seq, vocab] = [2, 3, 300];
    let logits = random::<B, 3>(11, [batch, seq, vocab])
        .mul_scalar(10.0)
        .require_grad();
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| (i * 7919 % vocab) as i64)
        .collect();
    let targets =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &Default::default());
    let narrow = logits.clone().cast(half);
    let value = if mixed {
        cross_entropy(narrow, targets)
    } else {
        cross_entropy(narrow.cast(DType::F32), targets)
    };
    assert_eq!(
        value.dtype(),
        DType::F32,
        "the loss is f32 whatever the logits' type"
    );
    let grads = value.clone().mul_scalar(3.0).backward();
    vec![host(value), host(logits.grad(&grads).expect("d_logits"))]
}

/// The mixed-precision paths in `half` against the f32 kernels on the same backend.
fn check_mixed<B: AutodiffBackend>(half: DType) {
    let [got, want] = [true, false].map(|mixed| norm_mixed::<B>(half, mixed));
    assert_close(&["y"], &got[..1], &want[..1], 1e-2);
    assert_close(&["dx", "dγ"], &got[1..], &want[1..], 1e-5);
    let [got, want] = [true, false].map(|mixed| rotation_mixed::<B>(half, mixed));
    assert_close(&["out", "dx"], &got, &want, 1e-2);
    let [got, want] = [true, false].map(|mixed| loss_mixed::<B>(half, mixed));
    assert_close(&["loss"], &got[..1], &want[..1], 1e-5);
    assert_close(&["d_logits"], &got[1..], &want[1..], 1e-2);
}

#[cfg(feature = "wgpu")]
#[test]
fn norm_gate_rope_and_loss_kernels_on_wgpu_match_the_cpu() {
    type B = Autodiff<strata::backend::Wgpu>;
    check::<B>();
    // Mixed precision on wgpu is f16 (bf16 is refused there), where the device has it.
    if <B as burn::tensor::backend::Backend>::supports_dtype(&Default::default(), DType::F16) {
        check_mixed::<B>(DType::F16);
    } else {
        eprintln!("this Vulkan device has no f16: mixed-precision kernels not checked");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn norm_gate_rope_and_loss_kernels_on_cuda_match_the_cpu() {
    check::<Autodiff<strata::backend::Cuda<f32>>>();
    check_mixed::<Autodiff<strata::backend::Cuda<f32>>>(DType::BF16);
    check_mixed::<Autodiff<strata::backend::Cuda<f32>>>(DType::F16);
}
