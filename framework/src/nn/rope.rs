//! Rotary position embeddings (RoFormer, arXiv 2104.09864) in the "rotate half" layout that
//! Hugging Face Llama uses: pair (i, i + head_dim/2) rotates by angle pos · theta^(-2i/head_dim).
//! Using HF's layout means imported checkpoints need no Q/K permutation.

use burn::prelude::*;

/// Precomputed cos/sin tables, `[max_seq_len, head_dim]` each (the half-table repeated twice),
/// and the signed permutation that maps x to rotate_half(x) = (−x₂, x₁).
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    rotate_half: Tensor<B, 2>,
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
        // rotate_half as a matrix R (x·R): out[j] = −x[j + half] for j < half, x[j − half] after.
        // A tiny matmul on contiguous data is much cheaper on CPU backends than slicing the head
        // dimension in two and concatenating, which copies through strided views.
        let mut rotate = vec![0f32; head_dim * head_dim];
        for j in 0..half {
            rotate[(j + half) * head_dim + j] = -1.0;
            rotate[j * head_dim + j + half] = 1.0;
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            rotate_half: Tensor::from_data(TensorData::new(rotate, [head_dim, head_dim]), device),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x: [batch, seq, heads, head_dim]` whose first token sits at position `offset`.
    pub fn apply(&self, x: Tensor<B, 4>, offset: usize) -> Tensor<B, 4> {
        let [_, seq, _, head_dim] = x.dims();
        let table = |t: &Tensor<B, 2>| {
            t.clone()
                .slice_dim(0, offset..offset + seq)
                .reshape([1, seq, 1, head_dim])
        };
        let rotated = x.clone().matmul(self.rotate_half.clone().unsqueeze::<4>());
        x * table(&self.cos) + rotated * table(&self.sin)
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
        let values: Vec<f32> = (0..heads * seq * hd)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let x = Tensor::<NdArray, 4>::from_data(
            TensorData::new(values.clone(), [1, seq, heads, hd]),
            &device,
        );
        let out: Vec<f32> = rope.apply(x, offset).into_data().to_vec().unwrap();
        for s in 0..seq {
            for h in 0..heads {
                let base = (s * heads + h) * hd;
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
