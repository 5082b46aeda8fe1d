//! LoRA adapters against Hugging Face PEFT: fixtures from `scripts/fixtures/make_peft_fixtures.py`
//! (tiny random Llama + adapters with random, non-zero A and B), logits with the adapter applied
//! and after `merge_and_unload`, compared with ours to 1e-4 of the largest logit (f32 rounding
//! over two layers is ~1e-6 relative; 1e-4 leaves room for summation order and still fails for
//! a wrong scale, a missing transpose or a dropped target).

use crate::common;

use crate::common::fixture;
use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::prelude::*;
use strata::io::hf::load_llama;
use strata::io::params::load_safetensors;
use strata::io::peft::{load_adapter, save_adapter};
use strata::model::{Llama, ModelConfig};
use strata::nn::lora::LoraConfig;
use strata::train::ids_tensor;
use strata::train::optim::grad_squares_by_path;

type B = NdArray;

fn logits<Be: Backend>(model: &Llama<Be>, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    model
        .forward(ids_tensor(ids, [1, ids.len()], &device))
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(scale > 0.1, "{what}: degenerate reference");
    assert!(
        worst <= tolerance * scale,
        "{what}: max |Δ| = {worst}, scale {scale}"
    );
}

/// The base model with the PEFT adapter applied, merged, unmerged and merged for export.
fn check_peft_fixture(name: &str) {
    let device = Default::default();
    let (_, base) = load_llama::<B>(&fixture("tiny_llama"), &device).unwrap();
    let dir = fixture(name);
    let (expected, _) = load_safetensors(&dir.join("expected.safetensors")).unwrap();
    let ids: Vec<u32> = expected["input_ids"]
        .values
        .iter()
        .map(|&v| v as u32)
        .collect();
    let base_logits = logits(&base, &ids);
    let (_, adapted) = load_adapter(base, &dir).unwrap();
    let with_adapter = logits(&adapted, &ids);
    assert_close(name, &with_adapter, &expected["logits"].values, 1e-4);
    // The adapter must matter, or the comparison above proves nothing.
    let moved = with_adapter
        .iter()
        .zip(&base_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-2,
        "{name}: the adapter barely changes the logits ({moved})"
    );

    let merged = adapted.merge_lora();
    assert_close(
        &format!("{name} merged"),
        &logits(&merged, &ids),
        &expected["merged_logits"].values,
        1e-4,
    );
    let unmerged = merged.unmerge_lora();
    assert_close(
        &format!("{name} unmerged"),
        &logits(&unmerged, &ids),
        &with_adapter,
        1e-5,
    );
    let plain = unmerged.merged_plain();
    assert_close(
        &format!("{name} merged for export"),
        &logits(&plain, &ids),
        &expected["merged_logits"].values,
        1e-4,
    );
    assert!(
        strata::io::params::named_params(&plain)
            .keys()
            .all(|k| !k.contains(".lora.")),
        "a merged model keeps no adapter tensors"
    );
}

#[test]
fn peft_adapter_on_every_projection_matches_transformers() {
    check_peft_fixture("peft_lora");
}

#[test]
fn peft_rslora_adapter_on_q_and_v_matches_transformers() {
    check_peft_fixture("peft_rslora");
}

fn tiny_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_hidden: 48,
        max_seq_len: 32,
        tie_embeddings: false,
        init_std: 0.1,
        ..ModelConfig::default()
    }
}

const IDS: [u32; 10] = [3, 17, 42, 5, 9, 63, 0, 11, 28, 7];

#[test]
fn fresh_adapters_reproduce_the_base_model_exactly() {
    let device = Default::default();
    let base: Llama<B> = tiny_config().init(&device);
    let want = logits(&base, &IDS);
    let config = LoraConfig {
        targets: ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]
            .map(String::from)
            .to_vec(),
        ..LoraConfig::default()
    };
    let adapted = base.with_lora(&config).unwrap();
    assert_eq!(logits(&adapted, &IDS), want);
}

