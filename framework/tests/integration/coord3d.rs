//! 3D-coordinate attention: the gathered block-sparse path against a scalar reference and the
//! dense masked path (values and gradients), the pruning rule's properties, M-RoPE against
//! 1-D RoPE and under shifted coordinates, and KV-cache decoding with eviction.

use crate::common;

use burn::backend::Autodiff;
use burn::prelude::*;
use strata::backend::Cpu;
use strata::model::{AttentionKind, Llama, ModelConfig};
use strata::nn::attention::{Mixing, dense_causal, dense_causal_in_passes};
use strata::nn::coord3d::{
    Bms, Coords, bms_attention, bms_attention_in_passes, bms_attention_masked,
};
use strata::train::ids_tensor;

type B = Cpu;
type AB = Autodiff<Cpu>;

fn random<Bk: Backend>(shape: [usize; 4], seed: u64) -> (Vec<f32>, Tensor<Bk, 4>) {
    let mut next = common::uniform(seed);
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| next()).collect();
    let tensor = Tensor::from_data(TensorData::new(values.clone(), shape), &Default::default());
    (values, tensor)
}

fn host<const D: usize, Bk: Backend>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// keep(I, J) written out from its definition, independently of `Bms::keeps`.
fn keep_by_definition(i: usize, j: usize, window: usize) -> bool {
    if j > i {
        return false;
    }
    let d = i - j;
    d < window
        || (1..40).any(|k| window << (k - 1) <= d && d < window << k && j.is_multiple_of(1 << k))
}

/// BMS attention from the definition, one query at a time in f64.
fn scalar_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [batch, heads, seq, dim]: [usize; 4],
    bms: Bms,
) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    let scale = 1.0 / (dim as f64).sqrt();
    for bh in 0..batch * heads {
        let row = |x: &[f32], t: usize| x[(bh * seq + t) * dim..][..dim].to_vec();
        for i in 0..seq {
            let qi = row(q, i);
            let b = bms.block_len;
            let seen: Vec<usize> = (0..=i)
                .filter(|&j| keep_by_definition(i / b, j / b, bms.window))
                .collect();
            let scores: Vec<f64> = seen
                .iter()
                .map(|&j| {
                    let kj = row(k, j);
                    qi.iter().zip(&kj).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale
                })
                .collect();
            let top = scores.iter().cloned().fold(f64::MIN, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (w, &j) in weights.iter().zip(&seen) {
                let vj = row(v, j);
                for d in 0..dim {
                    out[(bh * seq + i) * dim + d] += (w / total * vj[d] as f64) as f32;
                }
            }
        }
    }
    out
}

/// Values agree to 1e-5 of the output scale: both sum the same few dozen f32 products in a
/// different order.
#[test]
fn gathered_blocks_match_the_scalar_definition() {
    for (seq, bms) in [
        (61, Bms::new(4, 2)), // partial last block, four levels
        (64, Bms::new(4, 3)), // odd window
        (37, Bms::new(8, 1)),
    ] {
        let shape = [2, 3, seq, 8];
        let (qv, q) = random::<B>(shape, 1);
        let (kv, k) = random::<B>(shape, 2);
        let (vv, v) = random::<B>(shape, 3);
        let got = host(bms_attention(q, k, v, bms));
        let want = scalar_reference(&qv, &kv, &vv, shape, bms);
        let err = max_abs_diff(&got, &want);
        assert!(
            err < 1e-5 * max_abs(&want),
            "{bms:?} n={seq}: max |Δ| {err}"
        );
    }
}

