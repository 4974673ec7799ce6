//! Helpers for the end-to-end tests: run the project's own commands as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo` as it runs these tests, in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Runs `cargo xtask ARGS` and returns its output.
pub fn xtask(args: &[&str]) -> Output {
    cargo().args(["run", "--quiet", "-p", "xtask", "--"]).args(args).output().expect("running cargo xtask")
}
