//! Test harness: a site directory (SoftHSM token, certificates from a throw-away CA, a
//! configuration) and the real `kmd` binary started against it with a fake `NOTIFY_SOCKET`.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process, so every kmd process gets its own token
//! directory through `Command::env` (the approach of `hsm/tests/common/mod.rs`); the test
//! process never changes its own environment. Tests fail, never skip, without SoftHSM2.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::{SocketAddr, TcpListener};

use etsi014::client::{ClientOptions, Etsi014Client};
use etsi014::pki::{Ca, Issued};

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN_LABEL: &str = "kmd-test";

pub fn kmd() -> &'static str {
    env!("CARGO_BIN_EXE_kmd")
}

/// Fails (never skips) when SoftHSM2 is not installed.
pub fn require_softhsm() {
    assert!(
        Path::new(SOFTHSM_MODULE).is_file(),
        "SoftHSM2 is not installed ({SOFTHSM_MODULE} is missing): apt-get install -y softhsm2"
    );
}

/// A site: its directory, SoftHSM token, CA and certificates.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub softhsm_conf: PathBuf,
    pub token_dir: PathBuf,
    pub pin_file: PathBuf,
    pub ca: Ca,
    pub ca_cert: PathBuf,
    pub server: Issued,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub peer_cert: PathBuf,
    pub peer_key: PathBuf,
}

