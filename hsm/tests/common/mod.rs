//! Test harness: every test runs against its own SoftHSM2 token directory,
//! in its own process.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` (which names the token directory) once, in
//! `C_Initialize`, and a PKCS#11 module is initialised once per process. So
//! tests that share a process would share a token directory, and setting
//! the variable from a test thread races with every other thread reading the
//! environment. Instead each `#[test]` re-executes the test binary for just
//! itself (`<test> --exact`), with `SOFTHSM2_CONF` set on that child process
//! only (`Command::env`). The parent prepares the token with
//! `softhsm2-util --init-token`, also with the variable set for that child
//! only, and fails unless the child reports exactly one passed test. No test
//! ever mutates its own environment, and a test that breaks its token
//! (deleting the directory, closing all sessions) cannot disturb another.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qutemail_hsm::{HsmConfig, PinSource, TokenSelector, WrapMechanism};

/// Where Debian's `softhsm2` package installs the module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Token created for every test.
pub const TOKEN_LABEL: &str = "qutemail-test";
/// Second token created for every test (to check selection).
pub const OTHER_TOKEN_LABEL: &str = "qutemail-other";
/// User PIN of both tokens.
pub const USER_PIN: &str = "user-pin-1234";
/// SO PIN of both tokens.
pub const SO_PIN: &str = "so-pin-5678";
/// Environment variable through which some tests pass the PIN.
pub const PIN_ENV: &str = "QUTEMAIL_HSM_TEST_PIN";

const CHILD_VAR: &str = "QUTEMAIL_HSM_TEST_CHILD";
const DIR_VAR: &str = "QUTEMAIL_HSM_TEST_DIR";

/// What a test body gets: its private directory layout.
pub struct TestEnv {
    /// Scratch directory of this test (holds conf, tokens, pin file).
    pub dir: PathBuf,
    /// The SoftHSM token directory.
    pub token_dir: PathBuf,
    /// A file holding the correct user PIN (mode 0600).
    pub pin_file: PathBuf,
}

impl TestEnv {
    /// A configuration for the test token, PIN from file.
    pub fn config(&self, key_label: &str, mechanism: WrapMechanism, pool_size: usize) -> HsmConfig {
        let mut cfg = HsmConfig::new(
            SOFTHSM_MODULE,
            TokenSelector::Label(TOKEN_LABEL.into()),
            PinSource::File(self.pin_file.clone()),
            key_label,
        );
        cfg.mechanism = mechanism;
        cfg.pool_size = pool_size;
        cfg
    }

    /// Writes `pin` to a new file and returns its path.
    pub fn write_pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, format!("{pin}\n")).unwrap();
        set_mode_0600(&path);
        path
    }
}

/// The RFC 5649 mechanism as SoftHSM 2.6.1 numbers it.
pub fn kwp() -> WrapMechanism {
    WrapMechanism::AesKeyWrapPad { mechanism_id: qutemail_hsm::CKM_AES_KEY_WRAP_PAD_PRE_V3 }
}

/// Both mechanisms.
pub fn mechanisms() -> [WrapMechanism; 2] {
    [kwp(), WrapMechanism::AesGcm]
}

fn set_mode_0600(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Fails (never skips) when SoftHSM2 is not installed.
pub fn require_softhsm() {
    assert!(
        Path::new(SOFTHSM_MODULE).is_file(),
        "SoftHSM2 is not installed: {SOFTHSM_MODULE} is missing. These tests need a real PKCS#11 \
         token; install it with `apt-get install -y softhsm2`."
    );
    let util = Command::new("softhsm2-util").arg("--version").output();
    assert!(
        matches!(&util, Ok(o) if o.status.success()),
        "softhsm2-util is not runnable ({util:?}); install it with `apt-get install -y softhsm2`."
    );
}

/// Runs `body` for test `name` in a fresh process with a fresh SoftHSM2
/// token directory holding two initialised tokens. `name` must be the
/// test function's name.
pub fn isolated(name: &str, body: impl FnOnce(&TestEnv)) {
    if let Ok(child) = std::env::var(CHILD_VAR) {
        assert_eq!(child, name, "child process ran the wrong test");
        let dir = PathBuf::from(std::env::var(DIR_VAR).expect("test dir"));
        let env = TestEnv { token_dir: dir.join("tokens"), pin_file: dir.join("user.pin"), dir };
        body(&env);
        return;
    }

    require_softhsm();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let token_dir = dir.join("tokens");
    std::fs::create_dir(&token_dir).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            token_dir.display()
        ),
    )
    .unwrap();
    for label in [TOKEN_LABEL, OTHER_TOKEN_LABEL] {
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util --init-token failed: {out:?}");
    }
    let pin_file = dir.join("user.pin");
    std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
    set_mode_0600(&pin_file);

    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_VAR, name)
        .env(DIR_VAR, &dir)
        .env(PIN_ENV, USER_PIN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(out.status.success(), "test {name} failed in its SoftHSM child process");
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child process did not run test {name} (filter mismatch?)"
    );
}

/// Every regular file below `dir`, with its contents.
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out
}

/// Deterministic, distinct test key number `n` of `len` bytes (no zero
/// runs, so a match in a file is not an accident).
pub fn test_key(n: u64, len: usize) -> Vec<u8> {
    let mut state =
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (len as u64).rotate_left(32) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 | 1
        })
        .collect()
}

/// True if `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
