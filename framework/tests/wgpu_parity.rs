//! The decoder on the wgpu backend (run on CI through Mesa's software Vulkan, lavapipe) against
//! transformers' logits, like `hf_parity.rs` does on the CPU. Built only with `--features wgpu`.
//!
//! Tolerance 1e-3 of the largest logit: GPU kernels may reorder sums and use fused multiply-add
//! differently from the CPU; observed differences are far below that.
#![cfg(feature = "wgpu")]

use std::path::Path;

use burn::prelude::*;
use strata::backend::Wgpu;
use strata::io::hf::load_llama;
use strata::io::params::load_safetensors;

#[test]
fn wgpu_logits_match_transformers() {
    let device = Default::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama");
    let (_, model) = load_llama::<Wgpu>(&dir, &device).unwrap();
    let (expected, _) = load_safetensors(&dir.join("expected.safetensors")).unwrap();
    let ids: Vec<i32> = expected["input_ids"]
        .values
        .iter()
        .map(|&v| v as i32)
        .collect();
    let n = ids.len();
    let logits = model.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &device));
    let got: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();
    let want = &expected["logits"].values;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-3 * scale, "max |Δ| = {worst}, scale {scale}");
}
