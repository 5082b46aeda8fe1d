//! The decoder on the wgpu backend (run on CI through Mesa's software Vulkan, lavapipe) against
//! transformers' logits, like `hf_parity.rs` does on the CPU. Built only with `--features wgpu`.
//!
//! Tolerance 1e-3 of the largest logit: GPU kernels may reorder sums and use fused multiply-add
//! differently from the CPU; observed differences are far below that.
#![cfg(feature = "wgpu")]

mod common;

use strata::backend::Wgpu;

#[test]
fn wgpu_logits_match_transformers() {
    common::check_logits::<Wgpu>("tiny_llama", 1e-3);
}
