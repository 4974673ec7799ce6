//! Helpers for the end-to-end tests: run the project's own commands as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod browser;
pub mod gateway;
pub mod site;
pub mod web;

pub use gateway::{DemoGateway, wait_for};
pub use site::{gateway_metrics, pop3_fetch, python, sample, submit};
pub use web::WebApi;

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

/// The two-site demo running live (`cargo xtask demo --state-dir DIR`), as an operator runs it.
/// Stopped with SIGINT (Ctrl-C) by [`LiveDemo::stop`], or on drop.
pub struct LiveDemo {
    /// The demo's state directory (holds `state.json` and `demo.out`, its output).
    pub dir: tempfile::TempDir,
    /// `state.json`, as the demo wrote it.
    pub state: serde_json::Value,
    child: Option<std::process::Child>,
    /// Held while the demo runs: the demo listens on fixed ports, so two test processes (or two
    /// engineers' test runs on one machine) take turns instead of colliding.
    _ports: std::fs::File,
}

impl LiveDemo {
    /// Starts the demo and waits (up to 300 s, first builds included) for its `state.json`.
    /// Waits first, without a limit, while another `LiveDemo` on this machine holds the ports.
    pub fn start() -> LiveDemo {
        let ports = std::fs::File::create(std::env::temp_dir().join("qutemail-demo-ports.lock"))
            .expect("creating the demo ports lock file");
        ports.lock().expect("locking the demo ports");
        let dir = tempfile::tempdir().expect("temporary directory");
        let state_path = dir.path().join("state.json");
        let log = std::fs::File::create(dir.path().join("demo.out")).expect("demo.out");
        let mut child = cargo()
            .args(["run", "--quiet", "-p", "xtask", "--", "demo", "--state-dir"])
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("demo.out"))
            .stderr(log)
            .spawn()
            .expect("starting cargo xtask demo");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let state = loop {
            if let Ok(bytes) = std::fs::read(&state_path)
                && let Ok(v) = serde_json::from_slice(&bytes)
            {
                break v;
            }
            if let Some(status) = child.try_wait().expect("waiting for the demo") {
                panic!(
                    "demo exited ({status}): {}",
                    std::fs::read_to_string(dir.path().join("demo.out")).unwrap_or_default()
                );
            }
            if std::time::Instant::now() >= deadline {
                // Stop it (SIGINT, as Ctrl-C): left running, it would hold the fixed ports after
                // this process has released the lock.
                let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
                let _ = child.wait();
                panic!("no state.json within 300 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        LiveDemo { dir, state, child: Some(child), _ports: ports }
    }

    /// Site `name` ("A" or "B") of `state.json`.
    pub fn site(&self, name: &str) -> &serde_json::Value {
        &self.state["sites"][name]
    }

    /// Stops the demo with SIGINT, as Ctrl-C does, and returns its exit status and output.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let status = self.interrupt();
        let out = std::fs::read_to_string(self.dir.path().join("demo.out")).unwrap_or_default();
        (status.expect("the demo was running"), out)
    }

    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for LiveDemo {
    fn drop(&mut self) {
        self.interrupt();
    }
}

/// Builds `package`'s binary `name` (a no-op when it is up to date) and returns its path in the
/// target directory these tests run from.
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    let status = cargo()
        .args(["build", "--quiet", "-p", package, "--bin", name])
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build -p {package} --bin {name} failed");
    // This test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("<target>/<profile>");
    profile_dir.join(name)
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// The files under `dirs` that contain any of `needles`, with the needle found.
pub fn files_containing(dirs: &[&Path], needles: &[&[u8]]) -> Vec<(PathBuf, String)> {
    let mut hits = Vec::new();
    for dir in dirs {
        for f in files_under(dir) {
            let Ok(bytes) = std::fs::read(&f) else { continue };
            for n in needles {
                if !n.is_empty() && bytes.windows(n.len()).any(|w| w == *n) {
                    hits.push((f.clone(), String::from_utf8_lossy(n).into_owned()));
                }
            }
        }
    }
    hits
}

/// Whether the file's bytes contain `needle` anywhere: read in chunks, so a whole disk image
/// can be scanned (a sparse one reads its holes as zeros).
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read as _;
    assert!(!needle.is_empty());
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut window = Vec::with_capacity((16 << 20) + needle.len());
    let mut chunk = vec![0u8; 16 << 20];
    loop {
        let n = file.read(&mut chunk).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if n == 0 {
            return false;
        }
        window.extend_from_slice(&chunk[..n]);
        if window.windows(needle.len()).any(|w| w[0] == needle[0] && w == needle) {
            return true;
        }
        // Keep the tail a match could start in.
        let keep = needle.len() - 1;
        let cut = window.len().saturating_sub(keep);
        window.drain(..cut);
    }
}
