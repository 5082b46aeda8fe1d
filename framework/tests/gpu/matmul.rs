//! The GPU matmul kernels the linear layers can take (`STRATA_MATMUL`): every kernel that runs on
//! the device against a naive f64 product on the host, in the three layouts a training step
//! hands them (`x·W`, `dY·Wᵀ` and `Xᵀ·dY`, the transposes as strided views); then the linear op
//! under autodiff through a chosen kernel against Burn's composed ops on the CPU. On CUDA,
//! cuBLAS also on the sizes and layouts attention hands it (odd sizes, sliced rows, heads
//! swapped with positions), and in bf16.
//!
//! Tolerances, of the largest entry: 1e-4 for kernels that multiply in f32 (they sum in other
//! orders than the reference; differences here are ~1e-6; cuBLAS is asked for f32 arithmetic,
//! no TF32); 1e-2 for tensor-core kernels, which may round f32 inputs to TF32's 10-bit mantissa
//! (relative error 2^-11 per input) and whose sums of 48 such products stay well inside 1e-2,
//! and for bf16 outputs (rounded to an 8-bit mantissa, relative error 2^-9).

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use strata::backend::Cpu;
use strata::nn::fused::kernel::{MATMUL_KERNELS, MATMUL_VAR, matmul_chosen, matmul_with};
use strata::nn::fused::linear::{linear, matmul_rows};
use strata_kernels::matmul::CUBLAS;

use crate::common::{assert_close, random, values};

/// `a·b` for row-major `a: [m, k]`, `b: [k, n]`, summed in f64.
fn naive(a: &[f32], b: &[f32], [m, k, n]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let sum: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            out[i * n + j] = sum as f32;
        }
    }
    out
}

/// [`naive`] for each of `count` matrices stored one after another.
fn naive_batched(a: &[f32], b: &[f32], count: usize, [m, k, n]: [usize; 3]) -> Vec<f32> {
    (0..count)
        .flat_map(|i| {
            naive(
                &a[i * m * k..][..m * k],
                &b[i * k * n..][..k * n],
                [m, k, n],
            )
        })
        .collect()
}

fn tolerance(kernel: &str) -> f32 {
    if kernel.ends_with("unit") || kernel == CUBLAS {
        1e-4
    } else {
        1e-2
    }
}

/// Every kernel in the three layouts; returns the kernels that ran all three. Sizes that are
/// not multiples of the kernels' tiles check their edge handling.
fn kernels_match_a_naive_product<B: Backend>() -> Vec<&'static str> {
    let [m, k, n] = [70, 64, 36];
    let (a, b) = (random::<B, 2>(11, [m, k]), random::<B, 2>(12, [k, n]));
    let want = naive(&values(a.clone()), &values(b.clone()), [m, k, n]);
    // The same products with an operand stored transposed and handed over as a view.
    let a_t = Tensor::<B, 2>::from_data(a.clone().transpose().into_data(), &Default::default());
    let b_t = Tensor::<B, 2>::from_data(b.clone().transpose().into_data(), &Default::default());
    let layouts = [
        ("x·W", a.clone(), b.clone()),
        ("dY·Wᵀ", a.clone(), b_t.transpose()),
        ("Xᵀ·dY", a_t.transpose(), b.clone()),
    ];
    let mut ran = Vec::new();
    for kernel in MATMUL_KERNELS {
        // The list and the strategies are written apart: each name must have its strategy.
        assert!(
            *kernel == CUBLAS || strata_kernels::matmul::strategy(kernel).is_some(),
            "{kernel}"
        );
        let mut all = true;
        for (layout, a, b) in &layouts {
            let product = catch_unwind(AssertUnwindSafe(|| {
                matmul_with(a.clone(), b.clone(), kernel)
            }));
            match product {
                Ok(Ok(got)) => assert_close(
                    &[&format!("{kernel} {layout}")],
                    &[values(got)],
                    std::slice::from_ref(&want),
                    tolerance(kernel),
                ),
                // Refused (no tensor cores, a tile that does not fit): the caller falls back.
                _ => all = false,
            }
        }
        if all {
            ran.push(*kernel);
        }
        // Sizes the CubeCL kernels do not take (`takes`: k a multiple of 32, n of 4) are
        // refused, not computed (cuBLAS takes them: `cublas_takes_any_shape`).
        if *kernel == CUBLAS {
            continue;
        }
        let [a_odd_k, b_odd_k] = [[70, 77], [77, 36]].map(|shape| random::<B, 2>(13, shape));
        assert!(
            matmul_with(a_odd_k, b_odd_k, kernel).is_err(),
            "{kernel} took k = 77"
        );
        let [a_odd_n, b_odd_n] = [[70, 64], [64, 77]].map(|shape| random::<B, 2>(14, shape));
        assert!(
            matmul_with(a_odd_n, b_odd_n, kernel).is_err(),
            "{kernel} took n = 77"
        );
    }
    ran
}

