//! `cargo xtask test`: every test in the workspace, with its system dependencies in place.

use anyhow::bail;

use crate::system;

pub fn run(no_install: bool, cargo_args: &[String]) -> anyhow::Result<()> {
    system::ensure_packages(system::TEST_PACKAGES, !no_install)?;
    let python = system::python_venv()?;
    // Binaries first: end-to-end tests start the daemons as separate processes.
    let status = system::cargo().args(["build", "--workspace", "--bins"]).status()?;
    if !status.success() {
        bail!("building the workspace's binaries failed");
    }
    let status = system::cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_args)
        .env("QUTEMAIL_PYTHON", &python)
        .status()?;
    if !status.success() {
        bail!("some tests failed");
    }
    Ok(())
}
