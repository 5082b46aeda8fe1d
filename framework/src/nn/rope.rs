//! Rotary position embeddings (RoFormer, arXiv 2104.09864) in the "rotate half" layout that
//! Hugging Face Llama uses: pair (i, i + head_dim/2) rotates by angle pos · theta^(-2i/head_dim).
//! Using HF's layout means imported checkpoints need no Q/K permutation.

use burn::prelude::*;

/// Precomputed cos/sin tables, `[max_seq_len, head_dim]` each (the half-table repeated twice).
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            for j in 0..head_dim {
                let i = j % half;
                let inv_freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [max_seq_len, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` whose first token sits at position `offset`.
    pub fn apply(&self, x: Tensor<B, 4>, offset: usize) -> Tensor<B, 4> {
        let [_, _, seq, head_dim] = x.dims();
        let half = head_dim / 2;
        let cos = self.cos.clone().slice([offset..offset + seq]).unsqueeze::<4>();
        let sin = self.sin.clone().slice([offset..offset + seq]).unsqueeze::<4>();
        let x1 = x.clone().slice_dim(3, 0..half);
        let x2 = x.clone().slice_dim(3, half..head_dim);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// Compares against the textbook complex-number form computed in f64 on the host.
    #[test]
    fn matches_naive_rotation() {
        let device = Default::default();
        let (heads, seq, hd, offset, theta) = (2, 5, 8, 3, 10_000.0f64);
        let rope = Rope::<NdArray>::new(hd, 16, theta, &device);
        let values: Vec<f32> = (0..heads * seq * hd).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let x = Tensor::<NdArray, 4>::from_data(TensorData::new(values.clone(), [1, heads, seq, hd]), &device);
        let out: Vec<f32> = rope.apply(x, offset).into_data().to_vec().unwrap();
        for h in 0..heads {
            for s in 0..seq {
                let base = (h * seq + s) * hd;
                for i in 0..hd / 2 {
                    let angle = (s + offset) as f64 * theta.powf(-(2.0 * i as f64) / hd as f64);
                    let (a, b) = (values[base + i] as f64, values[base + i + hd / 2] as f64);
                    let want_a = a * angle.cos() - b * angle.sin();
                    let want_b = b * angle.cos() + a * angle.sin();
                    assert!((out[base + i] as f64 - want_a).abs() < 1e-5);
                    assert!((out[base + i + hd / 2] as f64 - want_b).abs() < 1e-5);
                }
            }
        }
    }
}
