//! Issue 7's webmail in a real browser: Debian's headless Chromium, driven through chromedriver,
//! against the live two-site demo over HTTPS (the browser trusts the demo CAs through an NSS
//! database, as a user's browser would trust a company CA).
//!
//! A new user signs up at site A and sends a first message (timed: under 30 s from opening the
//! page); sends to bob at B in every mode with an attachment, and is refused a One-Time Pad too
//! large for the pad before anything is sent. Bob, at B, sees the "Quantum Secured" badge, opens
//! each certificate and downloads each attachment byte for byte. The phone-sized layout renders
//! the list. The new user resets a forgotten password with the token mailed to the recovery
//! mailbox. Alice, admin at A, watches the key pool shrink in the admin console after a send.
//! Screenshots of the main screens go to `$CARGO_TARGET_DIR/artifacts/webmail/`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::Locator;
use fantoccini::key::Key;
use qutemail_e2e::LiveDemo;
use qutemail_e2e::browser::Browser;
use serde_json::{Value, json};

/// The user-facing promise: from opening the page to a sent first message.
const ONBOARDING_LIMIT: Duration = Duration::from_secs(30);
/// Mail between the sites goes through the queue: generous for a loaded machine.
const DELIVERY: Duration = Duration::from_secs(150);

struct Site {
    url: String,
    ca: PathBuf,
    domain: String,
    user: (String, String),
}

fn site(demo: &LiveDemo, name: &str) -> Site {
    let s = demo.site(name);
    let web = &s["web"];
    let url = web["url"].as_str().unwrap_or_else(|| panic!("state.json has no sites.{name}.web.url: {s}"));
    let user = &s["users"][0];
    Site {
        url: url.trim_end_matches('/').to_owned() + "/",
        ca: PathBuf::from(web["tls_ca"].as_str().expect("sites.X.web.tls_ca")),
        domain: s["domain"].as_str().expect("sites.X.domain").to_owned(),
        user: (
            user["address"].as_str().expect("a demo user's address").to_owned(),
            user["password"].as_str().expect("a demo user's password").to_owned(),
        ),
    }
}

/// Bytes that survive no accidental text conversion: every byte value, with a per-mode prefix.
fn attachment_bytes(label: &str, len: usize) -> Vec<u8> {
    let mut v = format!("{label}\r\n").into_bytes();
    v.extend((0..len).map(|i| (i * 7 + 3) as u8));
    v
}

/// The UI counts Content-Security-Policy violations on `<html data-csp-violations>`.
async fn assert_no_csp_violations(b: &Browser, screen: &str) {
    let count = b.js("return document.documentElement.dataset.cspViolations || null;", vec![]).await;
    assert!(
        count.is_null(),
        "{screen}: {count} Content-Security-Policy violations (see the browser console)"
    );
}

async fn dismiss_toasts(b: &Browser) {
    for t in b.client.find_all(Locator::Css(".toast button[aria-label=Dismiss]")).await.unwrap_or_default() {
        let _ = t.click().await;
    }
}

async fn log_in(b: &Browser, url: &str, address: &str, password: &str) {
    b.goto(&format!("{url}#/login")).await;
    b.fill("#login-form input[name=address]", address).await;
    b.fill("#login-form input[name=password]", password).await;
    b.click("#login-form button[type=submit]").await;
    b.visible("#compose-button").await;
}

async fn sign_out(b: &Browser) {
    dismiss_toasts(b).await;
    b.click("#account-button").await;
    b.click("#logout").await;
    b.visible("#login-form").await;
}

/// Writes and sends a message through the compose screen; `attachment` is uploaded first.
async fn send(
    b: &Browser,
    url: &str,
    to: &str,
    subject: &str,
    body: &str,
    mode: &str,
    attachment: Option<&Path>,
) {
    open_compose(b, url).await;
    b.fill("#compose-to", to).await;
    b.fill("#compose-subject", subject).await;
    b.fill("#compose-body", body).await;
    if let Some(path) = attachment {
        attach(b, path).await;
    }
    b.click(&format!("#mode-{mode}")).await;
    dismiss_toasts(b).await;
    b.click("#send-button").await;
    if let Err(e) = sent(b).await {
        panic!("sending {subject:?} in mode {mode}: {e}");
    }
    dismiss_toasts(b).await;
}

/// Opens a fresh compose screen from the inbox, as a user does.
async fn open_compose(b: &Browser, url: &str) {
    b.goto(&format!("{url}#/inbox")).await;
    b.click("#compose-button").await;
    b.visible("#compose-to").await;
}

