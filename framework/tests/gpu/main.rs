//! Tests on a GPU backend, built with `--features wgpu` (CI runs them on Mesa's software
//! Vulkan) or `--features cuda`; without either the binary is empty.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

#[allow(dead_code)] // the GPU tests use a few of the shared helpers
#[path = "../integration/common.rs"]
mod common;

mod adamw;
mod elementwise;
mod flash;
mod fused;
mod matmul;
mod settings;
mod softmax;
mod training_step;
#[cfg(feature = "wgpu")]
mod wgpu_parity;
