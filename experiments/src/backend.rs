//! `--backend` and `--dtype`: picks a compiled-in backend and calls a generic function with it.

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// One of the backends compiled in: flex (CPU, default), ndarray (CPU), wgpu, cuda.
    #[arg(long, default_value = "flex")]
    pub backend: String,
    /// Floating-point type of parameters and activations (f16/bf16 on GPU backends).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

impl BackendArgs {
    pub fn label(&self) -> String {
        format!("{}-{:?}", self.backend, self.dtype).to_lowercase()
    }

    pub fn unsupported(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "--backend {} --dtype {} is not available in this build; compiled backends: {} (f16/bf16 need a GPU backend)",
            self.backend,
            format!("{:?}", self.dtype).to_lowercase(),
            strata::backend::available().join(", ")
        )
    }
}

/// `dispatch!(args, |B, device| body)`: runs `body` with `B` bound to the selected backend type
/// (wrapped in `Autodiff` when the first token is `autodiff`) and `device` to its default device.
#[macro_export]
macro_rules! dispatch {
    (@one $wrap:ident, $B:ident, $device:ident, $body:expr, $ty:ty, $dev:expr) => {{
        type $B = $crate::backend::wrap!($wrap, $ty);
        let $device = $dev;
        $body
    }};
    ($wrap:ident, $args:expr, |$B:ident, $device:ident| $body:expr) => {{
        use $crate::backend::Dtype;
        let args = &$args;
        match (args.backend.as_str(), args.dtype) {
            ("ndarray", Dtype::F32) => dispatch!(@one $wrap, $B, $device, $body, strata::backend::NdArray, Default::default()),
            ("flex", Dtype::F32) => dispatch!(@one $wrap, $B, $device, $body, strata::backend::Flex, Default::default()),
            #[cfg(feature = "wgpu")]
            ("wgpu", Dtype::F32) => dispatch!(@one $wrap, $B, $device, $body, strata::backend::Wgpu, Default::default()),
            #[cfg(feature = "cuda")]
            ("cuda", Dtype::F32) => dispatch!(@one $wrap, $B, $device, $body, strata::backend::Cuda<f32>, Default::default()),
            #[cfg(feature = "cuda")]
            ("cuda", Dtype::F16) => dispatch!(@one $wrap, $B, $device, $body, strata::backend::Cuda<burn::tensor::f16>, Default::default()),
            #[cfg(feature = "cuda")]
            ("cuda", Dtype::Bf16) => dispatch!(@one $wrap, $B, $device, $body, strata::backend::Cuda<burn::tensor::bf16>, Default::default()),
            _ => Err(args.unsupported()),
        }
    }};
}

macro_rules! wrap {
    (autodiff, $ty:ty) => { burn::backend::Autodiff<$ty> };
    (plain, $ty:ty) => { $ty };
}
pub(crate) use wrap;
