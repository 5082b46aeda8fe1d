//! Microbenchmarks on the CPU default backend (Flex), one group per part of a model's life:
//! matmul, attention against sequence length (dense causal, coord3d's pruning, sequence-block), the
//! per-token layers (RMSNorm, RoPE, SwiGLU), GGUF quantize/dequantize per type, GGUF write and
//! read, one training step and one decoding step of a small model.
//!
//! `cargo bench -p strata-benches` (add `-- attention` to run one group); criterion keeps the
//! history under target/criterion and reports the change against the previous run.

use std::hint::black_box;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use strata::backend::Flex;
use strata::gguf::{GgmlType, dequantize, quantize};
use strata::model::ModelConfig;
use strata::nn::attention::dense_causal;
use strata::nn::coord3d::{Bms, bms_attention};
use strata::nn::rope::Rope;
use strata::nn::seq_block::seq_block_attention;
use strata::tokenizer::TokenizerConfig;

type B = Flex;
type Ad = Autodiff<Flex>;

fn random<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// Reading a value back waits for the backend to finish the work.
fn done<const D: usize>(t: Tensor<B, D>) {
    black_box(t.into_data());
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    for n in [256, 512, 1024] {
        let (a, b) = (random([n, n]), random([n, n]));
        group.throughput(Throughput::Elements((2 * n * n * n) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| done(a.clone().matmul(b.clone())))
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    let bms = Bms::new(128, 4);
    for seq in [256, 512, 1024, 2048] {
        let shape = [1, 4, seq, 64];
        let (q, k, v) = (random(shape), random(shape), random(shape));
        group.throughput(Throughput::Elements(seq as u64));
        group.bench_with_input(BenchmarkId::new("dense", seq), &seq, |bench, _| {
            bench.iter(|| done(dense_causal(q.clone(), k.clone(), v.clone())))
        });
        group.bench_with_input(BenchmarkId::new("coord3d", seq), &seq, |bench, _| {
            bench.iter(|| done(bms_attention(q.clone(), k.clone(), v.clone(), bms)))
        });
        // Sequence-block attention: blocks of 64, every earlier block's summary.
        group.bench_with_input(BenchmarkId::new("seq_block", seq), &seq, |bench, _| {
            bench.iter(|| done(seq_block_attention(q.clone(), k.clone(), v.clone(), 64, 0)))
        });
    }
    group.finish();
}

fn layers(c: &mut Criterion) {
    let device = Default::default();
    let config = ModelConfig {
        d_model: 512,
        n_heads: 8,
        n_kv_heads: Some(8),
        ffn_hidden: 1376,
        n_layers: 1,
        max_seq_len: 1024,
        ..ModelConfig::default()
    };
    let model = config.init::<B>(&device);
    let block = &model.blocks[0];
    let rope = Rope::<B>::new(64, 1024, 10_000.0, &device);
    let x = random([4, 256, 512]);
    let heads = random([4, 8, 256, 64]);
    let mut group = c.benchmark_group("layers");
    group.throughput(Throughput::Elements(4 * 256));
    group.bench_function("rmsnorm", |b| {
        b.iter(|| done(block.attn_norm.forward(x.clone())))
    });
    group.bench_function("rope", |b| b.iter(|| done(rope.apply(heads.clone(), 0))));
    group.bench_function("swiglu", |b| b.iter(|| done(block.mlp.forward(x.clone()))));
    group.finish();
}

fn gguf_types(c: &mut Criterion) {
    // One 4096×256 matrix: a multiple of every type's block (256 for the k-quants).
    let values: Vec<f32> = random::<1>([4096 * 256]).into_data().to_vec().unwrap();
    let mut group = c.benchmark_group("gguf_quantize");
    group.throughput(Throughput::Elements(values.len() as u64));
    for ty in GgmlType::ALL {
        group.bench_function(ty.name(), |b| {
            b.iter(|| black_box(quantize(ty, &values).unwrap()))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("gguf_dequantize");
    group.throughput(Throughput::Elements(values.len() as u64));
    for ty in GgmlType::ALL {
        let bytes = quantize(ty, &values).unwrap();
        group.bench_function(ty.name(), |b| {
            b.iter(|| black_box(dequantize(ty, &bytes).unwrap()))
        });
    }
    group.finish();
}

fn small_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        d_model: 256,
        n_heads: 8,
        n_kv_heads: Some(4),
        ffn_hidden: 688,
        n_layers: 4,
        max_seq_len: 256,
        ..ModelConfig::default()
    }
}

fn gguf_files(c: &mut Criterion) {
    let device = Default::default();
    let config = small_config();
    let model = config.init::<B>(&device);
    let dir = std::env::temp_dir().join(format!("strata-bench-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.gguf");
    let tokenizer = TokenizerConfig::Byte;
    let mut group = c.benchmark_group("gguf_file");
    group.sample_size(10);
    for ty in ["f32", "q8_0", "q4_k_m"] {
        let quantization = strata::gguf::Quantization::parse(ty).unwrap();
        group.bench_function(format!("write_{ty}"), |b| {
            b.iter(|| {
                strata::gguf::export::export_llama(
                    &model,
                    &config,
                    &tokenizer,
                    "bench",
                    quantization,
                    &path,
                )
                .unwrap()
            })
        });
        group.bench_function(format!("read_{ty}"), |b| {
            b.iter(|| black_box(strata::io::load_model::<B>(&path, &device).unwrap().model))
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(dir);
}

fn train_and_decode(c: &mut Criterion) {
    let device = Default::default();
    let config = small_config();
    let (batch, seq) = (8, 128);
    let tokens = |n: usize| -> Vec<i64> { (0..n).map(|i| (i * 7 % 259) as i64).collect() };
    let mut group = c.benchmark_group("step");
    group.sample_size(10);

    let model = config.init::<Ad>(&device);
    let mut optim =
        strata::train::optim::AdamW::<B>::new(strata::train::TrainConfig::default().adamw());
    let mut model = Some(model);
    let ids = Tensor::<Ad, 1, Int>::from_ints(tokens(batch * seq).as_slice(), &device)
        .reshape([batch, seq]);
    group.throughput(Throughput::Elements((batch * seq) as u64));
    group.bench_function("train", |b| {
        b.iter(|| {
            let m = model.take().unwrap();
            let loss = m.loss(ids.clone(), ids.clone());
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &m);
            let m = optim.step(1e-4, m, grads, 1.0);
            black_box(m.norm.gamma.val().into_data());
            model = Some(m);
        })
    });

    // One token after a 128-token prompt, the cache rolled back to the prompt each time.
    let model = config.init::<B>(&device);
    let prompt = Tensor::<B, 1, Int>::from_ints(tokens(seq).as_slice(), &device).reshape([1, seq]);
    let mut cache = model.new_cache();
    done(model.forward_cached(prompt, &mut cache));
    let next = Tensor::<B, 1, Int>::from_ints([5], &device).reshape([1, 1]);
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_after_128", |b| {
        b.iter(|| {
            let mut c = cache.clone();
            done(model.forward_cached(next.clone(), &mut c))
        })
    });
    group.finish();
}

criterion_group!(
    micro,
    matmul,
    attention,
    layers,
    gguf_types,
    gguf_files,
    train_and_decode
);
criterion_main!(micro);
