//! The machine: Debian packages the tests need, and how cargo is invoked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Debian packages the test suite needs, with why.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("softhsm2", "PKCS#11 token for the HSM key-wrapping tests"),
    ("curl", "third-party ETSI GS QKD 014 client in the KME tests"),
    ("ca-certificates", "TLS roots for apt and pip"),
    ("python3-venv", "the venv for the Python test clients"),
    (
        "prometheus",
        "promtool and a Prometheus server: metrics exposition, alert rules fired against the demo",
    ),
    (
        "systemd",
        "systemd-analyze (unit security scores, verify), systemd-socket-activate, sysusers and tmpfiles in the unit tests",
    ),
    ("postgresql", "the mail store's tests and benchmark run on PostgreSQL as well as SQLite"),
    ("openssl", "`openssl speed`, the reference in the envelope benchmark; test certificates"),
    ("swaks", "a real SMTP client in the SMTP tests"),
    ("isync", "mbsync, a real IMAP client (two-way sync) in the IMAP tests"),
    ("fetchmail", "a real POP3 client in the POP3 tests"),
    ("chromium", "the headless browser of the webmail browser tests"),
    ("chromium-driver", "chromedriver: WebDriver for chromium, driven by fantoccini in the webmail tests"),
    ("libnss3-tools", "certutil: puts the demo CA into the browser's NSS trust store for the webmail tests"),
];

/// Creates (or refreshes, when the requirements changed) the venv with the Python test clients
/// and returns its interpreter.
pub fn python_venv() -> anyhow::Result<PathBuf> {
    let requirements = workspace_root().join("tests/python-requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let venv = target_dir("py-venv");
    let stamp = venv.join("requirements.installed");
    let python = venv.join("bin/python");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let status = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .context("running python3 -m venv")?;
    if !status.success() {
        bail!("python3 -m venv {} failed (is python3-venv installed?)", venv.display());
    }
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .context("running pip install")?;
    if !status.success() {
        bail!("pip install -r {} failed", requirements.display());
    }
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo`, as the one running us (so toolchain and flags match).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// The directory where cargo puts binaries for `profile`.
pub fn target_dir(profile: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let base = if base.is_absolute() { base } else { workspace_root().join(base) };
    base.join(profile)
}

pub fn is_root() -> bool {
    // SAFETY-free check: `id -u` avoids a libc dependency for one call.
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn missing_packages(packages: &[&str]) -> Vec<String> {
    packages
        .iter()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| (*p).to_string())
        .collect()
}

/// Makes sure the Debian packages are installed, installing them when allowed and root.
pub fn ensure_packages(packages: &[(&str, &str)], install: bool) -> anyhow::Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        eprintln!("xtask: not a Debian system; assuming the test dependencies are installed");
        return Ok(());
    }
    let names: Vec<&str> = packages.iter().map(|(n, _)| *n).collect();
    let missing = missing_packages(&names);
    if missing.is_empty() {
        return Ok(());
    }
    if !install || !is_root() {
        let why: Vec<String> = packages
            .iter()
            .filter(|(n, _)| missing.iter().any(|m| m == n))
            .map(|(n, w)| format!("  {n}: {w}"))
            .collect();
        bail!(
            "missing Debian packages (run `cargo xtask test` as root to install them):\n{}",
            why.join("\n")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let status = Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
