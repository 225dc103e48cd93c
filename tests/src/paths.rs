//! Where the test support finds its tools, binaries and the chart's CRDs.

use std::path::{Path, PathBuf};

/// The cache shared by the project's tools: `$ATELIER_CACHE`, else `~/.cache/atelier`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATELIER_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/atelier")
}

/// A tool built by `tests/cluster/build.sh`: `atelier-testcluster`, `kubectl`, `helm`.
pub fn tool(name: &str) -> PathBuf {
    cache_dir().join("bin").join(name)
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// The chart's CRD manifests.
pub fn crd_dir() -> PathBuf {
    workspace_root().join("charts/atelier/crds")
}

/// Where the kubelet looks for the binaries that stand in for container images:
/// `$ATELIER_BIN_DIR`, else the cargo output directory of the running executable
/// (`target/debug` for both a binary and a test executable in `target/debug/deps`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATELIER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the running executable has a path");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}
