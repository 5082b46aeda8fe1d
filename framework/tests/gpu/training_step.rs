//! One training step of a real (tiny, random-weight) Hugging Face Llama checkpoint on a GPU
//! backend against the same step on the CPU: the loss and the gradients of parameters from every
//! kind of layer. On the GPU the step runs through every kernel training uses there (norms,
//! rotations, attention's softmax, gate, loss, products); on the CPU through the host loops of
//! `strata::nn::fused` — two independent implementations of the same arithmetic.
//!
//! Tolerance 1e-4 of the largest entry of each gradient: f32 sums in other orders (products,
//! row reductions); the differences seen are ~1e-6.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use strata::backend::Cpu;
use strata::io::hf::load_llama;
use strata::io::params::load_safetensors;
use strata::model::cross_entropy;

use crate::common::{assert_close, fixture, values as host};

/// Loss and gradients of one step on two sequences of 40 tokens drawn from the fixture's ids.
fn step<B: AutodiffBackend>() -> Vec<Vec<f32>> {
    let device = Default::default();
    let dir = fixture("tiny_llama");
    let (_, model) = load_llama::<B>(&dir, &device).expect("fixture loads");
    let (expected, _) = load_safetensors(&dir.join("expected.safetensors")).expect("ids");
    let ids: Vec<i64> = expected["input_ids"]
        .values
        .iter()
        .map(|&v| v as i64)
        .collect();
    let (batch, seq) = (2, 40);
    let rows: Vec<Vec<i64>> = (0..batch)
        .map(|b| {
            (0..=seq)
                .map(|t| ids[(t * (b + 1) + b) % ids.len()])
                .collect()
        })
        .collect();
    let tensor = |range: std::ops::Range<usize>| {
        let flat: Vec<i64> = rows
            .iter()
            .flat_map(|r| r[range.clone()].to_vec())
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, seq]), &device)
    };
    let (inputs, targets) = (tensor(0..seq), tensor(1..seq + 1));
    let loss = cross_entropy(model.forward(inputs), targets);
    let grads = loss.backward();
    let block = |i: usize| &model.blocks[i];
    vec![
        host(loss),
        host(model.embed.weight.grad(&grads).expect("embedding")),
        host(
            block(0)
                .attn_norm
                .gamma
                .grad(&grads)
                .expect("attention norm"),
        ),
        host(block(0).attn.wq.weight.grad(&grads).expect("q projection")),
        host(block(0).attn.wo.weight.grad(&grads).expect("o projection")),
        host(block(1).mlp.w_gate.weight.grad(&grads).expect("gate")),
        host(block(1).mlp.w_down.weight.grad(&grads).expect("down")),
        host(model.norm.gamma.grad(&grads).expect("final norm")),
        host(
            model
                .lm_head
                .as_ref()
                .expect("untied head")
                .weight
                .grad(&grads)
                .expect("head"),
        ),
    ]
}

const NAMES: [&str; 9] = [
    "loss",
    "d_embedding",
    "d_attn_norm",
    "d_wq",
    "d_wo",
    "d_w_gate",
    "d_w_down",
    "d_final_norm",
    "d_lm_head",
];

fn check<B: AutodiffBackend>() {
    assert_close(&NAMES, &step::<B>(), &step::<Autodiff<Cpu>>(), 1e-4);
}

#[cfg(feature = "wgpu")]
#[test]
fn training_step_on_wgpu_matches_the_cpu() {
    check::<Autodiff<strata::backend::Wgpu>>();
}

#[cfg(feature = "cuda")]
#[test]
fn training_step_on_cuda_matches_the_cpu() {
    check::<Autodiff<strata::backend::Cuda<f32>>>();
}