/// Gradients of the gathered path equal those of the dense masked path within 1e-5 of their
/// scale (the masked path is Burn's own attention op with the n×n mask).
#[test]
fn gathered_gradients_match_the_dense_masked_path() {
    let bms = Bms::new(4, 2);
    let shape = [1, 2, 45, 8];
    let positions: Vec<usize> = (0..45).collect();
    let inputs = || [1, 2, 3].map(|seed| random::<AB>(shape, seed).1.require_grad());
    let (_, weight) = random::<AB>(shape, 4);
    // `Some(limit)`: the gathered path in passes of at most `limit` scores; `None`: masked.
    let grads_of = |passes: Option<usize>| {
        let [q, k, v] = inputs();
        let out = match passes {
            Some(limit) => bms_attention_in_passes(q.clone(), k.clone(), v.clone(), bms, limit),
            None => {
                bms_attention_masked(q.clone(), k.clone(), v.clone(), &positions, &positions, bms)
            }
        };
        let values = host(out.clone());
        let grads = (out * weight.clone()).sum().backward();
        let g = |t: &Tensor<AB, 4>| host(t.grad(&grads).unwrap());
        (values, [g(&q), g(&k), g(&v)])
    };
    let (sparse, sparse_grads) = grads_of(Some(usize::MAX));
    let (dense, dense_grads) = grads_of(None);
    assert!(max_abs_diff(&sparse, &dense) < 1e-5 * max_abs(&dense));
    for (name, (a, b)) in ["q", "k", "v"]
        .iter()
        .zip(sparse_grads.iter().zip(&dense_grads))
    {
        let err = max_abs_diff(a, b);
        assert!(err < 1e-5 * max_abs(b), "d{name}: max |Δ| {err}");
    }
    // In passes of one query block, and of five (12 blocks: the last pass shorter): the same outputs,
    // and the same gradients up to the order in which the passes' key gradients add (1e-6).
    let per_block = 2 * 4 * 5 * 4; // heads · b · widest list · b
    for max_scores in [1, 5 * per_block] {
        let (passes, pass_grads) = grads_of(Some(max_scores));
        assert_eq!(passes, sparse, "max_scores {max_scores}");
        for (a, b) in pass_grads.iter().zip(&sparse_grads) {
            let err = max_abs_diff(a, b);
            assert!(err <= 1e-6 * max_abs(b), "max_scores {max_scores}: {err}");
        }
    }
}

#[test]
fn a_window_covering_the_sequence_is_causal_dense_attention() {
    let shape = [2, 2, 50, 8];
    let [q, k, v] = [5, 6, 7].map(|seed| random::<B>(shape, seed).1);
    let dense = host(dense_causal(q.clone(), k.clone(), v.clone()));
    for multiscale in [true, false] {
        let bms = Bms {
            multiscale,
            ..Bms::new(8, 7) // 7 blocks ≥ ⌈50 / 8⌉
        };
        let sparse = host(bms_attention(q.clone(), k.clone(), v.clone(), bms));
        assert!(max_abs_diff(&sparse, &dense) < 1e-5 * max_abs(&dense));
    }
}

/// Checked exhaustively over block counts up to 600 and windows 1–6 (b = 1: the rule acts on
/// block indices; the token bound scales by b).
#[test]
fn pruning_rule_properties() {
    for window in 1..=6 {
        // Window only: the last W blocks, each dropped right after its last reader.
        let sliding = Bms {
            multiscale: false,
            ..Bms::new(1, window)
        };
        for i in 0..300usize {
            let want: Vec<usize> = (i.saturating_sub(window - 1)..=i).collect();
            assert_eq!(sliding.kept_blocks(i), want);
            let last = sliding.last_reader(i).unwrap();
            assert!((i..=last).all(|q| sliding.keeps(q, i)) && !sliding.keeps(last + 1, i));
            assert!(want.len() <= sliding.max_keys(i + 1));
        }
        let bms = Bms::new(1, window);
        for i in 0..600 {
            let kept = bms.kept_blocks(i);
            let defined: Vec<usize> = (0..=i)
                .filter(|&j| keep_by_definition(i, j, window))
                .collect();
            assert_eq!(kept, defined, "W={window} I={i}");
            // Causal, the local window in full, and the sink.
            assert!(kept.iter().all(|&j| j <= i));
            assert!((i.saturating_sub(window - 1)..=i).all(|j| kept.contains(&j)));
            assert_eq!(kept[0], 0, "block 0 is an attention sink");
            // The key-count bound for a sequence that ends at this block.
            assert!(
                kept.len() <= bms.max_keys(i + 1),
                "W={window} I={i}: {} blocks > bound {}",
                kept.len(),
                bms.max_keys(i + 1)
            );
        }
        for j in 0..300 {
            // Eviction: block j is read by exactly the query blocks j ..= last_reader(j), so
            // dropping it after its last reader never drops a block a later query keeps.
            match bms.last_reader(j) {
                None => assert!((j..1200).all(|i| bms.keeps(i, j))),
                Some(last) => {
                    assert!((j..=last).all(|i| bms.keeps(i, j)), "W={window} J={j}");
                    assert!((last + 1..last + 1200).all(|i| !bms.keeps(i, j)));
                }
            }
        }
    }
    // With b > 1 the bound counts tokens: n = 16k, b = 128, W = 4 → 4 + 5·3 = 19 blocks.
    let bms = Bms::new(128, 4);
    assert_eq!(bms.max_keys(16 * 1024), 128 * 19);
    let widest = (0..128).map(|i| bms.kept_blocks(i).len()).max().unwrap();
    assert!(widest * 128 <= bms.max_keys(16 * 1024));
}