impl Site {
    pub fn new() -> Self {
        require_softhsm();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let softhsm_conf = qutemail_hsm::testing::init_tokens(&root, &[TOKEN_LABEL]);
        let token_dir = root.join("tokens");
        let pin_file = root.join("user.pin");

        let ca = Ca::new("kmd test site CA").unwrap();
        let ca_cert = root.join("ca.pem");
        std::fs::write(&ca_cert, ca.ca_pem()).unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        server.write(&root, "kmd").unwrap();
        // The peer channel: the listener reuses kmd.pem (serverAuth); peer.pem is the client side.
        let peer = ca.client("KME-A").unwrap();
        peer.write(&root, "peer").unwrap();
        Self {
            softhsm_conf,
            token_dir,
            pin_file,
            ca,
            ca_cert,
            server,
            server_cert: root.join("kmd.pem"),
            server_key: root.join("kmd.key"),
            peer_cert: root.join("peer.pem"),
            peer_key: root.join("peer.key"),
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A minimal configuration: no link, SAE `A-mail` recognised by CN, every listener on a
    /// free port of 127.0.0.1; `extra` is appended.
    pub fn config(&self, extra: &str) -> String {
        format!(
            r#"[site]
kme_id = "KME-A"
name = "Site A"

[hsm]
module_path = "{module}"
token = {{ label = "{TOKEN_LABEL}" }}
pin = {{ file = "{pin}" }}
wrapping_key_label = "kmd-test-kek"
pool_size = 2

[store]
path = "{dir}/keys.db"

[etsi014]
listen = "127.0.0.1:0"
server_cert = "kmd.pem"
server_key = "kmd.key"
client_ca = "ca.pem"

[[sae]]
sae_id = "A-mail"
common_name = "A-mail"
links = []

[metrics]
listen = "127.0.0.1:0"

[log]
level = "debug"
format = "text"
{extra}"#,
            module = SOFTHSM_MODULE,
            pin = self.pin_file.display(),
            dir = self.path().display(),
        )
    }

    /// Writes `text` as `kmd.toml` in the site directory.
    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path().join("kmd.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// An SAE client certificate from the site CA.
    pub fn client(&self, cn: &str) -> Issued {
        self.ca.client(cn).unwrap()
    }
}

pub fn write_private(path: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

/// A running `kmd` process with its notification socket and captured stderr.
pub struct Daemon {
    pub child: Child,
    notes: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr: Arc<Mutex<String>>,
    _socket_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `kmd --config <config>` with `NOTIFY_SOCKET` pointing at a socket this test
    /// reads, and `WATCHDOG_USEC` if given.
    pub fn start(site: &Site, config: &Path, watchdog_usec: Option<u64>) -> Self {
        let socket_dir = tempfile::tempdir().unwrap();
        let socket_path = socket_dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let notes = Arc::new(Mutex::new(Vec::new()));
        {
            let notes = notes.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                loop {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                            notes.lock().unwrap().push((Instant::now(), text));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            if Arc::strong_count(&notes) == 1 {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        let mut command = Command::new(kmd());
        command
            .arg("--config")
            .arg(config)
            .env("SOFTHSM2_CONF", &site.softhsm_conf)
            .env("NOTIFY_SOCKET", &socket_path)
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match watchdog_usec {
            Some(us) => {
                command.env("WATCHDOG_USEC", us.to_string());
            }
            None => {
                command.env_remove("WATCHDOG_USEC");
            }
        }
        let mut child = command.spawn().expect("start kmd");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let mut pipe = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Self { child, notes, stderr, _socket_dir: socket_dir }
    }

    /// Every notification so far (one datagram each).
    pub fn notes(&self) -> Vec<(Instant, String)> {
        self.notes.lock().unwrap().clone()
    }

    /// Waits for a notification containing `needle`; returns it. Fails if kmd exits first.
    pub fn wait_note(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, n)) = self.notes().into_iter().find(|(_, n)| n.contains(needle)) {
                return n;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "kmd exited ({status}) before notifying {needle:?}; notes {:?}; stderr:\n{}",
                    self.notes(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no notification {needle:?} within {timeout:?}; notes {:?}; stderr:\n{}",
                self.notes(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `READY=1` and returns the addresses from its `STATUS=` line.
    pub fn wait_ready(&mut self) -> Ready {
        let note = self.wait_note("READY=1", Duration::from_secs(60));
        Ready::parse(&note)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the stderr reader drain the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kmd did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // kmd's log helps when a test failed (or on request).
        if std::thread::panicking() || std::env::var_os("KMD_TEST_SHOW_LOG").is_some() {
            eprintln!("--- kmd stderr ---\n{}--- end of kmd stderr ---", self.stderr());
        }
    }
}

/// The addresses of a ready kmd.
#[derive(Debug, Clone)]
pub struct Ready {
    pub etsi014: std::net::SocketAddr,
    pub peer: Option<std::net::SocketAddr>,
    pub metrics: Option<std::net::SocketAddr>,
}

impl Ready {
    fn parse(note: &str) -> Self {
        let status = note.lines().find_map(|l| l.strip_prefix("STATUS=")).expect("STATUS with READY");
        let field = |name: &str| {
            status
                .split([' ', ';'])
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(|a| a.parse().unwrap_or_else(|e| panic!("{name} in {status:?}: {e}")))
        };
        Self {
            etsi014: field("etsi014").expect("etsi014 address"),
            peer: field("peer"),
            metrics: field("metrics"),
        }
    }
}

/// Runs `kmd` with arguments to completion.
pub fn run_kmd(args: &[&str]) -> std::process::Output {
    Command::new(kmd()).args(args).env_remove("NOTIFY_SOCKET").output().expect("run kmd")
}

/// `GET http://<addr><path>` with hyper-util's client: (status, content type, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    use http_body_util::BodyExt as _;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: hyper::Uri = format!("http://{addr}{path}").parse().unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await.unwrap().unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, String::from_utf8(body.to_vec()).unwrap())
    })
}

/// The value of the sample `name{labels}` (labels as written by the encoder) in an exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs `promtool check metrics` on an exposition; panics with its output on failure.
pub fn promtool_check(exposition: &str) {
    use std::io::Write as _;
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("promtool is not installed: apt-get install -y prometheus (provides /usr/bin/promtool)");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics failed:\n{said}\n--- exposition:\n{exposition}"
    );
}

// ---------------------------------------------------------------------------------------------
// Two sites on one simulated link

/// A fast simulated link (10 km, 1 GHz, 921,600 baud, 256-byte blocks).
pub fn fast_link() -> qkd_sim::SimConfig {
    let mut c = qkd_sim::SimConfig::default();
    c.physics.distance_km = 10.0;
    c.physics.pulse_rate_hz = 1e9;
    c.blocks.sifted_bits_per_block = 4096;
    c.blocks.max_key_bytes = 256;
    c.serial.baud_rate = 921_600;
    c.telemetry_interval_s = 0.2;
    c.seed = Some(23);
    c
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The configuration of one site: `local`/`remote` SAE, its end of the link, the peer's port.
#[allow(clippy::too_many_arguments)]
pub fn site_config(
    site: &Site,
    kme_id: &str,
    peer_kme_id: &str,
    local: &str,
    remote: &str,
    pty: &str,
    own_peer_port: u16,
    peer_port: u16,
) -> String {
    let extra = format!(
        r#"
[[link]]
id = "qkd-link-1"
peer_kme_id = "{peer_kme_id}"
peer_url = "https://localhost:{peer_port}"
peer_sae_ids = ["{remote}"]
device = {{ serial = {{ path = "{pty}", baud_rate = 921600 }} }}

[link.pool]
max_blocks = 512
low_water = 64
high_water = 256

[peer]
listen = "127.0.0.1:{own_peer_port}"
ca_cert = "ca.pem"
server_cert = "kmd.pem"
server_key = "kmd.key"
client_cert = "peer.pem"
client_key = "peer.key"
"#
    );
    site.config(&extra).replace("\nkme_id = \"KME-A\"", &format!("\nkme_id = \"{kme_id}\"")).replace(
        "sae_id = \"A-mail\"\ncommon_name = \"A-mail\"\nlinks = []",
        &format!("sae_id = \"{local}\"\ncommon_name = \"{local}\"\nlinks = [\"qkd-link-1\"]"),
    )
}

pub fn sae_client(site: &Site, ca_pem: &str, addr: SocketAddr, cn: &str) -> Etsi014Client {
    let tls = site.client(cn).tls(ca_pem);
    let options = ClientOptions { timeout: Duration::from_secs(20), ..ClientOptions::default() };
    Etsi014Client::with_options(&format!("https://localhost:{}", addr.port()), tls, options).unwrap()
}
