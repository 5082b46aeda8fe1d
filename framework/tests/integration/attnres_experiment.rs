//! The tiny Attention Residuals comparison (configs/attnres/tiny_*.toml), shortened: every mode
//! starts from the same loss (zero-initialised queries make AttnRes and the rescaled control
//! compute the standard model's function) and none diverges.

use crate::common;

use std::path::Path;

use strata::config::ExperimentConfig;

const MODES: [&str; 4] = ["standard", "block", "full", "rescaled"];

#[test]
fn tiny_comparison_starts_equal_and_trains_in_every_mode() {
    let corpus = common::text_corpus("attnres");
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/attnres");
    let mut first_losses = Vec::new();
    for mode in MODES {
        let config = ExperimentConfig::load(
            &configs.join(format!("tiny_{mode}.toml")),
            &[
                format!("data.path={}", corpus.display()),
                "data.include=[]".into(),
                "data.validation=[\"doc3.txt\"]".into(),
                "train.batch_size=8".into(),
                "train.seq_len=64".into(),
                "train.max_steps=40".into(),
                "train.warmup_steps=5".into(),
                "train.eval_interval=40".into(),
                "train.eval_batches=2".into(),
                "train.checkpoint_interval=40".into(),
            ],
        )
        .unwrap();
        let dir = common::run_dir(&format!("attnres-{mode}"));
        let (losses, _, summary) = common::train_in(&config, &dir);
        let first = losses[0];
        assert!(
            summary.val_loss.is_finite() && summary.val_loss < first - 1.0,
            "{mode}: validation loss {} after 40 steps, first training loss {first}",
            summary.val_loss
        );
        assert!(dir.join("depth.csv").exists(), "{mode}: no depth.csv");
        assert_eq!(
            dir.join("depth_weights.csv").exists(),
            mode == "block" || mode == "full",
            "{mode}: depth_weights.csv is written for AttnRes runs only"
        );
        first_losses.push(first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    for (mode, loss) in MODES.iter().zip(&first_losses) {
        // Same seed, same weights, same function: the first losses differ only by f32 rounding.
        let rel = (loss - first_losses[0]).abs() / first_losses[0];
        assert!(
            rel < 1e-5,
            "{mode}: first loss {loss} vs standard {}",
            first_losses[0]
        );
    }
}