fn config(block_len: usize, window: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        d_model: 48,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_hidden: 96,
        max_seq_len: 96,
        attention: AttentionKind::Coord3d,
        coord3d_sections: Some([2, 2, 2]),
        coord3d_block_len: block_len,
        coord3d_window: window,
        ..ModelConfig::default()
    }
}

fn tokens(n: usize) -> Vec<u32> {
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was"
        .bytes()
        .cycle()
        .take(n)
        .map(u32::from)
        .collect()
}

fn model(config: &ModelConfig) -> Llama<B> {
    config.validate("model.").unwrap();
    config.init::<B>(&Default::default())
}

#[test]
fn diagonal_coordinates_are_ordinary_rope_and_shifts_cancel() {
    let mut model = model(&config(4, 2));
    // Sharper attention than a fresh init's near-uniform softmax, so positions visibly matter.
    for block in &mut model.blocks {
        let attn = &mut block.attn;
        for p in [Some(&mut attn.wq), attn.wk.as_mut()].into_iter().flatten() {
            p.weight = p.weight.clone().map(|w| w * 25.0);
        }
    }
    let ids = tokens(40);
    let input = || ids_tensor::<B>(&ids, [1, ids.len()], &Default::default());
    let plain = host(model.forward(input()));
    let diagonal = Coords::diagonal(1, ids.len(), 0);
    let at = host(model.forward_at(input(), &diagonal).unwrap());
    assert!(max_abs_diff(&plain, &at) < 1e-5 * max_abs(&plain));

    // Off-diagonal coordinates (a 2-D layout), then the same moved by a common offset: the
    // scores see only differences. f32 phases of large angles round differently: 1e-4.
    let grid = Coords {
        batch: 1,
        seq: ids.len(),
        xyz: (0..ids.len() as i64).map(|t| [t, t / 8, t % 8]).collect(),
    };
    let base = host(model.forward_at(input(), &grid).unwrap());
    assert!(
        max_abs_diff(&base, &plain) > 1e-3 * max_abs(&plain),
        "the y/z axes must matter"
    );
    for delta in [[1000, -7, 3], [-5, 250, 250]] {
        let moved = host(model.forward_at(input(), &grid.shifted(delta)).unwrap());
        let err = max_abs_diff(&base, &moved);
        assert!(err < 1e-4 * max_abs(&base), "shift {delta:?}: {err}");
    }
}

#[test]
fn coordinates_are_refused_by_a_model_without_them_and_checked_for_shape() {
    let dense = model(&ModelConfig {
        attention: AttentionKind::Dense,
        coord3d_sections: None,
        ..config(4, 2)
    });
    let ids = tokens(8);
    let input = ids_tensor::<B>(&ids, [1, 8], &Default::default());
    let err = dense
        .forward_at(input.clone(), &Coords::diagonal(1, 8, 0))
        .unwrap_err();
    assert!(err.to_string().contains("model.attention"), "{err}");
    let coord = model(&config(4, 2));
    let err = coord
        .forward_at(input, &Coords::diagonal(1, 7, 0))
        .unwrap_err();
    assert!(err.to_string().contains("expected 1×8"), "{err}");
    let bad = ModelConfig {
        coord3d_sections: Some([3, 2, 2]),
        ..config(4, 2)
    };
    let err = bad.validate("model.").unwrap_err().to_string();
    assert!(
        err.contains("model.coord3d_sections") && err.contains("6 rotary pairs"),
        "{err}"
    );
}

/// The model with a window covering the sequence computes what the dense model computes.
#[test]
fn coord3d_model_with_a_full_window_equals_the_dense_model() {
    let mut model = model(&config(8, 12));
    let ids = tokens(90);
    let input = || ids_tensor::<B>(&ids, [1, ids.len()], &Default::default());
    let sparse = host(model.forward(input()));
    for block in &mut model.blocks {
        block.attn.mixing = Mixing::Dense;
    }
    let dense = host(model.forward(input()));
    assert!(max_abs_diff(&sparse, &dense) < 1e-5 * max_abs(&dense));
}

