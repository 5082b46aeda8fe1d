//! The decoder on the wgpu backend (run on CI through Mesa's software Vulkan, lavapipe) against
//! transformers' logits, like `integration/hf_parity.rs` does on the CPU. Built only with `--features wgpu`.
//!
//! Tolerance 1e-3 of the largest logit: GPU kernels may reorder sums and use fused multiply-add
//! differently from the CPU; observed differences are far below that.

use crate::common;

use strata::backend::Wgpu;

#[test]
fn wgpu_logits_match_transformers() {
    common::check_logits::<Wgpu>("tiny_llama", 1e-3);
}

/// coord3d's gathered block-sparse path on wgpu against the dense masked path on the CPU
/// (values and gradients), same inputs; 1e-4 of the scale for the reason above.
#[test]
fn wgpu_coord3d_matches_the_cpu_masked_reference() {
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use strata::backend::Cpu;
    use strata::nn::coord3d::{Bms, bms_attention, bms_attention_masked};

    fn run<B: burn::tensor::backend::AutodiffBackend>(sparse: bool) -> Vec<Vec<f32>> {
        let bms = Bms::new(8, 2);
        let shape = [1, 2, 77, 16];
        let device = Default::default();
        let inputs = [11, 12, 13].map(|seed| {
            let mut next = common::uniform(seed);
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| next()).collect();
            Tensor::<B, 4>::from_data(TensorData::new(values, shape), &device).require_grad()
        });
        let [q, k, v] = inputs.clone();
        let positions: Vec<usize> = (0..77).collect();
        let out = if sparse {
            bms_attention(q, k, v, bms)
        } else {
            bms_attention_masked(q, k, v, &positions, &positions, bms)
        };
        let grads = (out.clone() * out.clone()).sum().backward();
        let host = |t: Tensor<B, 4>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let mut all = vec![host(out)];
        all.extend(inputs.iter().map(|x| {
            x.grad(&grads)
                .map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap())
                .unwrap()
        }));
        all
    }
    let gpu = run::<Autodiff<Wgpu>>(true);
    let cpu = run::<Autodiff<Cpu>>(false);
    common::assert_close(&["out", "dq", "dk", "dv"], &gpu, &cpu, 1e-4);
}
