//! Builds ftvm's guests from source and leaves their ELF images where
//! `src/lib.rs` embeds them (`$OUT_DIR/elf/<name>`).
//!
//! `guests/` is a workspace of its own (freestanding, `no_std`, its own
//! rustflags and linker script), built by a nested
//! `cargo build --release --target x86_64-unknown-linux-gnu` run from that
//! directory, so that its `.cargo/config.toml` applies, into a target
//! directory under `OUT_DIR`. The traps this avoids:
//!
//! - without an explicit `--target`, the guests' `[target]` rustflags reach
//!   the build scripts of their dependencies, which then crash;
//! - the outer cargo sets `CARGO_ENCODED_RUSTFLAGS=''` for build scripts,
//!   which would silently replace the guests' rustflags (symptom: `duplicate
//!   symbol: _start`): every `CARGO_*` variable but `CARGO_HOME`, and those in
//!   [`OUTER_ONLY`], are removed from the inner cargo's environment;
//! - run from anywhere else, the inner cargo would not find the guests'
//!   `.cargo/config.toml`; its own target directory keeps its artifacts,
//!   built with other flags, apart from the outer build's.
//!
//! What the guests need besides is in the guests' workspace: the rustflags
//! and linker script (`guests/.cargo/config.toml`, `guests/rt`), and the
//! C memory functions in their own `#![no_builtins]` crate (`guests/mem`).

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{self, Command},
};

/// The one target the guests are built for: the explicit `--target` also
/// keeps the guests' `[target]` rustflags away from build scripts.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Variables of the outer build that must not reach the inner cargo, besides
/// every `CARGO_*` but `CARGO_HOME`. `CARGO_ENCODED_RUSTFLAGS` (set, empty,
/// for build scripts) would silently replace the guests' rustflags;
/// `RUSTC_WRAPPER`/`RUSTC_WORKSPACE_WRAPPER` (clippy) and the rest describe
/// the outer build, not the guests'.
const OUTER_ONLY: &[&str] = &["RUSTFLAGS", "TARGET", "HOST", "OUT_DIR", "PROFILE", "OPT_LEVEL", "DEBUG", "NUM_JOBS"];

fn main() {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env_var("OUT_DIR"));
    let guests_dir = manifest_dir.join("guests");
    let target_dir = out_dir.join("target");
    let elf_dir = out_dir.join("elf");

    track_sources(&guests_dir, &manifest_dir);
    let names = guest_names(&guests_dir);

    build_guests(&guests_dir, &target_dir);

    if let Err(err) = fs::create_dir_all(&elf_dir) {
        fail(&format!("cannot create {}: {err}", elf_dir.display()));
    }
    let built = target_dir.join(GUEST_TARGET).join("release");
    for name in &names {
        let from = built.join(name);
        let to = elf_dir.join(name);
        if let Err(err) = fs::copy(&from, &to) {
            fail(&format!(
                "the guests built, but {} is missing ({err}): guest `{name}` must be a package \
                 whose binary is named `{name}`",
                from.display()
            ));
        }
    }
    // Lets a unit test check that src/lib.rs lists every guest built here.
    println!("cargo:rustc-env=FTVM_GUESTS_BUILT={}", names.join(","));
}

/// Runs the inner cargo; on failure prints its output and stops the build.
fn build_guests(guests_dir: &Path, target_dir: &Path) {
    // The same cargo as the outer build, when cargo says which.
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(&cargo);
    command
        .current_dir(guests_dir)
        .args(["build", "--release", "--locked", "--target", GUEST_TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer =
            (key.starts_with("CARGO") && key != "CARGO_HOME") || key.starts_with("RUSTC") || OUTER_ONLY.contains(&key);
        if outer {
            command.env_remove(key);
        }
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(err) => fail(&format!(
            "cannot run `{} build` for the guests in {}: {err}",
            cargo.to_string_lossy(),
            guests_dir.display()
        )),
    };
    if !output.status.success() {
        eprintln!("--- output of the guests' cargo build ---");
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        eprintln!("--- end of the guests' cargo build ---");
        fail(&format!(
            "building the guests in {} failed ({}): see the nested cargo's output above",
            guests_dir.display(),
            output.status
        ));
    }
}

/// The guests: every directory of the guests' workspace with a
/// `src/main.rs`, by convention the name of its one binary. Sorted.
fn guest_names(guests_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = read_dir(guests_dir)
        .into_iter()
        .filter(|path| path.join("src").join("main.rs").is_file())
        .filter_map(|path| Some(path.file_name()?.to_str()?.to_owned()))
        .collect();
    names.sort();
    if names.is_empty() {
        fail(&format!("no guest found in {}", guests_dir.display()));
    }
    names
}

/// Reruns this script when a guest's source, manifest, lock file, cargo
/// config or linker script changes, or a crate outside `guests/` that guests
/// link does (the ABI crate; `resp/`, the kvstore guest's engine). The inner cargo
/// decides what actually needs rebuilding; its `target/` is not watched.
fn track_sources(guests_dir: &Path, manifest_dir: &Path) {
    for path in read_dir(guests_dir) {
        if path.file_name().is_some_and(|name| name == "target") {
            continue;
        }
        // A directory is scanned recursively by cargo.
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let root = manifest_dir.join("..");
    // The ABI crate and resp/ inherit fields from the root manifest.
    for path in [root.join("vmm/abi"), manifest_dir.join("resp"), root.join("Cargo.toml")] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|entry| Some(entry.ok()?.path())).collect(),
        Err(err) => fail(&format!("cannot list {}: {err}", dir.display())),
    }
}

fn env_var(key: &str) -> OsString {
    env::var_os(key).unwrap_or_else(|| fail(&format!("cargo did not set {key}")))
}

/// Stops the build with one clear line (no panic backtrace noise).
fn fail(message: &str) -> ! {
    eprintln!("error: guest-images: {message}");
    process::exit(1)
}
