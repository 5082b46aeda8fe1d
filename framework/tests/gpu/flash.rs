//! The CubeCL flash-attention kernels (`strata-kernels`) against independent references on the
//! CPU: Burn's composed attention with an explicit mask, differentiated by Burn's autodiff.
//! Outputs, row log-sum-exps and the gradients of q, k and v, f32, causal and block
//! multi-scale, queries at the end of longer keys (a prompt after a cache), head sizes 16–64 and
//! lengths that leave partial tiles.
//!
//! Tolerance 1e-4 of the largest entry: the kernels sum scores over tiles with an online softmax
//! and in another order than the CPU; the f32 differences seen are ~1e-6.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use strata::backend::Cpu;
use strata::nn::attention::dense_causal_in_passes;
use strata::nn::coord3d::{Bms, bms_attention, bms_attention_masked};
use strata::nn::fused::attention::device;
use strata::nn::fused::kernel::{self, Pattern};

use crate::common::{assert_close, random, values};

/// Queries `[b, h, q_len, d]` at the last positions of `kv_len` keys, and an output weight.
fn inputs<B: Backend>(shape: [usize; 5], seed: u64) -> [Tensor<B, 4>; 4] {
    let [b, h, q_len, kv_len, d] = shape;
    [
        random::<B, 4>(seed, [b, h, q_len, d]),
        random::<B, 4>(seed + 1, [b, h, kv_len, d]),
        random::<B, 4>(seed + 2, [b, h, kv_len, d]),
        random::<B, 4>(seed + 3, [b, h, q_len, d]),
    ]
}

/// The kernels on `G` (not under autodiff): output, lse, dq, dk, dv for the loss Σ out ∘ w.
fn kernels<G: Backend>(shape: [usize; 5], seed: u64, pattern: Pattern) -> Vec<Vec<f32>> {
    let [q, k, v, w] = inputs::<G>(shape, seed);
    assert!(
        kernel::applies::<G>(q.dims(), k.dims(), pattern),
        "the kernels must run for {shape:?} {pattern:?}"
    );
    let (out, lse) = kernel::forward(q.clone(), k.clone(), v.clone(), pattern);
    let [dq, dk, dv] = kernel::backward([q, k, v], out.clone(), lse.clone(), w, pattern);
    vec![values(out), values(lse), values(dq), values(dk), values(dv)]
}

/// The same on the CPU, from Burn's composed ops and autodiff: `attend` computes attention of
/// the queries over the keys; the lse comes from the tensor-op form (causal) or is skipped.
fn reference(
    shape: [usize; 5],
    seed: u64,
    attend: impl Fn(
        Tensor<Autodiff<Cpu>, 4>,
        Tensor<Autodiff<Cpu>, 4>,
        Tensor<Autodiff<Cpu>, 4>,
    ) -> Tensor<Autodiff<Cpu>, 4>,
) -> Vec<Vec<f32>> {
    reference_of(inputs::<Autodiff<Cpu>>(shape, seed), attend)
}

/// [`reference`] of given inputs `[q, k, v, w]`.
fn reference_of(
    [q, k, v, w]: [Tensor<Autodiff<Cpu>, 4>; 4],
    attend: impl Fn(
        Tensor<Autodiff<Cpu>, 4>,
        Tensor<Autodiff<Cpu>, 4>,
        Tensor<Autodiff<Cpu>, 4>,
    ) -> Tensor<Autodiff<Cpu>, 4>,
) -> Vec<Vec<f32>> {
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = attend(q.clone(), k.clone(), v.clone());
    let grads = (out.clone() * w).sum().backward();
    let (_, lse) = device::forward(
        q.clone().inner(),
        k.clone().inner(),
        v.clone().inner(),
        usize::MAX,
        1,
    );
    let mut all = vec![values(out), values(lse)];
    all.extend([q, k, v].map(|x| values(x.grad(&grads).expect("a gradient"))));
    all
}

const NAMES: [&str; 5] = ["out", "lse", "dq", "dk", "dv"];

/// Shapes `[batch, heads, q_len, kv_len, head_dim]` with head sizes from `head_dims`.
fn causal_cases<G: Backend>(head_dims: [usize; 2]) {
    let [small, large] = head_dims;
    for (seed, shape) in [
        (1, [2, 3, 77, 77, large]),
        (11, [1, 2, 40, 72, large]),
        (21, [1, 1, 33, 33, small]),
        (31, [1, 2, 3, 45, small]),
    ] {
        let got = kernels::<G>(shape, seed, Pattern::Causal);
        let want = reference(shape, seed, |q, k, v| {
            dense_causal_in_passes(q, k, v, usize::MAX)
        });
        assert_close(&NAMES, &got, &want, 1e-4);
    }
}

/// The BMS rule's mask, dense, for queries at the last `q_len` of `kv_len` positions.
fn bms_reference(shape: [usize; 5], seed: u64, bms: Bms) -> Vec<Vec<f32>> {
    let [_, _, q_len, kv_len, _] = shape;
    let keys: Vec<usize> = (0..kv_len).collect();
    let mut all = reference(shape, seed, |q, k, v| {
        bms_attention_masked(q, k, v, &keys[kv_len - q_len..], &keys, bms)
    });
    all.remove(1); // the causal lse does not apply
    all
}

