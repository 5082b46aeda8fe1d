//! GGUF, the file format of llama.cpp: the container ([`format`]) and ggml's tensor types
//! ([`quant`]).

pub mod export;
pub mod format;
pub mod quant;

pub use format::{GgufHeader, TensorInfo, Value, ValueType, read_header, write_gguf};
pub use quant::{GgmlType, dequantize, quantize};
