//! GGUF, the file format of llama.cpp: the container ([`format`]), ggml's tensor types
//! ([`quant`], [`kquant`]), export of Strata models ([`export`]) and of their LoRA adapters
//! ([`adapter`]) and loading of GGUF models ([`import`]), which share one table of tensor names
//! and layouts ([`layout`]).

pub mod adapter;
pub mod engine;
pub mod export;
pub mod format;
pub mod import;
pub mod kquant;
pub mod layout;
pub mod preset;
pub mod quant;
pub mod tokenizer;

pub use format::{GgufHeader, Metadata, TensorInfo, Value, ValueType, read_header, write_gguf};
pub use preset::Quantization;
pub use quant::{GgmlType, dequantize, dequantize_into, quantize};