/// Batched products (`[2, 3, m, k]`), as attention makes them, with transposed views: each
/// kernel of `kernels` against the naive product of each batch entry.
fn batched_kernels_match<B: Backend>(kernels: &[&str]) {
    let [m, k, n] = [70, 64, 36];
    let a = random::<B, 4>(15, [2, 3, m, k]);
    let b_t = random::<B, 4>(16, [2, 3, n, k]);
    let b = Tensor::<B, 4>::from_data(b_t.clone().swap_dims(2, 3).into_data(), &Default::default());
    let want = naive_batched(&values(a.clone()), &values(b), 6, [m, k, n]);
    for kernel in kernels {
        let got = matmul_with(a.clone(), b_t.clone().swap_dims(2, 3), kernel)
            .unwrap_or_else(|e| panic!("{kernel}: {e}"));
        let name = format!("{kernel} batched");
        assert_close(
            &[&name],
            &[values(got)],
            std::slice::from_ref(&want),
            tolerance(kernel),
        );
    }
}

/// `y = x·W` and the tied head's `h·Eᵀ` with their gradients, under autodiff.
fn linear_step<G: AutodiffBackend>() -> Vec<Vec<f32>> {
    let x = random::<G, 2>(21, [33, 24]).require_grad();
    let w = random::<G, 2>(22, [24, 40]).require_grad();
    let e = random::<G, 2>(23, [50, 40]).require_grad();
    let h = linear(x.clone(), w.clone());
    let logits = matmul_rows(h.clone(), e.clone().transpose());
    let loss = (logits.clone() * random::<G, 2>(24, [33, 50])).sum();
    let grads = loss.backward();
    let mut all = vec![values(h), values(logits)];
    all.extend([x, w, e].map(|t| values(t.grad(&grads).expect("a gradient"))));
    all
}

fn linear_through<G: AutodiffBackend>(kernel: &str) {
    // SAFETY: tests run one at a time (.cargo/config.toml sets RUST_TEST_THREADS=1), so no
    // other thread reads the environment meanwhile.
    unsafe { std::env::set_var(MATMUL_VAR, kernel) };
    assert!(matmul_chosen::<G::InnerBackend>());
    let got = linear_step::<G>();
    // SAFETY: as above.
    unsafe { std::env::remove_var(MATMUL_VAR) };
    let want = linear_step::<Autodiff<Cpu>>();
    let names = ["y", "logits", "dx", "dW", "dE"];
    assert_close(&names, &got, &want, tolerance(kernel));
}

/// An unknown kernel name is an error naming the variable and listing the kernels.
fn unknown_kernel_is_refused() {
    // SAFETY: as in `linear_through`.
    unsafe { std::env::set_var(MATMUL_VAR, "fastest") };
    let err = strata::nn::fused::kernel::matmul_kernel().expect_err("an unknown kernel");
    // SAFETY: as above.
    unsafe { std::env::remove_var(MATMUL_VAR) };
    assert!(err.contains("STRATA_MATMUL=\"fastest\"") && err.contains("double_cyclic_mma"));
}

/// Mesa's software Vulkan has no cooperative-matrix (tensor-core) instructions: the unit
/// kernels and Burn's default run.
#[cfg(feature = "wgpu")]
#[test]
fn matmul_kernels_on_wgpu_match_a_naive_product() {
    use strata::backend::Wgpu;
    unknown_kernel_is_refused();
    let ran = kernels_match_a_naive_product::<Wgpu>();
    for kernel in ["burn", "simple_unit", "double_unit"] {
        assert!(ran.contains(&kernel), "{kernel} did not run; ran {ran:?}");
    }
    batched_kernels_match::<Wgpu>(&["simple_unit", "double_unit"]);
    linear_through::<Autodiff<Wgpu>>("simple_unit");
}

