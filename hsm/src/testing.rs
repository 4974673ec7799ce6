//! Test support (feature `testing`): throw-away SoftHSM2 tokens, one process per test.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` (which names its token directory) once, in `C_Initialize`, and a
//! PKCS#11 module is initialised once per process. So [`isolated`] re-executes the test binary for
//! just the one test (`<test> --exact`), with `SOFTHSM2_CONF` set on that child only, after
//! creating fresh tokens with `softhsm2-util`; the parent fails unless the child reports exactly
//! one passed test. No test mutates its own environment, and a test that breaks its token cannot
//! disturb another. Used by every crate whose tests need an HSM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{HsmConfig, PinSource, TokenSelector};

/// Where Debian's `softhsm2` package installs the module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// User PIN of every test token.
pub const USER_PIN: &str = "user-pin-1234";
/// SO PIN of every test token.
pub const SO_PIN: &str = "so-pin-5678";

const CHILD_VAR: &str = "QUTEMAIL_SOFTHSM_TEST_CHILD";
const DIR_VAR: &str = "QUTEMAIL_SOFTHSM_TEST_DIR";

/// A test's SoftHSM set-up: its scratch directory, token directory and PIN file.
#[derive(Debug, Clone)]
pub struct SoftHsmEnv {
    /// Scratch directory of the test (holds the configuration, tokens and PIN file; free for
    /// the test's own files too).
    pub dir: PathBuf,
    /// The SoftHSM token directory.
    pub token_dir: PathBuf,
    /// A file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
}

impl SoftHsmEnv {
    /// A configuration for the token labelled `token`, PIN from the file, wrapping key
    /// `key_label`, default mechanism and pool.
    pub fn config(&self, token: &str, key_label: &str) -> HsmConfig {
        HsmConfig::new(
            SOFTHSM_MODULE,
            TokenSelector::Label(token.into()),
            PinSource::File(self.pin_file.clone()),
            key_label,
        )
    }
}

/// Fails with the command to run when SoftHSM2 is not installed (tests never skip).
pub fn require_softhsm() {
    assert!(
        Path::new(SOFTHSM_MODULE).is_file(),
        "SoftHSM2 is not installed: {SOFTHSM_MODULE} is missing. Install it with `apt-get install -y softhsm2` \
         (`cargo xtask test` does)."
    );
}

/// Creates tokens labelled `labels` in `dir/tokens`, the PIN file `dir/user.pin` and the SoftHSM2
/// configuration `dir/softhsm2.conf`, which it returns.
pub fn init_tokens(dir: &Path, labels: &[&str]) -> PathBuf {
    require_softhsm();
    let token_dir = dir.join("tokens");
    std::fs::create_dir_all(&token_dir).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            token_dir.display()
        ),
    )
    .unwrap();
    for label in labels {
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("running softhsm2-util (apt-get install -y softhsm2)");
        assert!(out.status.success(), "softhsm2-util --init-token failed: {out:?}");
    }
    let pin_file = dir.join("user.pin");
    std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    conf
}

/// Runs `body` for the test `name` (its exact path within the test binary, e.g. the function
/// name for a top-level test) in a child process with fresh tokens labelled `labels`.
pub fn isolated(name: &str, labels: &[&str], body: impl FnOnce(&SoftHsmEnv)) {
    if let Ok(child) = std::env::var(CHILD_VAR) {
        assert_eq!(child, name, "child process ran the wrong test");
        let dir = PathBuf::from(std::env::var(DIR_VAR).expect("test dir"));
        let env = SoftHsmEnv { token_dir: dir.join("tokens"), pin_file: dir.join("user.pin"), dir };
        body(&env);
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let conf = init_tokens(&dir, labels);
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_VAR, name)
        .env(DIR_VAR, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(out.status.success(), "test {name} failed in its SoftHSM child process");
    assert!(stdout.contains("test result: ok. 1 passed"), "the child process did not run test {name}");
}
