//! A Llama-style decoder: token embedding, pre-norm blocks of rotary grouped-query attention and
//! a SwiGLU MLP, final RMSNorm, LM head (tied to the embedding or not).

use burn::nn::{Embedding, EmbeddingConfig, Initializer, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::params::HostTensor;
use crate::nn::attention::{Attention, KvSource, LayerKvCache, Mixing};
use crate::nn::attnres::{DepthAttention, DepthStream};
use crate::nn::cast_to;
use crate::nn::coord3d::{Bms, Coords, default_sections};
use crate::nn::fused::loss::cross_entropy_trained;
use crate::nn::fused::norm::rms_norm_as;
use crate::nn::fused::swiglu::swiglu;
use crate::nn::lora::{BaseDType, LoraConfig, LoraLinear};
use crate::nn::rope::{Phases, Rope};

/// How the input of each sub-layer (attention or MLP) is formed from the embedding and the
/// outputs of the sub-layers before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResidualMode {
    /// `h ← h + f(norm(h))`, the pre-norm Transformer residual.
    #[default]
    Standard,
    /// `h ← (k·h + f(norm(h))) / (k + 1)` with k the sources so far: the running mean. Every
    /// reader normalises, so this only rescales the stream; it is the control that tells a gain
    /// of AttnRes apart from rescaling.
    Rescaled,
    /// Attention Residuals over every earlier sub-layer output (Full AttnRes).
    AttnresFull,
    /// Attention Residuals over `attnres_blocks` block sums (Block AttnRes).
    AttnresBlock,
}

/// How tokens attend to each other along the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Full causal softmax attention.
    #[default]
    Dense,
    /// Attention within blocks of `seq_block_len` tokens plus mean summaries of the
    /// `seq_block_summaries` blocks before (0: all of them). Not AttnRes: see `nn::seq_block`.
    SeqBlock,
    /// 3D-coordinate attention: rotary pairs split over the (x, y, z) axes of each token's
    /// coordinates, and block multi-scale pruning, O(n log n) (see `nn::coord3d`).
    Coord3d,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; unset means `n_heads` (multi-head attention).
    pub n_kv_heads: Option<usize>,
    pub ffn_hidden: usize,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialisation (GPT-2's 0.02).
    pub init_std: f64,
    pub residual: ResidualMode,
    /// N, the number of blocks the 2·n_layers sub-layers form under `residual = "attnres_block"`
    /// (the paper uses about 8). N = 2·n_layers is Full AttnRes.
    pub attnres_blocks: usize,
    pub attention: AttentionKind,
    /// Tokens per block under `attention = "seq_block"`.
    pub seq_block_len: usize,
    /// Earlier-block summaries each query sees under `attention = "seq_block"`; 0 means all.
    pub seq_block_summaries: usize,
    /// Rotary pairs following the x, y and z coordinates under `attention = "coord3d"`,
    /// interleaved; they sum to head_dim / 2. Unset: as even a split as possible.
    pub coord3d_sections: Option<[usize; 3]>,
    /// Tokens per block of the block multi-scale pruning (`attention = "coord3d"`).
    pub coord3d_block_len: usize,
    /// Blocks of the local window every query reads in full (`attention = "coord3d"`).
    pub coord3d_window: usize,
    /// `false` keeps the window alone (sliding-window attention): the baseline for what the
    /// multi-scale levels and the sink add (`attention = "coord3d"`).
    pub coord3d_multiscale: bool,
    /// Layers per cross-layer KV sharing group: the first layer of each group projects keys and
    /// values, the others attend over them (1: every layer its own).
    pub kv_share: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 259,
            d_model: 256,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: None,
            ffn_hidden: 688,
            max_seq_len: 256,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.02,
            residual: ResidualMode::Standard,
            attnres_blocks: 8,
            attention: AttentionKind::Dense,
            seq_block_len: 64,
            seq_block_summaries: 0,
            coord3d_sections: None,
            coord3d_block_len: 128,
            coord3d_window: 4,
            coord3d_multiscale: true,
            kv_share: 1,
        }
    }
}

