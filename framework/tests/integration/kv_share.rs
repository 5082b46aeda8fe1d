//! Cross-layer KV sharing (`model.kv_share`): the forward pass against a plain reading of the
//! definition, cached decoding against the full forward, and what sharing changes (parameters,
//! cache, which projections reach the logits).

use burn::prelude::*;
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::io::params::count_params_where;
use strata::model::{AttentionKind, Llama, ModelConfig};
use strata::nn::attention::{KvSource, LayerKvCache};
use strata::train::ids_tensor;

type B = Cpu;

fn config(kv_share: usize, attention: AttentionKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        d_model: 48,
        n_layers: 5,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_hidden: 96,
        max_seq_len: 64,
        attention,
        coord3d_block_len: 4,
        coord3d_window: 2,
        kv_share,
        ..ModelConfig::default()
    }
}

fn model(config: &ModelConfig) -> Llama<B> {
    config.validate("model.").unwrap();
    config.init::<B>(&Default::default())
}

fn tokens(n: usize) -> Vec<u32> {
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money"
        .bytes()
        .cycle()
        .take(n)
        .map(u32::from)
        .collect()
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The decoder written out for groups of `k` layers: layer i attends over the keys and values
/// that layer k·⌊i/k⌋ projected from its own input.
fn reference_logits(model: &Llama<B>, k: usize, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let input = ids_tensor::<B>(ids, [1, ids.len()], &device);
    let phases = model.rope.phases(0, ids.len());
    let mut h = model.embed_tokens(input);
    let mut group: Option<LayerKvCache<B>> = None;
    for (i, block) in model.blocks.iter().enumerate() {
        let x = block.attn_norm.forward(h.clone());
        let (out, kv) = if i % k == 0 {
            block.attn.forward(x, &phases, KvSource::Own(None))
        } else {
            block
                .attn
                .forward(x, &phases, KvSource::Shared(group.as_ref().unwrap()))
        };
        if i % k == 0 {
            group = Some(kv);
        }
        h = h + out;
        h = h.clone() + block.mlp.forward(block.mlp_norm.forward(h));
    }
    host(model.logits(h))
}

#[test]
fn shared_layers_read_their_group_leaders_keys_and_values() {
    for attention in [AttentionKind::Dense, AttentionKind::Coord3d] {
        let config = config(2, attention);
        let model = model(&config);
        let ids = tokens(30);
        let got = host(model.forward(ids_tensor::<B>(&ids, [1, 30], &Default::default())));
        let want = reference_logits(&model, 2, &ids);
        assert!(max_abs_diff(&got, &want) < 1e-5, "{attention:?}");
        // Layers 1 and 3 have no key/value projections; the count matches the config's.
        let owners: Vec<bool> = model.blocks.iter().map(|b| b.attn.wk.is_some()).collect();
        assert_eq!(owners, [true, false, true, false, true]);
        assert_eq!(count_params_where(&model, &|_| true), config.num_params());
    }
}

/// With layer 0's own attention output zeroed, its key projection reaches the logits only
/// through layer 1, which shares it: it matters with kv_share = 2 and not with 1.
#[test]
fn a_leaders_key_projection_reaches_the_next_layer() {
    let ids = tokens(20);
    let input = || ids_tensor::<B>(&ids, [1, 20], &Default::default());
    for (kv_share, should_matter) in [(1, false), (2, true)] {
        let mut model = model(&config(kv_share, AttentionKind::Dense));
        let wo = &mut model.blocks[0].attn.wo;
        wo.weight = wo.weight.clone().map(|w| w.zeros_like());
        let before = host(model.forward(input()));
        let wk = model.blocks[0].attn.wk.as_mut().unwrap();
        wk.weight = wk.weight.clone().map(|w| w * 3.0);
        let after = host(model.forward(input()));
        // Without sharing nothing downstream reads wk: the logits are bit-identical.
        let changed = max_abs_diff(&before, &after) > 0.0;
        assert_eq!(changed, should_matter, "kv_share = {kv_share}");
    }
}

#[test]
fn cached_decoding_with_shared_keys_equals_the_full_forward() {
    for attention in [AttentionKind::Dense, AttentionKind::Coord3d] {
        let model = model(&config(3, attention));
        let ids = tokens(40);
        let device = Default::default();
        let full = host(model.forward(ids_tensor::<B>(&ids, [1, 40], &device)));
        let mut cache = model.new_cache();
        let prompt = 9;
        let mut got = host(model.forward_cached(
            ids_tensor::<B>(&ids[..prompt], [1, prompt], &device),
            &mut cache,
        ));
        for t in prompt..ids.len() {
            let step = ids_tensor::<B>(&ids[t..t + 1], [1, 1], &device);
            got.extend(host(model.forward_cached(step, &mut cache)));
        }
        let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&got, &full);
        assert!(err < 1e-4 * scale, "{attention:?}: {err}");
    }
}

#[test]
fn kv_share_is_validated_and_refused_where_it_cannot_work() {
    let err = config(0, AttentionKind::Dense)
        .validate("model.")
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.kv_share"), "{err}");
    let text = r#"
[model]
kv_share = 2
[train]
activation_checkpointing = "block"
"#;
    let err = ExperimentConfig::from_toml(text, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.activation_checkpointing") && err.contains("kv_share"),
        "{err}"
    );
}
