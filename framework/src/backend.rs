//! The backends compiled into this build and the names `--backend` selects them by.
//!
//! CPU: `flex` (the default) and `ndarray` are always built. `flex` is the default because it
//! was as fast as `ndarray` on our training benchmark and, unlike `ndarray`, gave bit-identical
//! loss curves across runs of the same seed (see README's performance section). `wgpu` (Vulkan/Metal/DX12) and
//! `cuda` (NVRTC, CUDA 11.4–13.x) are cargo features.

/// The CPU backend used by default and by the tests.
pub type Cpu = burn::backend::Flex;
pub type NdArray = burn::backend::NdArray<f32>;
pub type Flex = burn::backend::Flex;
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu<f32, i32>;
#[cfg(feature = "cuda")]
pub type Cuda<F = f32> = burn::backend::Cuda<F, i32>;

/// Backend names this build can run, default first.
pub fn available() -> Vec<&'static str> {
    let mut names = vec!["flex", "ndarray"];
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    names
}