impl ModelConfig {
    /// Checks every constraint; the error names the key (under `prefix`, e.g. "model.").
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let key = |k: &str| format!("{prefix}{k}");
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.kv_heads()),
            ("ffn_hidden", self.ffn_hidden),
            ("max_seq_len", self.max_seq_len),
            ("kv_share", self.kv_share),
        ] {
            if value == 0 {
                return Err(Error::config(key(name), 0, "must be at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                key("n_heads"),
                self.n_heads,
                format!("must divide {} = {}", key("d_model"), self.d_model),
            ));
        }
        if !self.n_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::config(
                key("n_kv_heads"),
                self.kv_heads(),
                format!("must divide {} = {}", key("n_heads"), self.n_heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                key("n_heads"),
                self.n_heads,
                format!(
                    "d_model / n_heads = {} must be even for rotary embeddings",
                    self.head_dim()
                ),
            ));
        }
        for (name, value) in [
            ("rope_theta", self.rope_theta),
            ("norm_eps", self.norm_eps),
            ("init_std", self.init_std),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::config(key(name), value, "must be a positive number"));
            }
        }
        if self.attention == AttentionKind::SeqBlock && self.seq_block_len == 0 {
            return Err(Error::config(key("seq_block_len"), 0, "must be at least 1"));
        }
        if self.attention == AttentionKind::Coord3d {
            for (name, value) in [
                ("coord3d_block_len", self.coord3d_block_len),
                ("coord3d_window", self.coord3d_window),
            ] {
                if value == 0 {
                    return Err(Error::config(key(name), 0, "must be at least 1"));
                }
            }
        }
        if let Some(sections) = self.coord3d_sections {
            let pairs = self.head_dim() / 2;
            if self.attention != AttentionKind::Coord3d {
                return Err(Error::config(
                    key("coord3d_sections"),
                    format!("{sections:?}"),
                    format!("unset unless {} = \"coord3d\"", key("attention")),
                ));
            }
            if sections.iter().sum::<usize>() != pairs {
                return Err(Error::config(
                    key("coord3d_sections"),
                    format!("{sections:?}"),
                    format!("three counts summing to head_dim / 2 = {pairs} rotary pairs"),
                ));
            }
        }
        if self.residual == ResidualMode::AttnresBlock {
            let sublayers = 2 * self.n_layers;
            let n = self.attnres_blocks;
            if n == 0 || n > sublayers || !sublayers.is_multiple_of(n) {
                return Err(Error::config(
                    key("attnres_blocks"),
                    n,
                    format!(
                        "must divide the {sublayers} sub-layers (2 × {} = {})",
                        key("n_layers"),
                        self.n_layers
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sub-layers per AttnRes block, or `None` when the residual is not AttnRes.
    pub fn attnres_block_len(&self) -> Option<usize> {
        match self.residual {
            ResidualMode::Standard | ResidualMode::Rescaled => None,
            ResidualMode::AttnresFull => Some(1),
            ResidualMode::AttnresBlock => Some(2 * self.n_layers / self.attnres_blocks),
        }
    }

    fn mixing(&self) -> Mixing {
        match self.attention {
            AttentionKind::Dense => Mixing::Dense,
            AttentionKind::SeqBlock => Mixing::SeqBlock {
                block_len: self.seq_block_len,
                summaries: self.seq_block_summaries,
            },
            AttentionKind::Coord3d => Mixing::Coord3d(Bms {
                multiscale: self.coord3d_multiscale,
                ..Bms::new(self.coord3d_block_len, self.coord3d_window)
            }),
        }
    }

    /// Rotary pairs per coordinate axis, for `attention = "coord3d"`.
    pub fn coord3d_sections(&self) -> Option<[usize; 3]> {
        (self.attention == AttentionKind::Coord3d).then(|| {
            self.coord3d_sections
                .unwrap_or_else(|| default_sections(self.head_dim() / 2))
        })
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Whether layer `i` projects its own keys and values (the first of its `kv_share` group).
    pub fn owns_kv(&self, layer: usize) -> bool {
        layer.is_multiple_of(self.kv_share)
    }

    /// Parameter count, embeddings included once when tied.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let kv = self.kv_heads() * self.head_dim();
        let kv_layers = (0..self.n_layers).filter(|&i| self.owns_kv(i)).count();
        let block = 2 * d * d + 3 * d * self.ffn_hidden + 2 * d;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        // AttnRes: a pseudo-query and a key-norm gain per sub-layer and for the output.
        let depth = match self.attnres_block_len() {
            Some(_) => (2 * self.n_layers + 1) * 2 * d,
            None => 0,
        };
        self.vocab_size * d + self.n_layers * block + kv_layers * 2 * d * kv + d + head + depth
    }

    /// Matmul FLOPs per token for forward + backward (6N plus attention's 12·L·d·T, PaLM's formula).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let non_embedding = self.num_params()
            - if self.tie_embeddings {
                0
            } else {
                self.vocab_size * self.d_model
            };
        6.0 * non_embedding as f64 + 12.0 * (self.n_layers * self.d_model * seq_len) as f64
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let init = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        };
        // GPT-2 scales the projections that write into the residual stream by 1/sqrt(2·layers).
        let out_init = Initializer::Normal {
            mean: 0.0,
            std: self.init_std / (2.0 * self.n_layers as f64).sqrt(),
        };
        let attnres = self.attnres_block_len().is_some();
        let depth_attention =
            || attnres.then(|| DepthAttention::new(self.d_model, self.norm_eps, device));
        let blocks = (0..self.n_layers)
            .map(|i| Block {
                attn_res: depth_attention(),
                attn_norm: RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.norm_eps)
                    .init(device),
                attn: Attention::new(
                    self.d_model,
                    self.n_heads,
                    self.kv_heads(),
                    self.owns_kv(i),
                    self.mixing(),
                    init.clone(),
                    out_init.clone(),
                    device,
                ),
                mlp_res: depth_attention(),
                mlp_norm: RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.norm_eps)
                    .init(device),
                mlp: Mlp {
                    w_gate: linear(self.d_model, self.ffn_hidden, &init, device),
                    w_up: linear(self.d_model, self.ffn_hidden, &init, device),
                    w_down: linear(self.ffn_hidden, self.d_model, &out_init, device),
                },
            })
            .collect();
        Llama {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(init.clone())
                .init(device),
            blocks,
            output_res: depth_attention(),
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device),
            lm_head: (!self.tie_embeddings)
                .then(|| linear(self.d_model, self.vocab_size, &init, device)),
            rope: {
                let rope = Rope::new(self.head_dim(), self.max_seq_len, self.rope_theta, device);
                match self.coord3d_sections() {
                    Some(sections) => rope.with_sections(sections),
                    None => rope,
                }
            },
            residual: self.residual,
            attnres_block_len: self.attnres_block_len().unwrap_or(0),
            compute_dtype: None,
        }
    }
}

fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    init: &Initializer,
    device: &B::Device,
) -> LoraLinear<B> {
    LoraLinear::new(d_in, d_out, init, device)
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub w_gate: LoraLinear<B>,
    pub w_up: LoraLinear<B>,
    pub w_down: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// SwiGLU (Shazeer, arXiv 2002.05202): down(silu(gate(x)) · up(x)).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.w_down
            .forward(swiglu(self.w_gate.forward(x.clone()), self.w_up.forward(x)))
    }
}

/// One decoder block: two sub-layers, attention then MLP, each reading the residual stream
/// through its pre-norm (and, under AttnRes, through its depth attention first).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn_res: Option<DepthAttention<B>>,
    pub attn_norm: RmsNorm<B>,
    pub attn: Attention<B>,
    pub mlp_res: Option<DepthAttention<B>>,
    pub mlp_norm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

/// The residual stream, one variant per [`ResidualMode`]: what a sub-layer reads (`input`),
/// how its output joins (`push`) and what the final norm sees (`output`).
enum Stream<'a, B: Backend> {
    Sum(Tensor<B, 3>),
    Mean { h: Tensor<B, 3>, sources: usize },
    Depth(DepthStream<'a, B>),
}

impl<B: Backend> Stream<'_, B> {
    fn input(&mut self, layer: usize) -> Tensor<B, 3> {
        match self {
            Stream::Sum(h) | Stream::Mean { h, .. } => h.clone(),
            Stream::Depth(stream) => stream.input(layer),
        }
    }

    fn push(&mut self, layer: usize, output: Tensor<B, 3>) {
        match self {
            Stream::Sum(h) => *h = h.clone() + output,
            Stream::Mean { h, sources } => {
                let k = *sources as f64;
                *h = (h.clone() * k + output) / (k + 1.0);
                *sources += 1;
            }
            Stream::Depth(stream) => stream.push(layer, output),
        }
    }

    fn output(self) -> Tensor<B, 3> {
        match self {
            Stream::Sum(h) | Stream::Mean { h, .. } => h,
            Stream::Depth(stream) => stream.output(),
        }
    }
}

