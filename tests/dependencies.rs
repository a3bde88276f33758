//! The library's dependencies are what the library uses: an application that depends on
//! `xccl` with its default features gets neither the command-line tools' crates (argument
//! parsing, log formatting, plotting, JSON) nor anything they pull in.

use std::process::Command;

/// Every package in `xccl`'s normal dependency tree with `features`, as `cargo tree` prints
/// them: `name vX.Y.Z`.
fn library_tree(features: &[&str]) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", "xccl", "-e", "normal", "--prefix", "none"])
        .args(["--offline", "--locked", "--no-default-features"]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn has(tree: &[String], krate: &str) -> bool {
    tree.iter().any(|l| l.split(' ').next() == Some(krate))
}

/// Crates only the tools use.
const TOOLS_ONLY: &[&str] = &[
    "clap",
    "tracing-subscriber",
    "regex",
    "serde_json",
    "plotters",
    "hdrhistogram",
    "rand_distr",
];

#[test]
fn the_default_library_pulls_none_of_the_tools_crates() {
    let tree = library_tree(&["shm", "tcp"]);
    assert!(has(&tree, "xccl"), "{tree:?}");
    assert!(has(&tree, "xccl-shm") && has(&tree, "xccl-tcp"), "{tree:?}");
    for krate in TOOLS_ONLY {
        assert!(
            !has(&tree, krate),
            "{krate} is in the library's tree: {tree:?}"
        );
    }
    // A bound that moves only with a deliberate change: was 70 with the tools inside.
    assert!(tree.len() <= 50, "{} crates: {tree:?}", tree.len());
}

#[test]
fn logging_is_opt_in_and_brings_no_regex() {
    let plain = library_tree(&[]);
    assert!(!has(&plain, "tracing-subscriber"), "{plain:?}");
    let logged = library_tree(&["log"]);
    assert!(has(&logged, "tracing-subscriber"), "{logged:?}");
    assert!(!has(&logged, "regex"), "{logged:?}");
}