/// Decoding with the cache (a prompt chunk, then one token at a time) gives the rows of the
/// full forward, while the cache drops the blocks no later query reads.
#[test]
fn cached_decoding_with_eviction_equals_the_full_forward() {
    let bms = (4, 2);
    let model = model(&config(bms.0, bms.1));
    let ids = tokens(90);
    let device = Default::default();
    let full = host(model.forward(ids_tensor::<B>(&ids, [1, ids.len()], &device)));
    let vocab = 259;
    let mut cache = model.new_cache();
    let prompt = 13;
    let mut got = host(model.forward_cached(
        ids_tensor::<B>(&ids[..prompt], [1, prompt], &device),
        &mut cache,
    ));
    let mut largest_cache = 0;
    for t in prompt..ids.len() {
        let step =
            model.forward_cached(ids_tensor::<B>(&ids[t..t + 1], [1, 1], &device), &mut cache);
        got.extend(host(step));
        largest_cache = largest_cache.max(cache.cached_len());
    }
    assert_eq!(got.len(), full.len());
    for t in 0..ids.len() {
        let row = |x: &[f32]| x[t * vocab..(t + 1) * vocab].to_vec();
        let err = max_abs_diff(&row(&got), &row(&full));
        assert!(err < 1e-4 * max_abs(&row(&full)), "token {t}: {err}");
    }
    // The live cache: block 0, the window, and the aligned blocks of each level.
    let bound = Bms::new(bms.0, bms.1).max_keys(ids.len());
    assert!(
        largest_cache <= bound,
        "{largest_cache} cached rows > {bound}"
    );
    assert!(largest_cache < ids.len() / 2);
}

/// Tokens at grid coordinates decoded with the cache (prompt, then one at a time) give the rows
/// of the full forward at the same coordinates.
#[test]
fn cached_decoding_at_coordinates_equals_the_full_forward() {
    let model = model(&config(4, 2));
    let ids = tokens(36);
    let device = Default::default();
    let n = ids.len();
    let xyz: Vec<[i64; 3]> = (0..n as i64).map(|t| [t, 3 + t / 6, 3 + t % 6]).collect();
    let coords = |range: std::ops::Range<usize>| Coords {
        batch: 1,
        seq: range.len(),
        xyz: xyz[range].to_vec(),
    };
    let full = host(
        model
            .forward_at(ids_tensor::<B>(&ids, [1, n], &device), &coords(0..n))
            .unwrap(),
    );
    let mut cache = model.new_cache();
    let prompt = 10;
    let input = |r: std::ops::Range<usize>| ids_tensor::<B>(&ids[r.clone()], [1, r.len()], &device);
    let mut got = host(
        model
            .forward_cached_at(input(0..prompt), &coords(0..prompt), &mut cache)
            .unwrap(),
    );
    for t in prompt..n {
        let step = model.forward_cached_at(input(t..t + 1), &coords(t..t + 1), &mut cache);
        got.extend(host(step.unwrap()));
    }
    let err = max_abs_diff(&got, &full);
    assert!(err < 1e-4 * max_abs(&full), "{err}");
}

