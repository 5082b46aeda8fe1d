//! Language models. One file per model family; variants are enums chosen at construction.

pub mod llama;

pub use llama::{
    AttentionKind, KvCache, Llama, ModelConfig, ResidualMode, SublayerTrace, cross_entropy,
    cross_entropy_masked,
};