/// Waits for the compose screen's answer: the "Message sent" notice, or its error.
async fn sent(b: &Browser) -> Result<(), String> {
    let deadline = Instant::now() + qutemail_e2e::browser::STEP_TIMEOUT;
    loop {
        if let Ok(e) = b.client.find(Locator::Css("#compose-error")).await
            && e.is_displayed().await.unwrap_or(false)
        {
            return Err(e.text().await.unwrap_or_default());
        }
        for t in b.client.find_all(Locator::Css(".toast-success")).await.unwrap_or_default() {
            if t.text().await.is_ok_and(|t| t.contains("Message sent")) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("neither sent nor refused within the step timeout".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn attach(b: &Browser, path: &Path) {
    let input = b.client.find(Locator::Css("#compose-file")).await.expect("the file input");
    input.send_keys(&path.display().to_string()).await.expect("choosing the file");
    let name = path.file_name().unwrap().to_str().unwrap();
    // Uploaded when the chip shows the size instead of "uploading…".
    let chip = b.with_text("#upload-list .upload:not(.pending)", name).await;
    let text = chip.text().await.unwrap();
    assert!(
        !chip.attr("class").await.unwrap().unwrap_or_default().contains("failed"),
        "upload failed: {text}"
    );
}

/// The key pool of the link to `peer` as the admin console shows it.
async fn pool_level(b: &Browser) -> u64 {
    let level = b.visible(".link-card .pool-level").await;
    let keys = level.attr("data-keys").await.unwrap().unwrap_or_default();
    keys.parse().unwrap_or_else(|_| panic!("the console shows no key count: {keys:?}"))
}

/// One request on qkd-sim's control socket (the operator's `qkd-sim ctl`).
fn sim_control(demo: &LiveDemo, request: Value) {
    let socket = demo.state["link"]["control_socket"].as_str().expect("link.control_socket");
    let mut s = UnixStream::connect(socket).expect("connecting to qkd-sim's control socket");
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(answer["ok"], true, "qkd-sim refused {request}: {answer}");
}

/// The token in the reset mail, as a user copies it: the word after "Reset token:".
fn reset_token(mail: &str) -> String {
    let at = mail.find("Reset token:").unwrap_or_else(|| panic!("no \"Reset token:\" in the mail: {mail}"));
    let token = mail[at + "Reset token:".len()..].split_whitespace().next().unwrap_or_default();
    assert!(token.len() >= 16, "the reset token {token:?} is too short to be unguessable");
    token.to_owned()
}

#[test]
fn webmail_in_a_real_browser_across_two_sites() {
    let started = Instant::now();
    let demo = LiveDemo::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(scenario(&demo));
    println!("webmail browser test took {:.0?} (demo start included)", started.elapsed());
}

async fn scenario(demo: &LiveDemo) {
    let a = site(demo, "A");
    let bsite = site(demo, "B");
    let bob = bsite.user.clone();
    let work = tempfile::tempdir().unwrap();
    let b = Browser::launch(&[&a.ca, &bsite.ca]).await;

    // --- Onboarding: open the page, sign up, send a first message. ---------------------------
    let nonce = format!("{:x}", std::process::id() ^ (started_ms() as u32));
    let username = format!("carol{nonce}");
    let carol = format!("{username}@{}", a.domain);
    let password = "carol-first-password";
    let opened = Instant::now();
    b.goto(&a.url).await;
    b.click("#to-signup").await;
    b.fill("#signup-form input[name=display_name]", "Carol Browser").await;
    b.fill("#signup-form input[name=username]", &username).await;
    b.fill("#signup-form input[name=password]", password).await;
    // The recovery mailbox is Alice's, which this test can read.
    b.fill("#signup-form input[name=recovery_address]", &a.user.0).await;
    b.click("#signup-form button[type=submit]").await;
    b.click("#compose-button").await;
    b.fill("#compose-to", &bob.0).await;
    b.fill("#compose-subject", &format!("First message {nonce}")).await;
    b.fill("#compose-body", "Hello Bob, my first quantum-secured mail.").await;
    dismiss_toasts(&b).await; // the welcome notice may sit over the Send button
    b.click("#send-button").await;
    let first = sent(&b).await;
    let onboarding = opened.elapsed();
    assert!(first.is_ok(), "the first message was not sent: {first:?}");
    println!("onboarding: page opened to first message sent in {:.1} s", onboarding.as_secs_f64());
    assert!(onboarding < ONBOARDING_LIMIT, "onboarding took {onboarding:?}, over {ONBOARDING_LIMIT:?}");
    dismiss_toasts(&b).await;

    // --- One-Time Pad refused before sending when the message is larger than the pad. --------
    open_compose(&b, &a.url).await;
    // The limit GET /api/modes/ gave the compose screen.
    let limit = b.visible("#mode-otp").await.attr("data-max-bytes").await.unwrap();
    let otp_limit: u64 = limit
        .as_deref()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("the One-Time Pad has no size limit in GET /api/modes/: {limit:?}"));
    let too_big = work.path().join("too-big-for-otp.bin");
    std::fs::write(&too_big, attachment_bytes("too big", otp_limit as usize + 1)).unwrap();
    b.fill("#compose-to", &bob.0).await;
    b.fill("#compose-subject", &format!("Too big for OTP {nonce}")).await;
    attach(&b, &too_big).await;
    b.click("#mode-otp").await;
    let warning = b.text("#otp-warning").await;
    assert!(warning.contains("One-Time Pad"), "{warning}");
    b.click("#send-button").await;
    // Refused in the page, before any request: the button never turned into "Sending…". That
    // nothing reached Bob is checked at B below.
    b.visible("#otp-warning").await;
    let button = b.text("#send-button").await;
    assert_eq!(button.trim(), "Send", "the OTP message over the limit is being sent");
    let too_big_subject = format!("Too big for OTP {nonce}");

    // --- One message to bob in each mode, each with an attachment. ---------------------------
    let mut expected = Vec::new();
    for mode in ["hybrid", "qaes", "otp", "normal"] {
        let len = if mode == "otp" { (otp_limit as usize / 8).min(1024) } else { 3000 };
        let file = work.path().join(format!("{mode}-attachment-{nonce}.bin"));
        let bytes = attachment_bytes(&format!("{mode} attachment {nonce}"), len);
        std::fs::write(&file, &bytes).unwrap();
        let subject = format!("Browser {mode} {nonce}");
        if mode == "qaes" {
            // The compose screen, filled in, for the artifacts.
            open_compose(&b, &a.url).await;
            b.fill("#compose-to", &bob.0).await;
            b.fill("#compose-subject", &subject).await;
            b.fill("#compose-body", "Quantum-aided AES with an attachment.").await;
            attach(&b, &file).await;
            b.click("#mode-qaes").await;
            b.screenshot("compose").await;
            assert_no_csp_violations(&b, "compose").await;
            b.click("#send-button").await;
            if let Err(e) = sent(&b).await {
                panic!("sending in mode qaes: {e}");
            }
            dismiss_toasts(&b).await;
        } else {
            send(&b, &a.url, &bob.0, &subject, &format!("Sent in mode {mode}."), mode, Some(&file)).await;
        }
        expected.push((mode, subject, file.file_name().unwrap().to_str().unwrap().to_owned(), bytes));
    }

    // --- Bob at B: badges, certificates, attachments. ----------------------------------------
    log_in(&b, &bsite.url, &bob.0, &bob.1).await;
    for (_, subject, _, _) in &expected {
        wait_for_row(&b, subject).await;
    }
    dismiss_toasts(&b).await;
    let list = b.text("#message-list").await;
    assert!(!list.contains(&too_big_subject), "the OTP message over the limit reached Bob");
    b.screenshot("inbox").await;
    for (mode, subject, filename, bytes) in &expected {
        let (badge, bad) = open_row(&b, subject).await;
        let quantum = *mode != "normal";
        assert_eq!(badge, quantum, "{mode}: Quantum Secured badge in the list");
        assert!(!bad, "{mode} failed verification");
        b.with_text("#message-subject", subject).await;
        assert!(
            b.client.find_all(Locator::Css("#verification-warning")).await.unwrap().is_empty(),
            "{mode}: the reading pane warns about verification"
        );
        if quantum {
            b.click("#badge-toggle").await;
            b.visible("#certificate-panel").await;
            let shown = b.text("#cert-mode").await;
            let want = match *mode {
                "hybrid" => "Hybrid",
                "qaes" => "Quantum-Aided AES",
                _ => "One-Time Pad",
            };
            assert!(shown.contains(want), "{mode}: the certificate says {shown:?}");
            let keys = b.client.find_all(Locator::Css("#cert-key-ids li")).await.unwrap();
            assert!(!keys.is_empty(), "{mode}: the certificate lists no key ID");
            let signature = b.text("#cert-signature").await;
            assert!(signature.contains("Valid"), "{mode}: signature {signature:?}");
            let qber = b.text("#cert-qber").await;
            assert!(qber.ends_with('%'), "{mode}: QBER at key time {qber:?}");
            if *mode == "hybrid" {
                dismiss_toasts(&b).await;
                b.screenshot("reading-pane-certificate").await;
                assert_no_csp_violations(&b, "reading pane").await;
            }
        } else {
            let badges = b.client.find_all(Locator::Css(".reader .badge-quantum")).await.unwrap();
            assert!(badges.is_empty(), "a Normal message must not claim to be Quantum Secured");
        }
        dismiss_toasts(&b).await;
        b.click(&format!(".download[aria-label='Download {filename}']")).await;
        let got = b.downloaded(filename).await;
        assert!(
            got == *bytes,
            "{mode}: the downloaded attachment differs ({} bytes, sent {})",
            got.len(),
            bytes.len()
        );
        b.click("#back-button").await;
        b.visible("#message-list").await;
    }

    // Gmail's shortcuts: ? lists them.
    let body = b.client.find(Locator::Css("body")).await.unwrap();
    b.js("document.activeElement && document.activeElement.blur();", vec![]).await;
    body.send_keys("?").await.unwrap();
    b.visible("#shortcuts-dialog").await;
    body.send_keys(&char::from(Key::Escape).to_string()).await.unwrap();
    b.gone("#shortcuts-dialog").await;
    // j / k move the cursor, o opens, u goes back to the list.
    // Read in the page in one step: the list re-renders itself, so found elements can go stale.
    let second = b
        .js(
            "const s = document.querySelectorAll('#message-list .row .subject'); \
             return s.length > 1 ? s[1].textContent.trim() : null;",
            vec![],
        )
        .await
        .as_str()
        .expect("a second message in the list")
        .to_owned();
    b.js("document.activeElement && document.activeElement.blur();", vec![]).await;
    body.send_keys("jjk").await.unwrap();
    b.with_text("#message-list .row.cursor .subject", &second).await;
    b.client.active_element().await.unwrap().send_keys("o").await.unwrap();
    b.with_text("#message-subject", &second).await;
    b.client.active_element().await.unwrap().send_keys("u").await.unwrap();
    b.visible("#message-list").await;

    // --- Phone-sized screen: the list renders without sideways scrolling. --------------------
    b.viewport(390, 844).await;
    b.goto(&format!("{}#/inbox", bsite.url)).await;
    wait_for_row(&b, &expected[0].1).await;
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth;", vec![]).await;
    assert!(overflow.as_i64().unwrap_or(1) <= 0, "the phone layout scrolls sideways by {overflow} px");
    b.gone("#nav").await;
    b.visible("#compose-fab").await;
    b.visible("#message-list .row .badge-quantum").await;
    b.screenshot("phone-inbox").await;
    assert_no_csp_violations(&b, "phone inbox").await;
    b.viewport(1366, 900).await;

    // --- Password reset with the token mailed to the recovery address. -----------------------
    b.goto(&a.url).await;
    b.visible("#compose-button").await; // Carol's session at A survives the trip to B.
    sign_out(&b).await;
    b.click("#to-reset").await;
    b.fill("#reset-request-form input[name=address]", &carol).await;
    b.click("#reset-request-form button[type=submit]").await;
    b.visible("#reset-request-form .form-ok").await;

    log_in(&b, &a.url, &a.user.0, &a.user.1).await;
    let mail = wait_for_reset_mail(&b, &carol).await;
    let token = reset_token(&mail);

    // --- Admin console at A: the key pool shrinks after a send. ------------------------------
    b.goto(&format!("{}#/admin", a.url)).await;
    b.with_text("#users-table", &carol).await;
    // Stop the link producing keys, so that only our send moves the pool.
    sim_control(demo, json!({"cmd": "fibre_cut", "cut": true}));
    let before = stable_pool_level(&b).await;
    b.visible("#chart-keys path.series").await;
    dismiss_toasts(&b).await;
    b.screenshot("admin-console").await;
    assert_no_csp_violations(&b, "admin console").await;
    send(&b, &a.url, &bob.0, &format!("Pool check {nonce}"), "One more key, please.", "hybrid", None).await;
    b.goto(&format!("{}#/admin", a.url)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let now = pool_level(&b).await;
        if now < before {
            break now;
        }
        assert!(Instant::now() < deadline, "the key pool stayed at {now} (was {before}) after a send");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!("admin console: key pool {before} -> {after} after one hybrid send");
    sim_control(demo, json!({"cmd": "fibre_cut", "cut": false}));
    sign_out(&b).await;

    // --- Carol sets a new password with the mailed token; the old one stops working. ----------
    let new_password = "carol-second-password";
    b.visible("#login-form").await;
    b.click("#to-reset").await;
    b.fill("#reset-token", &token).await;
    b.fill("#reset-confirm-form input[name=new_password]", new_password).await;
    b.fill("#reset-confirm-form input[name=confirm_password]", new_password).await;
    b.click("#reset-confirm-form button[type=submit]").await;
    b.visible("#login-form").await;
    b.fill("#login-form input[name=address]", &carol).await;
    b.fill("#login-form input[name=password]", password).await;
    b.click("#login-form button[type=submit]").await;
    b.with_text("#login-form .form-error", "Wrong").await;
    log_in(&b, &a.url, &carol, new_password).await;

    b.close().await;
}

fn started_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

/// The list row showing `subject`, refreshing the list until the mail has arrived.
async fn wait_for_row(b: &Browser, subject: &str) -> fantoccini::elements::Element {
    let deadline = Instant::now() + DELIVERY;
    loop {
        for row in b.client.find_all(Locator::Css("#message-list .row")).await.unwrap_or_default() {
            if row.text().await.is_ok_and(|t| t.contains(subject)) {
                return row;
            }
        }
        assert!(Instant::now() < deadline, "{subject:?} did not arrive within {DELIVERY:?}");
        if let Ok(refresh) =
            b.client.find(Locator::Css(".list-view .toolbar button[aria-label=Refresh]")).await
        {
            let _ = refresh.click().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads the list row of `subject` (has it the Quantum Secured badge, a failed-verification
/// mark?) and opens it. The list refreshes itself and replaces its rows, so a row found a moment
/// ago can be stale: then the row is looked up again.
async fn open_row(b: &Browser, subject: &str) -> (bool, bool) {
    let deadline = Instant::now() + DELIVERY;
    loop {
        let row = wait_for_row(b, subject).await;
        let attempt = async {
            let badge = !row.find_all(Locator::Css(".badge-quantum")).await?.is_empty();
            let bad = !row.find_all(Locator::Css(".badge-bad")).await?.is_empty();
            row.find(Locator::Css(".row-open")).await?.click().await?;
            Ok::<_, fantoccini::error::CmdError>((badge, bad))
        }
        .await;
        match attempt {
            Ok(found) => return found,
            Err(e) if qutemail_e2e::browser::is_stale(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("opening the row of {subject:?}: {e}"),
        }
    }
}

/// Opens the reset mail for `account` in the open mailbox and returns its text.
async fn wait_for_reset_mail(b: &Browser, account: &str) -> String {
    let deadline = Instant::now() + DELIVERY;
    let mut opened = std::collections::HashSet::new();
    loop {
        let mut candidate = None;
        for row in b.client.find_all(Locator::Css("#message-list .row")).await.unwrap_or_default() {
            let text = row.text().await.unwrap_or_default().to_lowercase();
            let id = row.attr("data-id").await.ok().flatten().unwrap_or_default();
            if (text.contains("reset") || text.contains("password")) && !opened.contains(&id) {
                candidate = Some((id, row));
                break;
            }
        }
        if let Some((id, row)) = candidate {
            opened.insert(id);
            row.find(Locator::Css(".row-open")).await.unwrap().click().await.unwrap();
            let body = b.text("#message-body").await;
            if body.contains(account) {
                return body;
            }
            b.click("#back-button").await;
            b.visible("#message-list").await;
            continue;
        }
        assert!(Instant::now() < deadline, "no password reset mail for {account} within {DELIVERY:?}");
        if let Ok(refresh) =
            b.client.find(Locator::Css(".list-view .toolbar button[aria-label=Refresh]")).await
        {
            let _ = refresh.click().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The console's pool level once it stopped moving for two 5 s refreshes.
async fn stable_pool_level(b: &Browser) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = pool_level(b).await;
    let mut same = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = pool_level(b).await;
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same >= 2 {
            return now;
        }
        assert!(Instant::now() < deadline, "the key pool never settled after the fibre cut (last {now})");
    }
}
