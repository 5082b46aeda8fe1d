//! Rotary position embeddings (RoFormer, arXiv 2104.09864) in the "rotate half" layout that
//! Hugging Face Llama uses: pair (i, i + head_dim/2) rotates by angle pos · theta^(-2i/head_dim).
//! Using HF's layout means imported checkpoints need no Q/K permutation.
//!
//! Positions come either as an offset (token t sits at offset + t: the tables are sliced) or,
//! for 3D-coordinate attention, as per-token coordinates whose axes share the rotary pairs
//! (see [`super::coord3d`]).

use burn::prelude::*;

use super::cast_to;
use super::coord3d::{Coords, interleaved_axes};

/// Precomputed cos/sin tables, `[max_seq_len, head_dim]` each (the half-table repeated twice),
/// and the signed permutation that maps x to rotate_half(x) = (−x₂, x₁).
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    rotate_half: Tensor<B, 2>,
    #[module(skip)]
    theta: f64,
    /// The coordinate axis of each rotary pair, when positions may be 3-D coordinates.
    #[module(skip)]
    axes: Option<Vec<usize>>,
}

/// Where the tokens of one forward pass sit: the sequence index of the first (`offset`) and the
/// rotation of each, cos and sin `[batch or 1, seq, 1, head_dim]`.
#[derive(Debug, Clone)]
pub struct Phases<B: Backend> {
    pub offset: usize,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    rotate_half: Tensor<B, 2>,
}

impl<B: Backend> Phases<B> {
    /// Rotates `x: [batch, seq, heads, head_dim]`.
    pub fn rotate(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // Mixed precision: the GPU kernel turns bf16 activations by the f32 tables in f32 (as
        // autocast's promotion does); elsewhere the tables meet the activations in their
        // (compute) type, through the tensor ops.
        let dtype = x.dtype();
        let (cos, sin) = (self.cos.clone(), self.sin.clone());
        let x = match super::fused::rope::rotate_trained(x, cos, sin) {
            Ok(out) => return out,
            Err((x, _, _)) => x,
        };
        let rotate_half = cast_to(self.rotate_half.clone(), dtype);
        let rotated = x.clone().matmul(rotate_half.unsqueeze::<4>());
        x * cast_to(self.cos.clone(), dtype) + rotated * cast_to(self.sin.clone(), dtype)
    }
}

/// The angle per position of each of a head's rotary pairs: `θ^(−2i/head_dim)` for pair i.
pub fn inverse_frequencies(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64))
        .collect()
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let inv_freq = inverse_frequencies(theta, head_dim);
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            for j in 0..head_dim {
                let angle = pos as f64 * inv_freq[j % half];
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
            theta,
            axes: None,
        }
    }

    /// Lets positions be 3-D coordinates: `sections[a]` of the head's rotary pairs follow axis
    /// `a`, interleaved. `sections` must sum to head_dim / 2.
    pub fn with_sections(mut self, sections: [usize; 3]) -> Self {
        self.axes = Some(interleaved_axes(sections));
        self
    }

    /// Whether positions may be 3-D coordinates ([`Self::with_sections`]).
    pub fn takes_coords(&self) -> bool {
        self.axes.is_some()
    }

    pub fn max_seq_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Phases of `seq` tokens whose first sits at position `offset`.
    pub fn phases(&self, offset: usize, seq: usize) -> Phases<B> {
        let head_dim = self.cos.dims()[1];
        let table = |t: &Tensor<B, 2>| {
            t.clone()
                .slice_dim(0, offset..offset + seq)
                .reshape([1, seq, 1, head_dim])
        };
        Phases {
            offset,
            cos: table(&self.cos),
            sin: table(&self.sin),
            rotate_half: self.rotate_half.clone(),
        }
    }

    /// Phases of tokens at 3-D coordinates, the first at sequence index `offset`: pair m turns
    /// by θ_m · c[axis(m)], computed in f64. `None` unless the rope was built
    /// [`Self::with_sections`].
    pub fn phases_at(&self, coords: &Coords, offset: usize) -> Option<Phases<B>> {
        let axes = self.axes.as_ref()?;
        let [_, head_dim] = self.cos.dims();
        let half = head_dim / 2;
        let inv_freq = inverse_frequencies(self.theta, head_dim);
        let mut cos = Vec::with_capacity(coords.xyz.len() * head_dim);
        let mut sin = Vec::with_capacity(coords.xyz.len() * head_dim);
        for c in &coords.xyz {
            for j in 0..head_dim {
                let i = j % half;
                let angle = c[axes[i]] as f64 * inv_freq[i];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [coords.batch, coords.seq, 1, head_dim];
        let device = self.cos.device();
        Some(Phases {
            offset,
            cos: Tensor::from_data(TensorData::new(cos, shape), &device),
            sin: Tensor::from_data(TensorData::new(sin, shape), &device),
            rotate_half: self.rotate_half.clone(),
        })
    }

    /// Rotates `x: [batch, seq, heads, head_dim]` whose first token sits at position `offset`.
    pub fn apply(&self, x: Tensor<B, 4>, offset: usize) -> Tensor<B, 4> {
        let seq = x.dims()[1];
        self.phases(offset, seq).rotate(x)
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

    /// M-RoPE: with sections [1, 2, 1] the four pairs follow axes x, y, z, y (interleaved),
    /// each turning by its own coordinate; checked against the complex form in f64.
    #[test]
    fn coordinates_turn_each_pair_by_its_axis() {
        let device = Default::default();
        let (seq, hd, theta) = (3, 8, 10_000.0f64);
        let rope = Rope::<NdArray>::new(hd, 16, theta, &device).with_sections([1, 2, 1]);
        let coords = Coords {
            batch: 1,
            seq,
            xyz: vec![[5, -2, 9], [0, 7, 1], [40, 3, -11]],
        };
        let axis_of_pair = [0, 1, 2, 1];
        let values: Vec<f32> = (0..seq * hd)
            .map(|i| ((i * 29 % 13) as f32 - 6.0) / 4.0)
            .collect();
        let x = Tensor::<NdArray, 4>::from_data(
            TensorData::new(values.clone(), [1, seq, 1, hd]),
            &device,
        );
        let phases = rope.phases_at(&coords, 0).unwrap();
        let out: Vec<f32> = phases.rotate(x).into_data().to_vec().unwrap();
        for s in 0..seq {
            for i in 0..hd / 2 {
                let c = coords.xyz[s][axis_of_pair[i]] as f64;
                let angle = c * theta.powf(-(2.0 * i as f64) / hd as f64);
                let (a, b) = (
                    values[s * hd + i] as f64,
                    values[s * hd + i + hd / 2] as f64,
                );
                assert!(
                    (out[s * hd + i] as f64 - (a * angle.cos() - b * angle.sin())).abs() < 1e-5
                );
                assert!(
                    (out[s * hd + i + hd / 2] as f64 - (b * angle.cos() + a * angle.sin())).abs()
                        < 1e-5
                );
            }
        }
    }
}
