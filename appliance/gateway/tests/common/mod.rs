//! What the gateway's integration tests share: a site on disk (SoftHSM token, TLS from a test
//! CA, the config's site/HSM/store/TLS tables), the `qutemail` and `qutemailctl` commands an
//! operator runs, and a running `qutemail serve` with the addresses its `READY` line names.

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use qutemail_hsm::testing::SOFTHSM_MODULE;

/// A child process ended on drop (closing its standard input first ends the Python servers).
pub struct Running(pub Child, pub Option<ChildStdin>);

impl Running {
    /// The process ID (for `/proc/<pid>/fd` counts).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.1.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `[site]`, `[hsm]`, `[store]` and `[tls]` tables of a site `a.test` kept under `dir`,
/// whose HSM is the SoftHSM token `token`; tests append their listeners and policies.
pub fn site_config(dir: &Path, pin: &Path, token: &str) -> String {
    format!(
        r#"[site]
domain = "a.test"
site_keys = "{d}/site-keys.json"

[hsm]
module_path = "{SOFTHSM_MODULE}"
token = {{ label = "{token}" }}
pin = {{ file = "{pin}" }}
wrapping_key_label = "gateway-kek"

[store]
sqlite = "{d}/mail.sqlite"
blob_dir = "{d}/blobs"

[tls]
cert = "{d}/mail.pem"
key = "{d}/mail.key"
"#,
        d = dir.display(),
        pin = pin.display()
    )
}

/// A test CA named `ca_name`: the gateway's certificate for `names` as `dir/mail.{pem,key}`
/// and the CA certificate as `dir/ca.pem`.
pub fn write_tls(dir: &Path, ca_name: &str, names: &[&str]) {
    let ca = etsi014::pki::Ca::new(ca_name).unwrap();
    ca.server(names).unwrap().write(dir, "mail").unwrap();
    std::fs::write(dir.join("ca.pem"), ca.ca_pem()).unwrap();
}

/// Runs `qutemail ARGS[0] --config CONFIG ARGS[1..]` with `stdin` as its input.
pub fn qutemail(args: &[&str], config: &Path, stdin: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qutemail"));
    command.arg(args[0]).arg("--config").arg(config).args(&args[1..]);
    run(command, stdin)
}

/// Runs `qutemailctl --config CONFIG ARGS...` with `stdin` as its input.
pub fn qutemailctl(args: &[&str], config: &Path, stdin: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qutemailctl"));
    command.arg("--config").arg(config).args(args);
    run(command, stdin)
}

fn run(mut command: Command, stdin: Option<&str>) -> std::process::Output {
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// An MX and a submission listener on ephemeral loopback ports. Sender authentication of
/// internet mail is off: these tests have no DNS (mail_auth.rs tests the checks).
pub const LOOPBACK_SMTP: &str = r#"
[smtp]
hostname = "mail.a.test"
mx_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"

[mail_auth]
check = false
"#;

/// The outbound queue through the smarthost `relay`, retrying once an hour: a message that
/// could not go stays queued for the test to look at.
pub fn smarthost_queue(relay: &str) -> String {
    format!(
        r#"
[queue]
smarthost = "{relay}"

[queue.retry]
delays_s = [3600]
"#
    )
}

/// `qutemailctl users add USER` with `password` on standard input, as an operator does.
pub fn add_account(config: &Path, user: &str, password: &str) {
    let out = qutemailctl(&["users", "add", user], config, Some(&format!("{password}\n")));
    assert!(out.status.success(), "users add {user}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Starts `qutemail serve` and waits for its `READY` line; its log goes to `log`.
pub fn serve(config: &Path, log: Stdio) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qutemail"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child, None);
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready).unwrap();
    assert!(ready.starts_with("READY "), "{ready:?}");
    (running, ready)
}

/// The address of listener `name` in a `READY name=addr ...` line.
pub fn listener(ready: &str, name: &str) -> String {
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in {ready:?}"))
        .to_owned()
}