/// `data.coords = "line_col"`: batches carry line/column coordinates, the loss is the model's at
/// those coordinates (not the diagonal's), and the config refuses what cannot read them.
#[test]
fn line_col_data_trains_at_line_and_column_coordinates() {
    use strata::config::ExperimentConfig;
    use strata::data::{Dataset, Split};
    use strata::tokenizer::ByteTokenizer;
    use strata::train::batch_loss;

    let dir = std::env::temp_dir().join(format!("strata-line-col-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = "name  | count\n------+------\nalpha |    12\nbeta  |     7\n".repeat(40);
    std::fs::write(dir.join("table.txt"), &table).unwrap();
    let text = format!(
        "[model]\nattention = \"coord3d\"\nd_model = 48\nn_heads = 4\nn_layers = 2\n\
         max_seq_len = 64\n[data]\npath = \"{}\"\ncoords = \"line_col\"\n\
         [train]\nseq_len = 64\nbatch_size = 2\nsample_tokens = 0\n",
        dir.join("table.txt").display()
    );
    let config = ExperimentConfig::from_toml(&text, &[]).unwrap();
    let data = Dataset::load(&config.data, &ByteTokenizer, Split::Train, 64).unwrap();
    let batch = data.train_batch(1, 0, 0, 2, 64).unwrap();
    let coords = batch
        .coords
        .clone()
        .expect("line_col batches carry coordinates");
    assert!(coords.xyz.iter().any(|c| c[1] != c[0] || c[2] != c[0]));

    let model = model(&config.model);
    let device = Default::default();
    let (loss, _) = batch_loss(&model, &batch, &device);
    let inputs = ids_tensor::<B>(&batch.inputs, [2, 64], &device);
    let by_hand = model.forward_at(inputs.clone(), &coords).unwrap();
    let targets = ids_tensor::<B>(&batch.targets, [2, 64], &device);
    let want = strata::model::cross_entropy(by_hand, targets.clone());
    let diagonal = strata::model::cross_entropy(model.forward(inputs), targets);
    let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f32>();
    assert_eq!(scalar(loss.clone()), scalar(want));
    assert_ne!(scalar(loss), scalar(diagonal));

    for (extra, key) in [
        ("model.attention=\"dense\"", "data.coords"),
        (
            "train.activation_checkpointing=\"block\"",
            "train.activation_checkpointing",
        ),
    ] {
        let err = ExperimentConfig::from_toml(&text, &[extra.to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
}

/// Dense causal attention in passes of 1, 3 and 7 query rows equals one pass within 1e-6 of the
/// scale (the passes' key gradients add in another order).
#[test]
fn dense_attention_in_passes_equals_one_pass() {
    let shape = [1, 2, 50, 8];
    let run = |max_scores: usize| {
        let [q, k, v] = [21, 22, 23].map(|seed| random::<AB>(shape, seed).1.require_grad());
        let out = dense_causal_in_passes(q.clone(), k.clone(), v.clone(), max_scores);
        let values = host(out.clone());
        let grads = (out.clone() * out).sum().backward();
        let g = |t: &Tensor<AB, 4>| host(t.grad(&grads).unwrap());
        (values, [g(&q), g(&k), g(&v)])
    };
    let (whole, whole_grads) = run(usize::MAX);
    for rows in [1, 3, 7] {
        let (passes, grads) = run(rows * 2 * 50);
        assert!(
            max_abs_diff(&passes, &whole) <= 1e-6 * max_abs(&whole),
            "{rows} rows"
        );
        for (a, b) in grads.iter().zip(&whole_grads) {
            assert!(max_abs_diff(a, b) <= 1e-6 * max_abs(b), "{rows} rows");
        }
    }
}

/// Generation at line/column coordinates (a model trained with `data.coords = "line_col"`): the
/// KV-cache path places each new token where [`Coords::line_col`] over the whole context puts it,
/// so it picks the tokens that greedy decoding over full forward passes at those coordinates
/// picks; the coordinates change what is generated; a model without coordinates refuses them.
#[test]
fn generation_at_line_col_coordinates_follows_the_text() {
    use strata::data::line_breaks;
    use strata::infer::{Decoding, Sampler, SamplerConfig, generate};
    use strata::tokenizer::ByteTokenizer;

    let device = Default::default();
    B::seed(&device, 11);
    // Weights of a trained model's scale rather than a fresh init's (whose logits barely depend
    // on the context), so that what each position attends to decides the greedy tokens.
    let model = model(&ModelConfig {
        init_std: 0.3,
        ..config(4, 2)
    });
    let breaks = line_breaks(&ByteTokenizer);
    let prompt: Vec<u32> = "fn main() {\n    let x = 1;\n    let y"
        .bytes()
        .map(u32::from)
        .collect();
    let run = |use_cache: bool, line_breaks: Option<&[bool]>| {
        let decoding = Decoding {
            stop: None,
            use_cache,
            line_breaks,
        };
        let mut greedy = Sampler::new(SamplerConfig::greedy());
        generate(&model, &prompt, 40, &mut greedy, decoding, |_| {}).unwrap()
    };
    let cached = run(true, Some(&breaks));
    assert_eq!(cached, run(false, Some(&breaks)));

    // The reference: greedy over full forward passes at the line/column coordinates.
    let mut context = prompt.clone();
    for _ in 0..40 {
        let n = context.len();
        let at = Coords::line_col(&context, 1, n, &breaks);
        let logits = host(
            model
                .forward_at(ids_tensor::<B>(&context, [1, n], &device), &at)
                .unwrap(),
        );
        let last = &logits[(n - 1) * 259..];
        let best = (0..259)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        context.push(best as u32);
    }
    assert_eq!(cached, context[prompt.len()..]);
    assert_ne!(cached, run(true, None), "the coordinates must matter");

    let dense = self::model(&ModelConfig {
        attention: AttentionKind::Dense,
        coord3d_sections: None,
        ..config(4, 2)
    });
    let mut greedy = Sampler::new(SamplerConfig::greedy());
    let decoding = Decoding {
        line_breaks: Some(&breaks),
        ..Decoding::cached(None)
    };
    let err = generate(&dense, &prompt, 4, &mut greedy, decoding, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.attention"), "{err}");
}
