//! GGUF, the file format of llama.cpp: the container ([`format`]), ggml's tensor types
//! ([`quant`]), export of Strata models ([`export`]) and loading of GGUF models ([`import`]),
//! which share one table of tensor names and layouts ([`layout`]).

pub mod export;
pub mod format;
pub mod import;
pub mod layout;
pub mod quant;
pub mod tokenizer;

pub use format::{GgufHeader, Metadata, TensorInfo, Value, ValueType, read_header, write_gguf};
pub use quant::{GgmlType, dequantize, quantize};
