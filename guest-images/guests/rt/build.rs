//! Puts the guests' linker script where the linker finds it.
//!
//! `.cargo/config.toml` passes `-Tftvm-guest.ld`; the linker looks for a
//! script that is not in its working directory in the library search path,
//! and a `rustc-link-search` directory of a dependency is on that path for
//! every binary that links `rt`. Because the script is an input of this
//! build script, editing it rebuilds `rt` and so relinks every guest.

use std::{env, fs, path::PathBuf};

const SCRIPT: &str = "ftvm-guest.ld";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    let source = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join(SCRIPT);
    if let Err(err) = fs::copy(&source, out_dir.join(SCRIPT)) {
        panic!("cannot copy the linker script {}: {err}", source.display());
    }
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rerun-if-changed={SCRIPT}");
    println!("cargo:rerun-if-changed=build.rs");
}
