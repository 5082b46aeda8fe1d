//! The GPU kernels' environment settings: a value the variable does not take is an error naming
//! the variable and its value (the CLI exits with it at start), never a silent default.
//!
//! Each bad value here, seen meanwhile by a test on another thread, reads as the default.

use strata::nn::fused::kernel::{SWITCH_VARS, check_environment};

/// `check_environment`'s error while `var` is `value`.
fn refusal(var: &str, value: &str) -> String {
    // SAFETY: tests on other threads read these variables at most; a bad value reads as the
    // default there.
    unsafe { std::env::set_var(var, value) };
    let result = check_environment();
    // SAFETY: as above.
    unsafe { std::env::remove_var(var) };
    result.expect_err("a bad value is refused")
}

#[test]
fn bad_kernel_settings_are_refused() {
    for var in SWITCH_VARS {
        let err = refusal(var, "yes");
        assert!(
            err.contains(&format!("{var}=\"yes\"")) && err.contains("0 (off) or 1"),
            "{err}"
        );
    }
    for bad in ["0", "two", "-1"] {
        let err = refusal("STRATA_ATTENTION_PASSES", bad);
        assert!(
            err.contains(&format!("STRATA_ATTENTION_PASSES=\"{bad}\"")),
            "{err}"
        );
    }
    assert!(refusal("STRATA_MATMUL", "fastest").contains("STRATA_MATMUL=\"fastest\""));
}