/// What one sub-layer saw and wrote, averaged over the tokens of a batch (see
/// [`Llama::forward_traced`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SublayerTrace {
    /// RMS of the sub-layer's input h_l (before its pre-norm).
    pub input_rms: f32,
    /// RMS of its output f_l(h_l); `None` for the final read.
    pub output_rms: Option<f32>,
    /// AttnRes weights over its sources (embedding/completed blocks, then the partial sum).
    pub depth_weights: Vec<f32>,
}

/// Per-layer keys and values of the tokens generated so far.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerKvCache<B>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Key/value rows held by the fullest layer: `len` for dense attention, fewer where a
    /// sparse attention has dropped keys no later query reads.
    pub fn cached_len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|layer| layer.positions.len())
            .max()
            .unwrap_or(0)
    }
}

#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    /// AttnRes: the read that forms the final hidden state from every block.
    pub output_res: Option<DepthAttention<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Option<LoraLinear<B>>,
    pub rope: Rope<B>,
    #[module(skip)]
    pub residual: ResidualMode,
    #[module(skip)]
    pub attnres_block_len: usize,
    /// Mixed precision (`train.mixed_precision`): the type the sub-layers and the LM head
    /// compute in, while the parameters, the residual stream, the norms and the loss keep the
    /// parameters' type. `None`: everything in the parameters' type.
    #[module(skip)]
    pub compute_dtype: Option<FloatDType>,
}

