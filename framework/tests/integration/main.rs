//! The integration tests, one module per area, built as one test binary: every file used to be
//! its own binary, and each linked strata and instantiated Burn's generic code again (most of
//! the test suite's build time).
//!
//! Tests run one at a time (`RUST_TEST_THREADS=1` in `.cargo/config.toml`): Burn's CPU backends
//! draw every random tensor from one process-wide RNG, so a test that seeds and initialises a
//! model would see other tests' draws interleaved with its own, and training runs report the
//! process's peak memory. Each test's tensor ops still use every core.

mod common;

mod attnres;
mod attnres_experiment;
mod coord3d;
mod finetune;
mod fused;
mod gguf;
mod gguf_export;
mod hf_parity;
mod kv_share;
mod lora;
mod mixed_precision;
mod recompute;
mod seq_block;
mod smollm2;
mod tokenizer;
mod train_resume;
