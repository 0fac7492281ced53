//! Each transport is opt-in: without its feature, its dependencies are not compiled at all.

use std::process::Command;

fn tree(features: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "tree",
        "--offline",
        "--locked",
        "-p",
        "aqe-agent",
        "-e",
        "normal",
    ]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn without_features_neither_s2n_quic_nor_async_nats_is_a_dependency() {
    let plain = tree(&[]);
    assert!(!plain.contains("s2n-quic"), "{plain}");
    assert!(!plain.contains("async-nats"), "{plain}");
    let quic = tree(&["quic"]);
    assert!(quic.contains("s2n-quic") && !quic.contains("async-nats"));
    let nats = tree(&["nats"]);
    assert!(nats.contains("async-nats") && !nats.contains("s2n-quic"));
}
