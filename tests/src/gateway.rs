//! A demo site's gateway as a test drives it: the operator's commands against the demo's own
//! binary, SIGKILL, and starting `qutemail serve` again (with the demo's configuration or a
//! variant of it) the way the demo starts it.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::LiveDemo;

/// Polls `done` every 250 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A gateway a test started again after killing the demo's; stopped with SIGTERM on drop so
/// that the demo's fixed ports are free for the next run.
struct Restarted(Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One demo site's gateway: how the demo runs it, and which process runs it now.
pub struct DemoGateway {
    /// The site's part of `state.json`.
    pub site: serde_json::Value,
    exe: PathBuf,
    pid: u32,
    restarted: Option<Restarted>,
}

impl DemoGateway {
    /// Site `name`'s gateway as the demo started it.
    pub fn of(demo: &LiveDemo, name: &str) -> DemoGateway {
        let site = demo.site(name).clone();
        let pid = site["gateway"]["pid"].as_u64().expect("sites.X.gateway.pid") as u32;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the gateway's binary");
        DemoGateway { site, exe, pid, restarted: None }
    }

    /// The demo's configuration file of this gateway.
    pub fn config(&self) -> PathBuf {
        PathBuf::from(self.site["gateway"]["config"].as_str().unwrap())
    }

    /// Runs `qutemailctl --config CONFIG ARGS...` (the binary next to the demo's `qutemail`, so
    /// no build waits for cargo's lock).
    pub fn qutemailctl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.exe.with_file_name("qutemailctl"))
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env("SOFTHSM2_CONF", self.site["hsm"]["softhsm2_conf"].as_str().unwrap())
            .output()
            .unwrap()
    }

    /// `qutemailctl --config CONFIG ARGS...`: its standard output. Panics when it fails.
    pub fn qutemailctl(&self, args: &[&str]) -> String {
        let out = self.qutemailctl_output(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "qutemailctl {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// SIGKILL, then waits until the process is gone and its ports are closed.
    pub fn kill_hard(&mut self) {
        let status = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -9 {}", self.pid);
        if let Some(mut r) = self.restarted.take() {
            let _ = r.0.wait();
            std::mem::forget(r);
        }
        let submission = self.site["gateway"]["smtp_submission"].as_str().unwrap().to_owned();
        wait_for("the killed gateway's ports to close", Duration::from_secs(30), || {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            // A zombie (state Z) until the demo reaps it: its sockets are closed already.
            let gone =
                state.is_empty() || state.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
            gone && std::net::TcpStream::connect(&submission).is_err()
        });
    }

    /// Starts `qutemail serve` again with the demo's configuration and waits for its READY line.
    pub fn restart(&mut self, log: &Path) {
        self.restart_with(&self.config(), log);
    }

    /// Starts `qutemail serve --config CONFIG` (a variant of the demo's file, in the same
    /// directory so its relative paths still hold) and waits for its READY line.
    pub fn restart_with(&mut self, config: &Path, log: &Path) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(&self.exe)
            .args(["serve", "--config"])
            .arg(config)
            .env("SOFTHSM2_CONF", self.site["hsm"]["softhsm2_conf"].as_str().unwrap())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
        assert!(ready.starts_with("READY "), "the restarted gateway did not come up: {ready:?}");
        self.pid = child.id();
        self.restarted = Some(Restarted(child));
    }
}