fn bms_cases<G: Backend>(head_dims: [usize; 2]) {
    let [small, large] = head_dims;
    // 7 blocks of 32: with W = 2, block 6 reads 4, 5 (window), 2 (k = 1: J even), 0 (sink).
    for (seed, shape, bms) in [
        (41, [1, 2, 200, 200, small], Bms::new(32, 2)),
        (51, [2, 1, 96, 224, large], Bms::new(32, 2)),
        (
            61,
            [1, 2, 200, 200, small],
            Bms {
                multiscale: false,
                ..Bms::new(32, 2)
            },
        ),
        (71, [1, 1, 256, 256, large], Bms::new(64, 1)),
    ] {
        let mut got = kernels::<G>(shape, seed, bms.into());
        got.remove(1);
        let want = bms_reference(shape, seed, bms);
        let names = ["out", "dq", "dk", "dv"];
        assert_close(&names, &got, &want, 1e-4);
    }
}

/// Through the model's entry points under autodiff: with `STRATA_FLASH_KERNEL=1`,
/// `bms_attention` on the GPU takes the kernel (block length 32) and its backward; checked
/// against the dense masked path on the CPU.
fn bms_trained<G: AutodiffBackend>(head_dim: usize) {
    // SAFETY: tests run one at a time (.cargo/config.toml sets RUST_TEST_THREADS=1), so no
    // other thread reads the environment meanwhile.
    unsafe { std::env::set_var("STRATA_FLASH_KERNEL", "1") };
    let (shape, seed, bms) = ([1, 2, 100, 100, head_dim], 81, Bms::new(32, 1));
    let [q, k, v, w] = inputs::<G>(shape, seed);
    assert!(kernel::chosen::<G::InnerBackend>(
        q.dims(),
        k.dims(),
        bms.into()
    ));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = bms_attention(q.clone(), k.clone(), v.clone(), bms);
    let grads = (out.clone() * w).sum().backward();
    let mut got = vec![values(out)];
    got.extend([q, k, v].map(|x| values(x.grad(&grads).expect("a gradient"))));
    // SAFETY: as above.
    unsafe { std::env::remove_var("STRATA_FLASH_KERNEL") };
    let want = bms_reference(shape, seed, bms);
    assert_close(&["out", "dq", "dk", "dv"], &got, &want, 1e-4);
}

/// Small heads on wgpu: CI runs it on Mesa's software Vulkan, whose compiler takes ~10 s for
/// the three kernels at head size 16 and ~45 s at 32, growing faster than the size.
#[cfg(feature = "wgpu")]
#[test]
fn flash_kernels_on_wgpu_match_the_cpu() {
    use strata::backend::Wgpu;
    causal_cases::<Wgpu>([8, 16]);
    bms_cases::<Wgpu>([8, 16]);
    bms_trained::<Autodiff<Wgpu>>(16);
}

/// The tensor-core kernels (`strata_kernels::flash_mma`) in bf16 against the f32 reference
/// of the same inputs rounded to bf16, at head sizes 32 and 64, two to four blocks of 64.
///
/// Tolerance 2e-2 of the largest entry: the outputs and gradients are rounded to bf16 (a step
/// of 2⁻⁸ relative), and, as in FlashAttention's half-precision kernels, so are the
/// probabilities and the score gradients before their products; a wrong mask, tile or scale
/// is off by tens of percent.
#[cfg(feature = "cuda")]
#[test]
fn tensor_core_flash_on_cuda_matches_the_cpu() {
    use burn::tensor::{DType, TensorData, bf16};
    use strata::backend::Cuda;

    let device = Default::default();
    for (seed, shape) in [
        (41, [2, 3, 128, 128, 64]),
        (51, [1, 2, 192, 192, 32]),
        (61, [1, 1, 256, 256, 64]),
    ] {
        let rounded = inputs::<Cpu>(shape, seed).map(|x| {
            let dims = x.dims();
            let v: Vec<f32> = values(x)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            TensorData::new(v, dims)
        });
        let [q, k, v, w] = rounded
            .clone()
            .map(|d| Tensor::<Cuda, 4>::from_data(d, &device).cast(DType::BF16));
        // SAFETY: the other tests read this variable at most; the kernels it turns on apply
        // to bf16 inputs only, which no other test gives attention.
        unsafe { std::env::set_var("STRATA_MMA_ATTENTION", "1") };
        assert!(
            kernel::mma_chosen(&q, &k),
            "the tensor-core kernels must run for {shape:?}"
        );
        let (out, lse) = kernel::mma_forward(q.clone(), k.clone(), v.clone());
        let [dq, dk, dv] = kernel::mma_backward([q, k, v], out.clone(), lse.clone(), w);
        let got = vec![values(out), values(lse), values(dq), values(dk), values(dv)];
        let want = reference_of(
            rounded.map(|d| Tensor::<Autodiff<Cpu>, 4>::from_data(d, &Default::default())),
            |q, k, v| dense_causal_in_passes(q, k, v, usize::MAX),
        );
        for (name, (a, b)) in NAMES.iter().zip(got.iter().zip(&want)) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            println!("{shape:?} {name}: max |Δ| / scale = {:.2e}", err / scale);
        }
        assert_close(&NAMES, &got, &want, 2e-2);
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var("STRATA_MMA_ATTENTION") };
}

/// The head sizes models use (64 for GPT-2 and TinyLlama shapes, 128 at most).
#[cfg(feature = "cuda")]
#[test]
fn flash_kernels_on_cuda_match_the_cpu() {
    use strata::backend::Cuda;
    causal_cases::<Cuda>([32, 64]);
    bms_cases::<Cuda>([16, 128]);
    bms_trained::<Autodiff<Cuda>>(64);
}
