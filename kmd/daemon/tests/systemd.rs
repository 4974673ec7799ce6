//! The real `kmd` under a fake systemd: `READY=1` only once the HSM, the store and the listeners
//! are up; `WATCHDOG=1` while healthy and no longer once the HSM fails; `STOPPING=1` and exit 0
//! on SIGTERM; no `READY=1` and a non-zero exit when the HSM or a certificate is wrong.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Daemon, Site, write_private};

#[test]
fn ready_after_hsm_store_and_listeners_then_watchdog_then_stopping() {
    let site = Site::new();
    let config = site.write_config(&site.config(""));
    let mut kmd = Daemon::start(&site, &config, Some(1_000_000));
    let ready = kmd.wait_ready();

    // Everything READY=1 promises is true the moment it arrives.
    TcpStream::connect(ready.etsi014).expect("ETSI 014 listener bound before READY=1");
    let metrics = ready.metrics.expect("metrics address in STATUS");
    TcpStream::connect(metrics).expect("metrics listener bound before READY=1");
    assert!(site.path().join("keys.db.lock").is_file(), "store opened (lock taken) before READY=1");
    let log = kmd.stderr();
    let hsm_ready = log.find("HSM key wrapper ready").expect("HSM opened before READY=1");
    let ready_log = log.find("kmd ready").expect("ready logged");
    assert!(hsm_ready < ready_log, "{log}");
    let notes = kmd.notes();
    let ready_at = notes.iter().position(|(_, n)| n.contains("READY=1")).unwrap();
    assert!(
        notes[..ready_at].iter().any(|(_, n)| n.contains("STATUS=starting: opening the HSM")),
        "{notes:?}"
    );
    assert!(!notes[..ready_at].iter().any(|(_, n)| n.contains("WATCHDOG=1")), "no pets before READY=1");

    // Pets at half of WATCHDOG_USEC (1 s): about 5 in the next 2.5 s (at least 2 on a busy
    // machine).
    std::thread::sleep(Duration::from_millis(2500));
    let pets = kmd.notes().iter().filter(|(_, n)| n.trim() == "WATCHDOG=1").count();
    assert!(pets >= 2, "only {pets} WATCHDOG=1 in 2.5 s: {:?}", kmd.notes());

    let (status, _, body) = common::http_get(metrics, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(common::sample(&body, "kmd_hsm_healthy"), Some(1.0), "{body}");
    assert!(
        common::sample(&body, "kmd_hsm_operation_duration_seconds_count{op=\"health_check\"}").unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );

    let status = kmd.stop();
    assert!(status.success(), "exit after SIGTERM: {status}; stderr:\n{}", kmd.stderr());
    let stopping = kmd.wait_note("STOPPING=1", Duration::from_secs(5));
    assert!(stopping.contains("STATUS=stopping (SIGTERM)"), "{stopping}");
    assert!(kmd.stderr().contains("kmd stopped"), "{}", kmd.stderr());
}

#[test]
fn hsm_failure_stops_the_watchdog() {
    let site = Site::new();
    let config = site.write_config(&site.config(""));
    let mut kmd = Daemon::start(&site, &config, Some(600_000));
    let ready = kmd.wait_ready();
    kmd.wait_note("WATCHDOG=1", Duration::from_secs(5));

    // The token's storage vanishes under the running daemon.
    std::fs::remove_dir_all(&site.token_dir).unwrap();
    let failed = kmd.wait_note("HSM health check failed", Duration::from_secs(15));
    assert!(failed.starts_with("STATUS=degraded"), "{failed}");
    let failed_at = kmd.notes().iter().find(|(_, n)| n.contains("HSM health check failed")).unwrap().0;

    // A pet already decided may still be in flight; after that, silence.
    std::thread::sleep(Duration::from_millis(400));
    let quiet_from = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let late: Vec<_> =
        kmd.notes().into_iter().filter(|(t, n)| *t >= quiet_from && n.contains("WATCHDOG=1")).collect();
    assert!(late.is_empty(), "kept petting after the HSM failed at {failed_at:?}: {late:?}");
    assert!(kmd.child.try_wait().unwrap().is_none(), "kmd keeps running; systemd's watchdog restarts it");

    let (_, _, body) = common::http_get(ready.metrics.unwrap(), "/metrics");
    assert_eq!(common::sample(&body, "kmd_hsm_healthy"), Some(0.0), "{body}");
    assert!(
        common::sample(&body, "kmd_hsm_operation_errors_total{op=\"health_check\"}").unwrap() >= 1.0,
        "{body}"
    );
    assert!(kmd.stderr().contains("HSM health check failed"), "{}", kmd.stderr());
    kmd.stop();
}

#[test]
fn wrong_pin_fails_closed_before_ready() {
    let site = Site::new();
    let wrong = write_private(&site.path().join("wrong.pin"), "not-the-pin\n");
    let text = site.config("").replace(&site.pin_file.display().to_string(), &wrong.display().to_string());
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, Some(1_000_000));
    let status = kmd.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    let log = kmd.stderr();
    assert!(
        log.contains("cannot open the HSM") && log.contains("rejected the user PIN (wrong PIN)"),
        "{log}"
    );
    assert!(log.contains("token labelled \"kmd-test\""), "the HsmError names the token: {log}");
    assert!(
        !log.contains("not-the-pin") && !log.contains(qutemail_hsm::testing::USER_PIN),
        "a PIN was logged: {log}"
    );
    assert!(!kmd.notes().iter().any(|(_, n)| n.contains("READY=1")), "{:?}", kmd.notes());
    assert!(
        kmd.notes().iter().any(|(_, n)| n.contains("STATUS=failed: cannot open the HSM")),
        "{:?}",
        kmd.notes()
    );
}