impl<B: Backend> Llama<B> {
    /// Logits `[batch, seq, vocab]` for tokens `[batch, seq]` starting at position 0.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let phases = self.rope.phases(0, tokens.dims()[1]);
        self.forward_from(tokens, &phases, None, None)
    }

    /// Logits for tokens `[batch, seq]` at the 3-D coordinates `coords` (`attention =
    /// "coord3d"` only; for other models the error names the key).
    pub fn forward_at(&self, tokens: Tensor<B, 2, Int>, coords: &Coords) -> Result<Tensor<B, 3>> {
        let phases = self.coord_phases(&tokens, coords, 0)?;
        Ok(self.forward_from(tokens, &phases, None, None))
    }

    /// [`Self::forward_cached`] for tokens at the 3-D coordinates `coords`.
    pub fn forward_cached_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        coords: &Coords,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let phases = self.coord_phases(&tokens, coords, cache.len)?;
        cache.len += tokens.dims()[1];
        Ok(self.forward_from(tokens, &phases, Some(&mut cache.layers), None))
    }

    fn coord_phases(
        &self,
        tokens: &Tensor<B, 2, Int>,
        coords: &Coords,
        offset: usize,
    ) -> Result<Phases<B>> {
        let [batch, seq] = tokens.dims();
        if (coords.batch, coords.seq) != (batch, seq) || coords.xyz.len() != batch * seq {
            return Err(Error::Data(format!(
                "coordinates for {}×{} tokens ({} given), expected {batch}×{seq}",
                coords.batch,
                coords.seq,
                coords.xyz.len()
            )));
        }
        self.rope.phases_at(coords, offset).ok_or_else(|| {
            Error::config(
                "model.attention",
                "a model without coordinates",
                "\"coord3d\" to run tokens at 3-D coordinates",
            )
        })
    }

    /// The forward pass, also recording per sub-layer RMS and AttnRes weights (one row per
    /// sub-layer, then one for the final read). For introspection: it syncs with the device.
    pub fn forward_traced(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Vec<SublayerTrace>) {
        let mut trace = Vec::new();
        let phases = self.rope.phases(0, tokens.dims()[1]);
        let logits = self.forward_from(tokens, &phases, None, Some(&mut trace));
        (logits, trace)
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache {
            layers: vec![None; self.blocks.len()],
            len: 0,
        }
    }

    /// Runs new tokens through the model, appending their keys and values to `cache`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let offset = cache.len;
        let seq = tokens.dims()[1];
        cache.len += seq;
        let phases = self.rope.phases(offset, seq);
        self.forward_from(tokens, &phases, Some(&mut cache.layers), None)
    }

    fn forward_from(
        &self,
        tokens: Tensor<B, 2, Int>,
        phases: &Phases<B>,
        mut cache: Option<&mut Vec<Option<LayerKvCache<B>>>>,
        mut trace: Option<&mut Vec<SublayerTrace>>,
    ) -> Tensor<B, 3> {
        let mut stream = self.stream(self.embed_tokens(tokens));
        // The keys and values of the current sharing group's first layer (`kv_share`).
        let mut shared: Option<LayerKvCache<B>> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let kv = match (&block.attn.wk, &shared) {
                (None, Some(kv)) => KvSource::Shared(kv),
                _ => KvSource::Own(cache.as_mut().map(|layers| &mut layers[i])),
            };
            let attended = self.run_block(i, block, &mut stream, phases, kv, trace.as_deref_mut());
            if block.attn.wk.is_some() {
                shared = Some(attended);
            }
        }
        let final_weights = trace
            .is_some()
            .then(|| self.depth_weights(&stream, self.output_res.as_ref()));
        let h = stream.output();
        if let (Some(trace), Some(depth_weights)) = (trace, final_weights) {
            trace.push(SublayerTrace {
                input_rms: rms(&h),
                output_rms: None,
                depth_weights,
            });
        }
        self.logits(h)
    }

    /// Decoder block `i`'s two sub-layers, attention then MLP, reading and extending `stream`.
    /// Returns the keys and values its attention read.
    fn run_block(
        &self,
        i: usize,
        block: &Block<B>,
        stream: &mut Stream<'_, B>,
        phases: &Phases<B>,
        kv: KvSource<'_, B>,
        mut trace: Option<&mut Vec<SublayerTrace>>,
    ) -> LayerKvCache<B> {
        let (attn, mlp) = (2 * i, 2 * i + 1);
        let h = stream.input(attn);
        let x = self.norm_to_compute(&block.attn_norm, h.clone());
        let (out, attended) = block.attn.forward(x, phases, kv);
        let out = cast_to(out, h.dtype());
        if let Some(trace) = trace.as_deref_mut() {
            trace.push(self.trace(stream, block.attn_res.as_ref(), &h, &out));
        }
        stream.push(attn, out);

        let h = stream.input(mlp);
        let x = self.norm_to_compute(&block.mlp_norm, h.clone());
        let out = cast_to(block.mlp.forward(x), h.dtype());
        if let Some(trace) = trace {
            trace.push(self.trace(stream, block.mlp_res.as_ref(), &h, &out));
        }
        stream.push(mlp, out);
        attended
    }

    /// The token embeddings `[batch, seq, d_model]`: the residual stream before block 0.
    pub fn embed_tokens(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        crate::nn::fused::embedding::embed(self.embed.weight.val(), tokens)
    }

    /// Whether the residual stream between two blocks is one tensor, so that a block can be run
    /// on its own ([`Self::block_forward`]); AttnRes streams carry every earlier output.
    pub fn has_single_stream(&self) -> bool {
        matches!(
            self.residual,
            ResidualMode::Standard | ResidualMode::Rescaled
        )
    }

    /// Runs block `i` alone (positions from 0) on the stream `h` that enters it and returns the
    /// stream that leaves it. Only for single-tensor streams (see [`Self::has_single_stream`])
    /// and blocks with their own keys and values (`kv_share = 1`).
    pub fn block_forward(&self, i: usize, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut stream = match self.residual {
            ResidualMode::Standard => Stream::Sum(h),
            // The running mean entering block i averages the embedding and 2·i outputs.
            ResidualMode::Rescaled => Stream::Mean {
                h,
                sources: 1 + 2 * i,
            },
            ResidualMode::AttnresFull | ResidualMode::AttnresBlock => {
                panic!("block_forward needs a single-tensor residual stream, not AttnRes")
            }
        };
        let phases = self.rope.phases(0, stream.input(2 * i).dims()[1]);
        let own = KvSource::Own(None);
        self.run_block(i, &self.blocks[i], &mut stream, &phases, own, None);
        stream.output()
    }

    /// Final norm and LM head: logits `[batch, seq, vocab]` from the last hidden state, in the
    /// compute type under mixed precision (as autocast's LM head gives them): the losses read
    /// them in f32 arithmetic ([`cross_entropy`]), so the widest activation of the step is
    /// never widened in memory.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.norm_to_compute(&self.norm, h);
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => {
                // As rows (see `LoraLinear::forward`): one product for the embedding's gradient.
                let [batch, seq, d] = x.dims();
                let rows = x.reshape([batch * seq, d]);
                let weight = cast_to(self.embed.weight.val(), rows.dtype());
                let logits = crate::nn::fused::linear::matmul_rows(rows, weight.transpose());
                logits.reshape([batch as i64, seq as i64, -1])
            }
        }
    }

    /// Computes the sub-layers and the LM head in `dtype` (mixed precision; `None`: in the
    /// parameters' type). Parameters keep their type, so their gradients and the optimizer
    /// state do too.
    pub fn with_compute_dtype(mut self, dtype: Option<FloatDType>) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// A sub-layer's (or the LM head's) input: the stream `h` normed, in the compute type.
    fn norm_to_compute(&self, norm: &RmsNorm<B>, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = self.compute_dtype.map_or(h.dtype(), Into::into);
        rms_norm_as(norm, h, dtype)
    }

    fn stream(&self, embedding: Tensor<B, 3>) -> Stream<'_, B> {
        match self.residual {
            ResidualMode::Standard => Stream::Sum(embedding),
            ResidualMode::Rescaled => Stream::Mean {
                h: embedding,
                sources: 1,
            },
            ResidualMode::AttnresFull | ResidualMode::AttnresBlock => {
                let queries = self
                    .blocks
                    .iter()
                    .flat_map(|b| [&b.attn_res, &b.mlp_res])
                    .chain([&self.output_res])
                    .map(|q| {
                        q.as_ref()
                            .expect("AttnRes models have a depth attention per sub-layer")
                    })
                    .collect();
                Stream::Depth(DepthStream::new(
                    queries,
                    self.attnres_block_len,
                    embedding,
                    self.norm.epsilon,
                ))
            }
        }
    }

    fn trace(
        &self,
        stream: &Stream<'_, B>,
        read: Option<&DepthAttention<B>>,
        input: &Tensor<B, 3>,
        output: &Tensor<B, 3>,
    ) -> SublayerTrace {
        SublayerTrace {
            input_rms: rms(input),
            output_rms: Some(rms(output)),
            depth_weights: self.depth_weights(stream, read),
        }
    }

    /// The AttnRes weights of `read` over the stream's current sources, averaged over tokens.
    fn depth_weights(&self, stream: &Stream<'_, B>, read: Option<&DepthAttention<B>>) -> Vec<f32> {
        match (stream, read) {
            (Stream::Depth(depth), Some(read)) => {
                let (_, weights) = read.forward_with_weights(&depth.sources());
                let [batch, seq, n] = weights.dims();
                HostTensor::from_tensor(&weights.reshape([batch * seq, n]).mean_dim(0)).values
            }
            _ => Vec::new(),
        }
    }

    /// Freezes every weight and attaches fresh adapters (B = 0, so the outputs are unchanged)
    /// to the projections `config` targets; only the adapters then receive gradients.
    pub fn with_lora(self, config: &LoraConfig) -> Result<Self> {
        config.validate("lora.")?;
        if config.targets("lm_head") && self.lm_head.is_none() {
            return Err(Error::config(
                "lora.targets",
                "\"lm_head\"",
                "an untied LM head (this model ties it to the embedding)",
            ));
        }
        let model = self.no_grad().map_projections(|target, p| {
            if config.targets(target) {
                p.with_lora(config)
            } else {
                p
            }
        });
        Ok(match config.base_dtype {
            BaseDType::F32 => model,
            narrow => model.with_projection_dtype(narrow.float_dtype()),
        })
    }

    /// Stores every projection weight (attention, MLP, untied LM head) in `dtype`; each is
    /// cast to the activations' type where it is used.
    pub fn with_projection_dtype(self, dtype: FloatDType) -> Self {
        self.map_projections(|_, p| p.with_weight_dtype(dtype))
    }

    /// Folds every adapter into its base weight (adapters kept, marked merged).
    pub fn merge_lora(self) -> Self {
        self.map_projections(|_, p| p.merge())
    }

    /// Undoes [`Self::merge_lora`].
    pub fn unmerge_lora(self) -> Self {
        self.map_projections(|_, p| p.unmerge())
    }

    /// The model with adapters folded in and removed: a plain model to save or export.
    pub fn merged_plain(self) -> Self {
        self.map_projections(|_, p| p.merged_plain())
    }

    /// Applies `f` to every projection, with its LoRA target name.
    fn map_projections(mut self, f: impl Fn(&'static str, LoraLinear<B>) -> LoraLinear<B>) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|mut block| {
                let attn = &mut block.attn;
                attn.wq = f("q", attn.wq.clone());
                attn.wk = attn.wk.take().map(|p| f("k", p));
                attn.wv = attn.wv.take().map(|p| f("v", p));
                attn.wo = f("o", attn.wo.clone());
                let mlp = &mut block.mlp;
                mlp.w_gate = f("gate", mlp.w_gate.clone());
                mlp.w_up = f("up", mlp.w_up.clone());
                mlp.w_down = f("down", mlp.w_down.clone());
                block
            })
            .collect();
        self.lm_head = self.lm_head.map(|head| f("lm_head", head));
        self
    }

    pub fn max_seq_len(&self) -> usize {
        self.rope.max_seq_len()
    }

    /// Mean cross-entropy (nats per token) of predicting `targets` from `inputs`, both `[batch, seq]`.
    pub fn loss(&self, inputs: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let logits = self.forward(inputs);
        cross_entropy(logits, targets)
    }
}