#[test]
fn only_adapters_receive_gradients() {
    type AB = Autodiff<NdArray>;
    let device = Default::default();
    let model: Llama<AB> = tiny_config().init(&device);
    let model = model
        .with_lora(&LoraConfig {
            targets: vec!["q".into(), "down".into()],
            ..LoraConfig::default()
        })
        .unwrap();
    let inputs = ids_tensor::<AB>(&IDS[..9], [1, 9], &device);
    let targets = ids_tensor::<AB>(&IDS[1..], [1, 9], &device);
    let grads = GradientsParams::from_grads(model.loss(inputs, targets).backward(), &model);
    let mut with_grads: Vec<String> = grad_squares_by_path::<AB, _>(&model, &grads)
        .into_iter()
        .filter(|(_, (sum, _))| sum.is_finite())
        .map(|(path, _)| path)
        .collect();
    with_grads.sort();
    let mut want = Vec::new();
    for layer in 0..2 {
        for projection in ["attn.wq", "mlp.w_down"] {
            for which in ["a", "b"] {
                want.push(format!("blocks.{layer}.{projection}.lora.{which}"));
            }
        }
    }
    want.sort();
    assert_eq!(with_grads, want);
}

#[test]
fn adapters_saved_in_peft_layout_load_back_identically() {
    let device = Default::default();
    let base: Llama<B> = tiny_config().init(&device);
    // Burn initialises parameters lazily, per clone: read them once before cloning the model.
    let base_logits = logits(&base, &IDS);
    let config = LoraConfig {
        rank: 2,
        alpha: 5.0,
        targets: vec!["v".into(), "up".into(), "lm_head".into()],
        ..LoraConfig::default()
    };
    // Non-zero B everywhere, so the round trip carries real values.
    let mut next = common::uniform(99);
    let mut adapted = base.clone().with_lora(&config).unwrap();
    let randomize = |t: Tensor<B, 2>, next: &mut dyn FnMut() -> f32| {
        let dims = t.dims();
        let values: Vec<f32> = (0..dims[0] * dims[1]).map(|_| 0.3 * next()).collect();
        Tensor::<B, 2>::from_data(TensorData::new(values, dims), &Default::default())
    };
    for block in &mut adapted.blocks {
        for lora in [
            &mut block.attn.wv.as_mut().unwrap().lora,
            &mut block.mlp.w_up.lora,
        ] {
            let lora = lora.as_mut().unwrap();
            lora.b = lora.b.clone().map(|t| randomize(t, &mut next));
        }
    }
    let head = adapted.lm_head.as_mut().unwrap().lora.as_mut().unwrap();
    head.b = head.b.clone().map(|t| randomize(t, &mut next));
    let want = logits(&adapted, &IDS);
    assert_ne!(want, base_logits);

    let dir = std::env::temp_dir().join(format!("strata-lora-roundtrip-{}", std::process::id()));
    save_adapter(&adapted, &config, "tiny", &dir).unwrap();
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert!(
        text.contains("\"v_proj\"") && text.contains("\"lm_head\""),
        "{text}"
    );
    let (loaded_config, loaded) = load_adapter(base, &dir).unwrap();
    assert_eq!(loaded_config.rank, 2);
    assert_eq!(loaded_config.scale(), 2.5);
    assert_eq!(logits(&loaded, &IDS), want);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_peft_options_and_bad_targets_are_named() {
    let device = Default::default();
    let dir = std::env::temp_dir().join(format!("strata-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base: Llama<B> = tiny_config().init(&device);
    for (config, key) in [
        (
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}"#,
            "use_dora",
        ),
        (
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ".*proj"}"#,
            "target_modules",
        ),
        (
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"]}"#,
            "qkv_proj",
        ),
        (r#"{"peft_type": "IA3"}"#, "peft_type"),
    ] {
        std::fs::write(dir.join("adapter_config.json"), config).unwrap();
        let err = load_adapter(base.clone(), &dir).err().unwrap().to_string();
        assert!(
            err.contains("adapter_config.json") && err.contains(key),
            "{err}"
        );
    }
    let tied: Llama<B> = ModelConfig {
        tie_embeddings: true,
        ..tiny_config()
    }
    .init(&device);
    let err = tied
        .with_lora(&LoraConfig {
            targets: vec!["lm_head".into()],
            ..LoraConfig::default()
        })
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("lora.targets") && err.contains("untied"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An adapter written here, on the HF fixture base, with the logits we compute for it, left in
/// `target/peft-check/` for `scripts/check/peft_load.py` (which loads it with PEFT).
#[test]
fn adapter_for_the_peft_check() {
    let device = Default::default();
    let (_, base) = load_llama::<B>(&fixture("tiny_llama"), &device).unwrap();
    let config = LoraConfig {
        rank: 4,
        alpha: 12.0,
        targets: vec!["k".into(), "o".into(), "gate".into(), "down".into()],
        ..LoraConfig::default()
    };
    let mut adapted = base.with_lora(&config).unwrap();
    let mut next = common::uniform(7);
    for block in &mut adapted.blocks {
        for lora in [
            &mut block.attn.wk.as_mut().unwrap().lora,
            &mut block.attn.wo.lora,
            &mut block.mlp.w_gate.lora,
            &mut block.mlp.w_down.lora,
        ] {
            let lora = lora.as_mut().unwrap();
            lora.b = lora.b.clone().map(|t| {
                let dims = t.dims();
                let values: Vec<f32> = (0..dims[0] * dims[1]).map(|_| 0.2 * next()).collect();
                Tensor::from_data(TensorData::new(values, dims), &Default::default())
            });
        }
    }
    let ids: Vec<u32> = (0..16).map(|i| (i * 37 + 5) % 256).collect();
    let want = logits(&adapted, &ids);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peft-check");
    save_adapter(&adapted, &config, "tiny_llama", &dir.join("adapter")).unwrap();
    let expected = std::collections::BTreeMap::from([
        (
            "input_ids".to_owned(),
            strata::io::params::HostTensor {
                shape: vec![1, ids.len()],
                values: ids.iter().map(|&i| i as f32).collect(),
            },
        ),
        (
            "logits".to_owned(),
            strata::io::params::HostTensor {
                shape: vec![1, ids.len(), 256],
                values: want,
            },
        ),
    ]);
    strata::io::params::save_safetensors(
        &dir.join("expected.safetensors"),
        &expected,
        Default::default(),
    )
    .unwrap();
}

/// `lora.base_dtype = "bf16"` stores the frozen projections in bf16 and widens them where they
/// are used: the logits and the adapter gradients are exactly those of an f32 model holding the
/// bf16-rounded weights (widening bf16 to f32 is exact), and differ from the unrounded model's
/// by about bf16's rounding.
#[test]
fn bf16_base_weights_compute_like_their_rounded_f32_values() {
    use burn::tensor::{DType, FloatDType};
    use strata::backend::Cpu;
    use strata::nn::lora::BaseDType;
    type AB = Autodiff<Cpu>;
    let device = Default::default();
    AB::seed(&device, 5);
    let base: Llama<AB> = tiny_config().init(&device);
    let config = LoraConfig {
        rank: 2,
        targets: vec!["q".into(), "down".into()],
        base_dtype: BaseDType::Bf16,
        ..LoraConfig::default()
    };
    let full = logits(&base, &IDS);
    let narrow = base.clone().with_lora(&config).unwrap();
    assert_eq!(narrow.blocks[0].mlp.w_up.weight.val().dtype(), DType::BF16);
    assert_eq!(
        narrow.blocks[0]
            .attn
            .wq
            .lora
            .as_ref()
            .unwrap()
            .a
            .val()
            .dtype(),
        DType::F32
    );
    // Parameters initialise lazily, per clone: run the model once before cloning it.
    let got = logits(&narrow, &IDS);
    // The same adapters over the same (rounded) weights, held in f32.
    let widened = narrow.clone().with_projection_dtype(FloatDType::F32);
    let want = logits(&widened, &IDS);
    assert_eq!(got, want);
    let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst > 0.0 && worst < 2e-2 * scale,
        "rounding moved the logits by {worst}"
    );

    let grads = |model: &Llama<AB>| {
        let logits = model.forward(ids_tensor(&IDS, [1, IDS.len()], &device));
        let grads = GradientsParams::from_grads(logits.square().mean().backward(), model);
        grad_squares_by_path(model, &grads)
    };
    let (got, want) = (grads(&narrow), grads(&widened));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(got.keys().all(|k| k.contains(".lora.")));
    for (path, (sum, _)) in &want {
        let rel = (got[path].0 - sum).abs() / sum.max(1e-30);
        assert!(rel < 1e-9, "{path}: {} vs {sum}", got[path].0);
    }
    // Merged weights take the adapter's precision; projections without one keep their storage.
    let merged = narrow.merged_plain();
    assert_eq!(merged.blocks[0].mlp.w_down.weight.val().dtype(), DType::F32);
    assert_eq!(merged.blocks[0].mlp.w_up.weight.val().dtype(), DType::BF16);
}
