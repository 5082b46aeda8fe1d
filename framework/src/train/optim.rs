//! AdamW (Loshchilov & Hutter, arXiv 1711.05101) with decoupled weight decay, global-norm
//! gradient clipping, and state kept by parameter path so it saves to safetensors under names
//! that survive a restart (Burn's `ParamId`s do not).

use std::collections::{BTreeMap, HashMap};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::io::params::HostTensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decay embeddings (and so a tied LM head) too.
    pub decay_embeddings: bool,
    /// Decay 1-D parameters (norm gains, biases) too.
    pub decay_vectors: bool,
}

/// First and second moments of one parameter, flattened.
struct Moments<B: Backend> {
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    state: HashMap<String, Moments<B>>,
    /// Number of updates applied so far (for the bias corrections).
    pub steps: usize,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: HashMap::new(),
            steps: 0,
        }
    }

    fn decays(&self, path: &str, rank: usize) -> bool {
        if rank < 2 && !self.config.decay_vectors {
            return false;
        }
        if path.starts_with("embed") && !self.config.decay_embeddings {
            return false;
        }
        true
    }

    /// Applies one update to every parameter of `module` that has a gradient, after scaling
    /// gradients by `grad_scale` (the clipping factor).
    pub fn step<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
        grad_scale: f64,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.steps += 1;
        let mut mapper = StepMapper::<AB> {
            optim: self,
            grads: &mut grads,
            path: Vec::new(),
            lr,
            grad_scale,
        };
        module.map(&mut mapper)
    }

    /// Counts a step without updating anything (a step skipped for overflowing gradients).
    pub fn skip(&mut self) {
        self.steps += 1;
    }

    /// The moments as `<path>.exp_avg` / `<path>.exp_avg_sq` (PyTorch's names).
    pub fn state_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (path, moments) in &self.state {
            out.insert(
                format!("{path}.exp_avg"),
                HostTensor::from_tensor(&moments.m),
            );
            out.insert(
                format!("{path}.exp_avg_sq"),
                HostTensor::from_tensor(&moments.v),
            );
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, HostTensor>,
        steps: usize,
        device: &B::Device,
    ) {
        self.steps = steps;
        self.state.clear();
        for (name, m) in tensors {
            if let Some(path) = name.strip_suffix(".exp_avg")
                && let Some(v) = tensors.get(&format!("{path}.exp_avg_sq"))
            {
                self.state.insert(
                    path.to_owned(),
                    Moments {
                        m: m.to_tensor(device),
                        v: v.to_tensor(device),
                    },
                );
            }
        }
    }
}

struct StepMapper<'a, AB: AutodiffBackend> {
    optim: &'a mut AdamW<AB::InnerBackend>,
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    lr: f64,
    grad_scale: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for StepMapper<'_, AB> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.path.join(".");
        let shape = tensor.dims();
        let n: usize = shape.iter().product();
        let c = self.optim.config;
        let t = self.optim.steps as i32;
        let g = grad.reshape([n]);
        let p = tensor.inner().reshape([n]);
        let (m, v) = match self.optim.state.remove(&path) {
            Some(Moments { m, v }) => (m, v),
            None => (g.zeros_like(), g.zeros_like()),
        };
        let step = UpdateScalars {
            lr: self.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: if self.optim.decays(&path, D) {
                c.weight_decay
            } else {
                0.0
            },
            grad_scale: self.grad_scale,
            bias_correction1: 1.0 - c.beta1.powi(t),
            bias_correction2: 1.0 - c.beta2.powi(t),
        };
        let [p, m, v] = update([p, g, m, v], &step);
        self.optim.state.insert(path, Moments { m, v });

        let updated = Tensor::<AB, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// The scalars of one parameter's update at step `t`.
#[derive(Debug, Clone, Copy)]
struct UpdateScalars {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// This parameter's decoupled weight decay (0 where it is not decayed).
    weight_decay: f64,
    /// The clipping factor, applied to the gradient first.
    grad_scale: f64,
    /// `1 − β1^t`, `1 − β2^t`.
    bias_correction1: f64,
    bias_correction2: f64,
}