fn rms<B: Backend>(x: &Tensor<B, 3>) -> f32 {
    x.clone().square().mean().sqrt().into_scalar().elem::<f32>()
}

/// Mean of −log softmax(logits)[target] over the positions where `mask` is 1 (`[batch, seq]`,
/// 0 or 1); 0 when no position counts. In f32 whatever the logits' type (a GPU kernel reads
/// narrower logits as they are; elsewhere they are widened first).
pub fn cross_entropy_masked<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let rows = batch * seq;
    let inputs = (
        logits.reshape([rows, vocab]),
        targets.reshape([rows]),
        Some(mask.reshape([rows])),
    );
    let (logits, targets, mask) = match cross_entropy_trained(inputs) {
        Ok(loss) => return loss,
        Err((logits, targets, mask)) => (logits, targets, mask.expect("given")),
    };
    let log_probs = log_softmax(logits, 1);
    let picked = log_probs
        .gather(1, targets.reshape([rows, 1]))
        .reshape([rows]);
    let counted = mask.clone().sum().clamp_min(1.0);
    (picked * mask).sum().neg() / counted
}

/// Mean of −log softmax(logits)[target] over all positions, in f32 (as
/// [`cross_entropy_masked`]).
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let rows = batch * seq;
    let inputs = (logits.reshape([rows, vocab]), targets.reshape([rows]), None);
    let (logits, targets, _) = match cross_entropy_trained(inputs) {
        Ok(loss) => return loss,
        Err(inputs) => inputs,
    };
    let log_probs = log_softmax(logits, 1);
    let picked = log_probs.gather(1, targets.reshape([rows, 1]));
    picked.mean().neg()
}
