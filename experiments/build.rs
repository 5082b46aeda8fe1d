//! Records the versions a report and a results file name: the commit this binary was built from,
//! burn and cubecl as locked, and the compiler.

fn main() {
    println!("cargo:rerun-if-changed=../Cargo.lock");
    // A new commit, or a change staged or committed, moves HEAD or the index.
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/index");
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=STRATA_GIT_COMMIT={commit}");
    let lock = std::fs::read_to_string("../Cargo.lock").unwrap_or_default();
    for (krate, var) in [
        ("burn", "STRATA_BURN_VERSION"),
        ("cubecl", "STRATA_CUBECL_VERSION"),
    ] {
        let needle = format!("name = \"{krate}\"\nversion = \"");
        let version = lock
            .find(&needle)
            .map(|i| &lock[i + needle.len()..])
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("not locked");
        println!("cargo:rustc-env={var}={version}");
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=STRATA_RUSTC_VERSION={version}");
}