/// `[p, m, v]` after one update from `[p, grad, m, v]` (flattened): one kernel on the GPU
/// backends (`nn::fused::kernel::adamw`), tensor ops elsewhere.
fn update<B: Backend>(inputs: [Tensor<B, 1>; 4], s: &UpdateScalars) -> [Tensor<B, 1>; 3] {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let inputs = {
        let step = crate::nn::fused::kernel::AdamWStep {
            lr: s.lr as f32,
            beta1: s.beta1 as f32,
            beta2: s.beta2 as f32,
            eps: s.eps as f32,
            weight_decay: s.weight_decay as f32,
            grad_scale: s.grad_scale as f32,
            bias_correction1: s.bias_correction1 as f32,
            bias_correction2: s.bias_correction2 as f32,
        };
        match crate::nn::fused::kernel::adamw(inputs, step) {
            Ok(updated) => return updated,
            Err(inputs) => inputs,
        }
    };
    let [p, g, m, v] = inputs;
    let g = g.mul_scalar(s.grad_scale);
    let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2);
    let m_hat = m.clone().div_scalar(s.bias_correction1);
    let v_hat = v.clone().div_scalar(s.bias_correction2);
    let p = p.mul_scalar(1.0 - s.lr * s.weight_decay)
        - m_hat.div(v_hat.sqrt().add_scalar(s.eps)).mul_scalar(s.lr);
    [p, m, v]
}

struct SquaredNorm<'a, AB: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for SquaredNorm<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let id: ParamId = param.id;
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(id) {
            let sq = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
}

struct SquaresByPath<'a> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    out: BTreeMap<String, (f64, usize)>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for SquaresByPath<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            let count = g.shape().num_elements();
            let sum = g.square().sum().into_scalar().elem::<f64>();
            self.out.insert(self.path.join("."), (sum, count));
        }
    }
}

/// Each parameter's gradient as (sum of squares, element count), by path. One host sync per
/// parameter: for diagnostics, not for every step.
pub fn grad_squares_by_path<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> BTreeMap<String, (f64, usize)> {
    let mut visitor = SquaresByPath {
        grads,
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// The L2 norm of all gradients together (one host sync).
pub fn global_grad_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut visitor = SquaredNorm::<AB> { grads, total: None };
    module.visit(&mut visitor);
    visitor
        .total
        .map(|t| t.into_scalar().elem::<f64>().sqrt())
        .unwrap_or(0.0)
}

/// Linear warm-up to `peak`, then cosine decay to `floor` at `total` steps (step counts from 0).
pub fn learning_rate(step: usize, warmup: usize, total: usize, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    if step >= total {
        return floor;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};

    type AB = Autodiff<NdArray>;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        assert!((learning_rate(0, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 10, 100, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((learning_rate(100, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    /// Two steps of our AdamW against the update rule computed by hand in f64.
    #[test]
    fn matches_hand_computed_adamw() {
        let device = Default::default();
        let mut layer: Linear<AB> = LinearConfig::new(2, 1).with_bias(false).init(&device);
        let w0: Vec<f32> = layer.weight.val().into_data().to_vec().unwrap();
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            decay_vectors: false,
        };
        let mut optim = AdamW::<NdArray>::new(config);
        let x = Tensor::<AB, 2>::from_data([[1.0f32, -2.0]], &device);
        let (mut w, mut m, mut v) = (
            w0.iter().map(|&a| a as f64).collect::<Vec<_>>(),
            [0.0f64; 2],
            [0.0f64; 2],
        );
        let lr = 0.05;
        for t in 1..=2 {
            // loss = (x·w)², dloss/dw = 2 (x·w) x
            let y = layer.forward(x.clone()).sum();
            let loss = y.clone() * y;
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            layer = optim.step(lr, layer, grads, 1.0);
            let xw = w[0] - 2.0 * w[1];
            let g = [2.0 * xw, -4.0 * xw];
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.95 * v[i] + 0.05 * g[i] * g[i];
                let (mh, vh) = (
                    m[i] / (1.0 - 0.9f64.powi(t)),
                    v[i] / (1.0 - 0.95f64.powi(t)),
                );
                w[i] = w[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = layer.weight.val().into_data().to_vec().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-5, "{got:?} vs {w:?}");
        }
    }
}
