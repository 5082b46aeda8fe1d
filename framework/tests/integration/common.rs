//! Helpers shared by the tests: fixtures, a small text corpus, seeded values, tolerance checks.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::io::hf::load_llama;
use strata::io::params::load_safetensors;
use strata::model::Llama;
use strata::tokenizer::ByteTokenizer;
use strata::train::{Event, TrainSummary, ids_tensor, train};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Loads fixture `name` through the HF importer on backend `B`, runs its prompt, and checks the
/// logits against transformers' within `tolerance` × the largest logit magnitude.
pub fn check_logits<B: Backend>(name: &str, tolerance: f32) {
    let device = Default::default();
    let dir = fixture(name);
    let (_, model) = load_llama::<B>(&dir, &device).unwrap();
    let (expected, _) = load_safetensors(&dir.join("expected.safetensors")).unwrap();
    let ids: Vec<u32> = expected["input_ids"]
        .values
        .iter()
        .map(|&v| v as u32)
        .collect();
    let want = &expected["logits"];
    let logits = model.forward(ids_tensor(&ids, [1, ids.len()], &device));
    assert_eq!(logits.dims().to_vec(), want.shape);
    let got: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();
    let scale = want.values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(scale > 0.1, "fixture logits are degenerate");
    assert!(
        worst <= tolerance * scale,
        "{name}: max |Δ| = {worst}, scale {scale}"
    );
}

/// A small folder of real English lines (four files, the last one held out by the configs that
/// use it), unique to `test` and this process.
pub fn text_corpus(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("strata-train-corpus-{test}-{}", std::process::id()));
    {
        std::fs::create_dir_all(&dir).unwrap();
        let lines = [
            "Now is the winter of our discontent made glorious summer by this sun of York;",
            "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
            "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
            "If music be the food of love, play on; give me excess of it, that, surfeiting,",
        ];
        for (i, line) in lines.iter().enumerate() {
            std::fs::write(dir.join(format!("doc{i}.txt")), line.repeat(12)).unwrap();
        }
    }
    dir
}

/// A xorshift64 stream of uniform values in [-1, 1) from a non-zero `state`: fixed test data
/// without an RNG crate or the backend's global RNG (which tests running in parallel share).
pub fn uniform(mut state: u64) -> impl FnMut() -> f32 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    }
}

/// A tensor of `shape` filled from [`uniform`] with `seed`, on the default device.
pub fn random<B: Backend, const D: usize>(seed: u64, shape: [usize; D]) -> Tensor<B, D> {
    let mut next = uniform(seed);
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| next()).collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// A tensor's values as f32, in logical order.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Each `got[i]` within `tol` times the largest |`want[i]`| entry of `want[i]`; the failure names
/// the tensor (`names[i]`), the largest difference and the scale.
pub fn assert_close(names: &[&str], got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    for (name, (a, b)) in names.iter().zip(got.iter().zip(want)) {
        assert_eq!(a.len(), b.len(), "{name}: lengths");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err <= tol * scale, "{name}: max |Δ| {err}, scale {scale}");
    }
}

/// Trains `config` on the CPU default with the byte tokenizer in a fresh run directory named
/// after `name` (removed afterwards): the training loss of every logged step, the trained
/// model and the run's summary.
pub fn train_logged(config: &ExperimentConfig, name: &str) -> (Vec<f64>, Llama<Cpu>, TrainSummary) {
    let dir = run_dir(name);
    let run = train_in(config, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// A fresh (emptied) run directory for `name`, unique to this process.
pub fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// [`train_logged`] in `dir`, which is left for the caller to inspect.
pub fn train_in(config: &ExperimentConfig, dir: &Path) -> (Vec<f64>, Llama<Cpu>, TrainSummary) {
    let mut losses = Vec::new();
    let (model, summary) = train::<Autodiff<Cpu>>(
        config,
        &ByteTokenizer,
        dir,
        false,
        "flex",
        &Default::default(),
        &mut |event| {
            if let Event::Step(metrics) = event {
                losses.push(metrics.train_loss);
            }
        },
    )
    .unwrap();
    (losses, model, summary)
}
