//! `qutemail serve` under systemd's protocols, driven by the real tools: sockets passed by
//! `systemd-socket-activate` (the sd_listen_fds protocol that `.socket` units use, with
//! `FileDescriptorName=` names), and `Type=notify` messages (`READY=1`, `WATCHDOG=1`,
//! `STOPPING=1`) read from a `NOTIFY_SOCKET` datagram socket as PID 1 reads them.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Running, site_config, write_tls};
use qutemail_hsm::testing::isolated;

const TOKEN: &str = "gateway";

/// A gateway configuration whose MX listener names an address this machine cannot bind
/// (TEST-NET-1): mail reaches it only through a socket systemd passes in.
fn config(dir: &Path, pin: &Path) -> String {
    site_config(dir, pin, TOKEN)
        + r#"
[smtp]
hostname = "mail.a.test"
mx_listen = "192.0.2.1:25"
submission_listen = "127.0.0.1:0"
"#
}

fn write_site(dir: &Path, pin: &Path) -> std::path::PathBuf {
    write_tls(dir, "socket activation test CA", &["localhost", "127.0.0.1"]);
    let config_path = dir.join("qutemail.toml");
    std::fs::write(&config_path, config(dir, pin)).unwrap();
    config_path
}

/// A port that was free a moment ago, for `systemd-socket-activate -l`.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `systemd-socket-activate` listening on `port` with `fdname`, launching `qutemail serve` on
/// the first connection with the socket as descriptor 3 (`LISTEN_FDS=1`, `LISTEN_PID`,
/// `LISTEN_FDNAMES`).
fn socket_activated_serve(port: u16, fdname: &str, config: &Path, notify: Option<&Path>) -> Child {
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(format!("127.0.0.1:{port}")).arg(format!("--fdname={fdname}"));
    // systemd-socket-activate gives the daemon only the variables named with -E.
    cmd.args(["-E", "SOFTHSM2_CONF", "-E", "QUTEMAIL_LOG=info"]);
    if let Some(socket) = notify {
        cmd.arg("-E").arg(format!("NOTIFY_SOCKET={}", socket.display()));
        // 1 s watchdog: the gateway pets every 0.5 s.
        cmd.args(["-E", "WATCHDOG_USEC=1000000"]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_qutemail"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (apt-get install -y systemd)")
}

/// Connects to `port`, retrying until systemd-socket-activate listens (it binds right after
/// it starts).
fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "systemd-socket-activate never listened on {port}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Notification datagrams until one contains `wanted` (each datagram's `KEY=value` lines).
fn wait_for_notify(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = text.lines().any(|l| l == wanted);
                seen.push(text);
                if found {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading NOTIFY_SOCKET: {e}"),
        }
    }
    panic!("no {wanted} within 120 s; received {seen:?}");
}

#[test]
fn serve_takes_the_smtp_socket_from_systemd_and_reports_to_notify_socket() {
    isolated("serve_takes_the_smtp_socket_from_systemd_and_reports_to_notify_socket", &[TOKEN], |env| {
        let config_path = write_site(&env.dir, &env.pin_file);
        let notify_path = env.dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let port = free_port();
        let mut child = socket_activated_serve(port, "smtp-mx", &config_path, Some(&notify_path));
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let serve = Running(child, None);

        // The first connection makes systemd-socket-activate start the gateway, which then
        // accepts it from the passed socket and greets.
        let client = connect(port);
        client.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut banner = String::new();
        let got = BufReader::new(&client).read_line(&mut banner);
        if got.is_err() || banner.is_empty() {
            let mut log = String::new();
            let _ = stderr.read_to_string(&mut log);
            panic!("no SMTP banner through the passed socket ({got:?}); gateway log:\n{log}");
        }
        assert!(banner.starts_with("220 mail.a.test"), "{banner:?}");

        // The READY line names the passed socket for smtp-mx (not the configured 192.0.2.1:25,
        // which cannot be bound here) and the bound address for smtp-submission.
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready).unwrap();
        assert!(ready.starts_with("READY "), "{ready:?}");
        assert!(ready.split_whitespace().any(|w| w == format!("smtp-mx=127.0.0.1:{port}")), "{ready:?}");
        assert!(
            ready.split_whitespace().any(|w| w.starts_with("smtp-submission=127.0.0.1:")),
            "a listener without a passed socket still binds its configured address: {ready:?}"
        );

        let mut seen = Vec::new();
        wait_for_notify(&notify, "READY=1", &mut seen);
        assert!(
            seen.iter().any(|d| d.lines().any(|l| l.starts_with("STATUS=serving smtp-"))),
            "READY=1 comes with a STATUS= line: {seen:?}"
        );
        // Two pets prove a timer, not a one-off.
        wait_for_notify(&notify, "WATCHDOG=1", &mut seen);
        wait_for_notify(&notify, "WATCHDOG=1", &mut seen);

        let pid = serve.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        wait_for_notify(&notify, "STOPPING=1", &mut seen);
        let mut serve = serve;
        let status = serve.0.wait().unwrap();
        assert!(status.success(), "qutemail serve exited with {status} after SIGTERM");
    });
}

#[test]
fn a_passed_socket_the_gateway_cannot_serve_stops_the_start_with_its_name() {
    isolated("a_passed_socket_the_gateway_cannot_serve_stops_the_start_with_its_name", &[TOKEN], |env| {
        let config_path = write_site(&env.dir, &env.pin_file);
        let unbindable = std::fs::read_to_string(&config_path).unwrap();
        let bindable = unbindable.replace("192.0.2.1:25", "127.0.0.1:0");
        for (fdname, config, expected) in [
            // A name that is no gateway listener.
            ("gopher", &bindable, "socket named \"gopher\""),
            // A listener the configuration does not enable.
            (
                "pop3",
                &bindable,
                "the socket \"pop3\", but the configuration does not enable that listener ([pop3] listen)",
            ),
            // The MX listener got no socket, so its configured address is bound (and fails here).
            ("smtp-submission", &unbindable, "[smtp] cannot listen on 192.0.2.1:25 (smtp-mx)"),
        ] {
            std::fs::write(&config_path, config).unwrap();
            let port = free_port();
            let child = socket_activated_serve(port, fdname, &config_path, None);
            let _client = connect(port);
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{fdname}: the gateway started anyway");
            assert!(stderr.contains(expected), "{fdname}: {stderr}");
            assert!(
                out.stdout.is_empty(),
                "{fdname}: no READY line: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    });
}
