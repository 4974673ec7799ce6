//! A real browser for the webmail tests: Debian's headless `chromium`, driven over WebDriver
//! through Debian's `chromedriver` with `fantoccini`.
//!
//! The browser trusts the demo's site CAs the way a user's browser would: each CA is imported into
//! an NSS database under a throw-away `HOME` (`~/.pki/nssdb`, where Chromium on Linux looks), so
//! TLS is verified for real; `--ignore-certificate-errors` is never used.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long a step may take before the test gives up: generous, the machine may be loaded.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where screenshots go: `$CARGO_TARGET_DIR/artifacts/webmail/` (`target/` when unset).
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    let target = if target.is_absolute() { target } else { crate::workspace_root().join(target) };
    target.join("artifacts").join("webmail")
}

/// A headless Chromium session. Dropping it ends chromedriver (and with it the browser).
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    /// Where the browser saves downloads.
    pub downloads: PathBuf,
    driver: Child,
    /// `HOME` (NSS database), the profile and the downloads; removed on drop.
    _home: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a browser that trusts `cas` (PEM).
    pub async fn launch(cas: &[&Path]) -> Browser {
        let home = tempfile::tempdir().expect("temporary HOME for the browser");
        trust_cas(home.path(), cas);
        let downloads = home.path().join("downloads");
        std::fs::create_dir_all(&downloads).expect("downloads directory");
        let profile = home.path().join("profile");

        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver (apt-get install chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        wait_until_listening(port);

        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--window-size=1366,900",
                    "--lang=en-US",
                    format!("--user-data-dir={}", profile.display()),
                ],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                    "safebrowsing.enabled": false,
                },
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a WebDriver session with headless chromium");
        Browser { client, downloads, driver, _home: home }
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// The first element matching `css`, waiting for it to exist and be displayed.
    pub async fn visible(&self, css: &str) -> Element {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Ok(found) = self.client.find_all(Locator::Css(css)).await {
                for e in found {
                    if e.is_displayed().await.unwrap_or(false) {
                        return e;
                    }
                }
            }
            assert!(Instant::now() < deadline, "{css} was not shown within {STEP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Waits until `css` matches a displayed element whose text contains `text`; returns it.
    pub async fn with_text(&self, css: &str, text: &str) -> Element {
        self.with_text_within(css, text, STEP_TIMEOUT).await
    }

    /// [`Browser::with_text`] with its own limit.
    pub async fn with_text_within(&self, css: &str, text: &str, limit: Duration) -> Element {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(found) = self.client.find_all(Locator::Css(css)).await {
                for e in found {
                    if e.text().await.is_ok_and(|t| t.contains(text))
                        && e.is_displayed().await.unwrap_or(false)
                    {
                        return e;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no {css} showing {text:?} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Waits until no element matches `css` (or none is displayed).
    pub async fn gone(&self, css: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let mut shown = false;
            if let Ok(found) = self.client.find_all(Locator::Css(css)).await {
                for e in found {
                    shown |= e.is_displayed().await.unwrap_or(false);
                }
            }
            if !shown {
                return;
            }
            assert!(Instant::now() < deadline, "{css} still shown after {STEP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Clicks the displayed element matching `css` (found again if the page re-rendered it
    /// between finding and clicking).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.visible(css).await.click().await {
                Ok(()) => return,
                Err(err) if is_stale(&err) && Instant::now() < deadline => {}
                Err(err) => panic!("clicking {css}: {err}"),
            }
        }
    }

    /// The text of the displayed element matching `css` (read again if the page re-rendered it
    /// in between).
    pub async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.visible(css).await.text().await {
                Ok(text) => return text,
                Err(err) if is_stale(&err) && Instant::now() < deadline => {}
                Err(err) => panic!("reading {css}: {err}"),
            }
        }
    }

    /// Replaces the value of the input matching `css` with `text`, typed as a user would.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.visible(css).await;
        e.clear().await.unwrap_or_else(|err| panic!("clearing {css}: {err}"));
        e.send_keys(text).await.unwrap_or_else(|err| panic!("typing into {css}: {err}"));
    }

    /// Runs `script` in the page (`arguments[i]` are `args`) and returns its result.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap_or_else(|e| panic!("running {script:?}: {e}"))
    }

    /// Sets the browser's viewport (headless: the window is the viewport) and checks it took.
    pub async fn viewport(&self, width: u32, height: u32) {
        self.client.set_window_size(width, height).await.expect("resizing the window");
        let inner = self.js("return [window.innerWidth, window.innerHeight];", vec![]).await;
        assert_eq!(inner[0].as_u64(), Some(u64::from(width)), "viewport width after resizing: {inner}");
    }

    /// Saves a PNG of the viewport as `artifacts_dir()/NAME.png`, prints and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("taking a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).expect("creating the artifacts directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("writing the screenshot");
        println!("screenshot: {}", path.display());
        path
    }

    /// Waits for a finished download named `name` (Chromium writes `name.crdownload` first).
    pub async fn downloaded(&self, name: &str) -> Vec<u8> {
        let path = self.downloads.join(name);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let partial = self.downloads.join(format!("{name}.crdownload"));
            if path.exists() && !partial.exists() {
                return std::fs::read(&path).expect("reading the download");
            }
            assert!(Instant::now() < deadline, "{name} was not downloaded within {STEP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Ends the WebDriver session (closing the browser) and chromedriver.
    pub async fn close(self) {
        // The client is a handle: closing a clone ends the session; dropping `self` ends chromedriver.
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Creates `HOME/.pki/nssdb` and imports each CA as trusted for TLS servers.
fn trust_cas(home: &Path, cas: &[&Path]) {
    let db = home.join(".pki").join("nssdb");
    std::fs::create_dir_all(&db).expect("creating the NSS database directory");
    let db_arg = format!("sql:{}", db.display());
    certutil(&["-N", "-d", &db_arg, "--empty-password"]);
    for (i, ca) in cas.iter().enumerate() {
        let pem = std::fs::read_to_string(ca).unwrap_or_else(|e| panic!("reading CA {}: {e}", ca.display()));
        assert!(pem.contains("BEGIN CERTIFICATE"), "{} is not a PEM certificate", ca.display());
        let nick = format!("qutemail-test-ca-{i}");
        let path = ca.display().to_string();
        certutil(&["-A", "-d", &db_arg, "-n", &nick, "-t", "C,,", "-a", "-i", &path]);
    }
}

fn certutil(args: &[&str]) {
    let out = Command::new("certutil")
        .args(args)
        .output()
        .expect("running certutil (apt-get install libnss3-tools)");
    assert!(out.status.success(), "certutil {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A loopback port nobody listens on now (chromedriver cannot report an ephemeral port back).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    l.local_addr().expect("its address").port()
}

fn wait_until_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen on port {port} within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// True when `err` says the element is no longer in the page (the page re-rendered it).
pub fn is_stale(err: &fantoccini::error::CmdError) -> bool {
    err.to_string().contains("stale element")
}