#[test]
fn missing_token_fails_closed_with_the_hsm_error() {
    let site = Site::new();
    let text = site.config("").replace("label = \"kmd-test\"", "label = \"no-such-token\"");
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, None);
    let status = kmd.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{status}");
    let log = kmd.stderr();
    assert!(log.contains("no token labelled \"no-such-token\" is present"), "{log}");
    assert!(!kmd.notes().iter().any(|(_, n)| n.contains("READY=1")));
}

#[test]
fn missing_certificate_fails_closed_naming_key_and_path() {
    let site = Site::new();
    let text = site.config("").replace("server_cert = \"kmd.pem\"", "server_cert = \"missing.pem\"");
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, None);
    let status = kmd.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{status}");
    let log = kmd.stderr();
    let path = site.path().join("missing.pem");
    assert!(log.contains(&format!("[etsi014] server_cert: cannot read {}", path.display())), "{log}");
    assert!(!kmd.notes().iter().any(|(_, n)| n.contains("READY=1")));
}

#[test]
fn a_second_kmd_on_the_same_store_is_refused() {
    let site = Site::new();
    let config = site.write_config(&site.config(""));
    let mut first = Daemon::start(&site, &config, None);
    first.wait_ready();
    let mut second = Daemon::start(&site, &config, None);
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(second.stderr().contains("is in use by another kmd"), "{}", second.stderr());
    assert!(first.stop().success());
}

#[test]
fn listener_bind_failure_names_the_section() {
    let site = Site::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = site.config("").replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""), 1);
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, None);
    assert!(!kmd.wait_exit(Duration::from_secs(30)).success());
    assert!(kmd.stderr().contains(&format!("[etsi014] listen {addr}: cannot bind")), "{}", kmd.stderr());
}

#[test]
fn sighup_is_ignored_and_sigint_stops() {
    let site = Site::new();
    let config = site.write_config(&site.config(""));
    let mut kmd = Daemon::start(&site, &config, None);
    kmd.wait_ready();
    kmd.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(kmd.child.try_wait().unwrap().is_none(), "SIGHUP must not stop kmd");
    kmd.signal(nix::sys::signal::Signal::SIGINT);
    assert!(kmd.wait_exit(Duration::from_secs(30)).success());
    assert!(kmd.stderr().contains("reload is not supported"), "{}", kmd.stderr());
}

#[test]
fn journald_format_has_priority_prefixes() {
    let site = Site::new();
    let text = site.config("").replace("format = \"text\"", "format = \"journald\"");
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, None);
    kmd.wait_ready();
    kmd.stop();
    let log = kmd.stderr();
    let ready = log.lines().find(|l| l.contains("kmd ready")).expect("ready line");
    assert!(ready.starts_with("<6>kmd::app: kmd ready"), "{ready}");
    assert!(log.lines().any(|l| l.starts_with("<4>") && l.contains("no [[link]] is configured")), "{log}");
    assert!(log.lines().all(|l| l.starts_with('<')), "every line has a priority: {log}");
}

#[test]
fn json_format_is_one_object_per_line() {
    let site = Site::new();
    let text = site.config("").replace("format = \"text\"", "format = \"json\"");
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, None);
    kmd.wait_ready();
    kmd.stop();
    let log = kmd.stderr();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some() && v.get("message").is_some(), "{line}");
    }
    assert!(log.contains("\"message\":\"kmd ready\""), "{log}");
}