#[cfg(feature = "cuda")]
#[test]
fn matmul_kernels_on_cuda_match_a_naive_product() {
    use strata::backend::Cuda;
    unknown_kernel_is_refused();
    let ran = kernels_match_a_naive_product::<Cuda>();
    eprintln!("kernels that ran: {ran:?}");
    for kernel in [
        "burn",
        CUBLAS,
        "simple_unit",
        "simple_cyclic_cmma",
        "double_cyclic_mma",
    ] {
        assert!(ran.contains(&kernel), "{kernel} did not run; ran {ran:?}");
    }
    // Through the layers with the kernels the benchmarks chose (each kernel compiles for every
    // shape and layout: all of them would take minutes).
    batched_kernels_match::<Cuda>(&[CUBLAS, "simple_cyclic_cmma", "double_cyclic_mma"]);
    linear_through::<Autodiff<Cuda>>(CUBLAS);
    linear_through::<Autodiff<Cuda>>("double_cyclic_mma");
    // Both ways of ordering cuBLAS's stream against CubeCL's.
    for wait in ["device", "host"] {
        // SAFETY: as in `linear_through`.
        unsafe { std::env::set_var(strata_kernels::cublas::WAIT_VAR, wait) };
        cublas_takes_any_shape::<Cuda>(1e-4);
        cublas_takes_any_shape::<Cuda<burn::tensor::bf16>>(1e-2);
        cublas_chain_matches_the_cpu::<Cuda>();
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var(strata_kernels::cublas::WAIT_VAR) };
}

/// Products and CubeCL's element-wise kernels taking turns, each reading the last one's output
/// and freeing memory the next may reuse: a product ordered wrongly against CubeCL's stream
/// reads stale or unwritten values, and the chain's result drifts from the CPU's.
#[cfg(feature = "cuda")]
fn cublas_chain_matches_the_cpu<B: Backend>() {
    fn chain<B: Backend>(kernel: Option<&str>) -> Vec<f32> {
        let w = random::<B, 2>(41, [48, 48]).div_scalar(4.0);
        let mut x = random::<B, 2>(42, [40, 48]);
        for step in 0..20 {
            let product = match kernel {
                Some(kernel) => matmul_with(x, w.clone(), kernel).expect("a product"),
                None => x.matmul(w.clone()),
            };
            x = product.tanh().add_scalar(step as f64 * 0.01);
        }
        values(x)
    }
    let got = chain::<B>(Some(CUBLAS));
    let want = chain::<Cpu>(None);
    assert_close(&["chain"], &[got], &[want], 1e-4);
}

/// cuBLAS on what attention hands it: sizes that are multiples of nothing, a pass of query rows
/// sliced out of `[batch, heads, seq, head_dim]` views whose head and batch strides do not nest
/// (the projections lay tokens out as `[batch, seq, heads, head_dim]`), transposed keys.
#[cfg(feature = "cuda")]
fn cublas_takes_any_shape<B: Backend>(tol: f32) {
    let (batch, seq, heads, d) = (2, 77, 3, 24);
    let q = random::<B, 4>(31, [batch, seq, heads, d]).swap_dims(1, 2);
    let k = random::<B, 4>(32, [batch, seq, heads, d]).swap_dims(1, 2);
    let v = random::<B, 4>(33, [batch, seq, heads, d]).swap_dims(1, 2);
    for rows in [3..8, 0..77] {
        let m = rows.len();
        let q_rows = q.clone().slice_dim(2, rows);
        let scores = matmul_with(q_rows.clone(), k.clone().swap_dims(2, 3), CUBLAS)
            .unwrap_or_else(|e| panic!("scores: {e}"));
        let want = naive_batched(
            &values(q_rows),
            &values(k.clone().swap_dims(2, 3)),
            batch * heads,
            [m, d, seq],
        );
        assert_close(
            &[&format!("q·kᵀ {m} rows")],
            &[values(scores.clone())],
            &[want],
            tol,
        );
        // The scores (contiguous, odd sizes) times the values (a view): P·V.
        let out =
            matmul_with(scores.clone(), v.clone(), CUBLAS).unwrap_or_else(|e| panic!("p·v: {e}"));
        let want = naive_batched(
            &values(scores.clone()),
            &values(v.clone()),
            batch * heads,
            [m, seq, d],
        );
        assert_close(
            &[&format!("p·v {m} rows")],
            &[values(out)],
            std::slice::from_ref(&want),
            tol,
        );
        // The same into a view of a [batch, rows, heads, d] tensor (attention's output layout).
        let out = strata::nn::fused::kernel::matmul_heads_last(scores, v.clone());
        assert_close(
            &[&format!("p·v heads last {m} rows")],
            &[values(out)],
            &[want],
            tol,
        );
    }
}
