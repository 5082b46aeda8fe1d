//! GGUF, the file format of llama.cpp: the container ([`format`]), ggml's tensor types
//! ([`quant`]), export of Strata models ([`export`]) and loading of GGUF models ([`import`]).

pub mod export;
pub mod format;
pub mod import;
pub mod quant;

pub use format::{GgufHeader, TensorInfo, Value, ValueType, read_header, write_gguf};
pub use quant::{GgmlType, dequantize, quantize};
