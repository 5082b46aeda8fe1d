//! Strata: train, evaluate and sample language models on Burn, generic over the backend.
//!
//! Data flows one way: [`config::ExperimentConfig`] → [`model`] and [`data`] → [`train`] →
//! a run directory ([`io::checkpoint`]) → [`eval`] and [`infer`].

pub mod backend;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod gguf;
pub mod infer;
pub mod io;
pub mod model;
pub mod nn;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
