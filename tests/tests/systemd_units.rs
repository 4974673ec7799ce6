//! The appliance's systemd units (`image/systemd/`), checked with systemd's own tools as an
//! image build would: `systemd-analyze security --offline=yes` scores every daemon unit 1.5 or
//! lower, `systemd-analyze verify` accepts every unit against the built binaries, the
//! sysusers.d and tmpfiles.d snippets apply to an empty root, and every `ExecStart=` command
//! line parses with the real binary.
//!
//! No booted systemd is needed: everything runs offline against a temporary root directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use qutemail_e2e::{workspace_bin, workspace_root};

const DAEMON_UNITS: [&str; 3] = ["qutemail-kmd.service", "qutemail-gateway.service", "qkd-sim.service"];

/// The gateway's socket units: port and the `FileDescriptorName=` that `qutemail serve` looks
/// for (appliance/gateway/src/systemd.rs `LISTENER_NAMES`).
const SOCKETS: [(&str, u16, &str); 8] = [
    ("qutemail-gateway-smtp.socket", 25, "smtp-mx"),
    ("qutemail-gateway-submission.socket", 587, "smtp-submission"),
    ("qutemail-gateway-submissions.socket", 465, "smtp-submissions"),
    ("qutemail-gateway-imap.socket", 143, "imap"),
    ("qutemail-gateway-imaps.socket", 993, "imaps"),
    ("qutemail-gateway-pop3.socket", 110, "pop3"),
    ("qutemail-gateway-pop3s.socket", 995, "pop3s"),
    ("qutemail-gateway-web.socket", 443, "web"),
];

fn units_dir() -> PathBuf {
    workspace_root().join("image/systemd")
}

fn read_unit(name: &str) -> String {
    std::fs::read_to_string(units_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Values of `key=` in a unit file (comments and sections ignored), in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .collect()
}

/// `systemd-analyze security --offline=yes --threshold=15 UNIT`: the exit status and the
/// overall exposure level it prints (0.0 to 10.0; the threshold is in tenths).
fn exposure(unit: &Path) -> (bool, f64, String) {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze (apt-get install -y systemd)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let score = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    (out.status.success(), score, text)
}

#[test]
fn every_daemon_unit_scores_1_5_or_lower() {
    let mut report = Vec::new();
    for unit in DAEMON_UNITS {
        let (ok, score, text) = exposure(&units_dir().join(unit));
        println!("{unit}: exposure {score:.1}");
        report.push((unit, score, ok, text));
    }
    for (unit, score, ok, text) in &report {
        assert!(*score <= 1.5, "{unit} scores {score}, above 1.5:\n{text}");
        assert!(ok, "systemd-analyze security --threshold=15 refused {unit}:\n{text}");
    }
    // The threshold really is in tenths: a unit with no hardening scores far above it and the
    // same command refuses it.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare.service");
    std::fs::write(&bare, "[Service]\nExecStart=/usr/bin/true\n").unwrap();
    let (ok, score, text) = exposure(&bare);
    assert!(!ok && score > 5.0, "an unhardened unit passed ({score}):\n{text}");
}

/// A root directory holding the units, systemd's own units (targets) and the real binaries
/// at the paths the units name, for `systemd-analyze verify --root=`.
fn verify_root() -> tempfile::TempDir {
    // Beside the binaries, so they can be hard-linked rather than copied.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let system = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "service" || e == "socket") {
            std::fs::copy(&path, system.join(path.file_name().unwrap())).unwrap();
        }
    }
    // systemd's units (sysinit.target, network-online.target, ...) from this machine.
    std::fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
    let status = Command::new("cp")
        .args(["-a", "/lib/systemd/system"])
        .arg(root.path().join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success(), "copying /lib/systemd/system");
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (package, name) in [("kmd", "kmd"), ("qutemail-gateway", "qutemail"), ("qkd-sim", "qkd-sim")] {
        let built = workspace_bin(package, name);
        if std::fs::hard_link(&built, bin.join(name)).is_err() {
            std::fs::copy(&built, bin.join(name)).unwrap();
        }
    }
    root
}

#[test]
fn systemd_analyze_verify_accepts_every_unit_with_the_real_binaries() {
    let root = verify_root();
    let mut units: Vec<String> = DAEMON_UNITS.iter().map(|u| (*u).to_owned()).collect();
    units.extend(SOCKETS.iter().map(|(u, _, _)| (*u).to_owned()));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit 0): any output is a finding.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");

    // The same check notices a unit whose binary is missing and a misspelt key.
    std::fs::remove_file(root.path().join("usr/bin/qkd-sim")).unwrap();
    let broken = root.path().join("etc/systemd/system/qutemail-gateway.service");
    let text = std::fs::read_to_string(&broken).unwrap().replace("ProtectClock=", "ProtectClocks=");
    std::fs::write(&broken, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(["qkd-sim.service", "qutemail-gateway.service"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/usr/bin/qkd-sim is not executable"), "{stderr}");
    assert!(stderr.contains("Unknown key 'ProtectClocks'"), "{stderr}");
}

#[test]
fn daemons_are_notify_services_with_a_watchdog_and_no_capabilities() {
    for unit in DAEMON_UNITS {
        let text = read_unit(unit);
        assert_eq!(values(&text, "Type"), ["notify"], "{unit}");
        assert_eq!(values(&text, "NotifyAccess"), ["main"], "{unit}");
        assert!(!values(&text, "WatchdogSec").is_empty(), "{unit}: WatchdogSec=");
        assert_eq!(values(&text, "CapabilityBoundingSet"), [""], "{unit}: no capabilities at all");
        assert_eq!(values(&text, "AmbientCapabilities"), [""], "{unit}");
        assert_eq!(values(&text, "NoNewPrivileges"), ["yes"], "{unit}");
        assert_eq!(values(&text, "ProtectSystem"), ["strict"], "{unit}");
        assert_eq!(values(&text, "PrivateUsers"), ["yes"], "{unit}");
        assert_eq!(values(&text, "PrivateDevices"), ["yes"], "{unit}");
        assert_eq!(values(&text, "MemoryDenyWriteExecute"), ["yes"], "{unit}");
        assert_eq!(values(&text, "RestrictAddressFamilies"), ["AF_INET AF_INET6 AF_UNIX"], "{unit}");
        assert_eq!(
            values(&text, "SystemCallFilter"),
            ["@system-service", "~@privileged @resources"],
            "{unit}"
        );
        assert_eq!(values(&text, "UMask"), ["0077"], "{unit}");
        let user = values(&text, "User");
        assert!(user.len() == 1 || values(&text, "DynamicUser") == ["yes"], "{unit}: a dedicated user");
        assert!(!user.contains(&"root"), "{unit}");
    }
    let kmd = read_unit("qutemail-kmd.service");
    assert_eq!(values(&kmd, "User"), ["qutemail-kmd"]);
    assert_eq!(values(&kmd, "BindPaths"), ["-/dev/qkd0"], "the QKD device is bound into the private /dev");
    assert_eq!(values(&kmd, "DeviceAllow"), ["/dev/qkd0 rw"]);
    let gateway = read_unit("qutemail-gateway.service");
    assert_eq!(values(&gateway, "User"), ["qutemail"]);
    for (unit, text, state, credentials) in [
        (
            "kmd",
            &kmd,
            "qutemail/kmd",
            &["hsm-pin", "etsi014-server.key", "peer-server.key", "peer-client.key"][..],
        ),
        ("gateway", &gateway, "qutemail/gateway", &["hsm-pin", "tls.key", "kmd-client.key"][..]),
    ] {
        assert_eq!(values(text, "StateDirectory"), [state], "{unit}");
        let loaded: Vec<&str> = values(text, "LoadCredential")
            .iter()
            .filter_map(|v| v.split_once(':'))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(loaded, credentials, "{unit}: secrets come in as credentials");
        assert!(
            values(text, "Environment")
                .iter()
                .any(|e| e.starts_with("SOFTHSM2_CONF=/etc/qutemail/softhsm2-")),
            "{unit}: SoftHSM finds its token store"
        );
    }
}

#[test]
fn socket_units_pass_each_privileged_port_to_the_gateway_under_its_listener_name() {
    let mut found: Vec<String> = std::fs::read_dir(units_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".socket"))
        .collect();
    found.sort();
    let mut expected: Vec<String> = SOCKETS.iter().map(|(u, _, _)| (*u).to_owned()).collect();
    expected.sort();
    assert_eq!(found, expected);
    for (unit, port, name) in SOCKETS {
        let text = read_unit(unit);
        assert_eq!(values(&text, "ListenStream"), [port.to_string()], "{unit}");
        assert_eq!(values(&text, "FileDescriptorName"), [name], "{unit}");
        assert_eq!(values(&text, "Service"), ["qutemail-gateway.service"], "{unit}");
        assert_eq!(values(&text, "WantedBy"), ["sockets.target"], "{unit}");
    }
}

#[test]
fn sysusers_and_tmpfiles_apply_to_an_empty_root() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(units_dir().join("qutemail.sysusers"))
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-sysusers: {}", String::from_utf8_lossy(&out.stderr));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    for user in ["qutemail-kmd", "qutemail"] {
        let line =
            passwd.lines().find(|l| l.starts_with(&format!("{user}:"))).unwrap_or_else(|| panic!("{passwd}"));
        assert!(line.ends_with(":/usr/sbin/nologin"), "{user} has no login: {line}");
    }
    let out = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(units_dir().join("qutemail.tmpfiles"))
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-tmpfiles: {}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| std::fs::metadata(root.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("etc/qutemail/credentials"), 0o700);
    assert_eq!(mode("var/lib/qutemail/kmd/softhsm-tokens"), 0o700);
    let conf = std::fs::read_to_string(root.path().join("etc/qutemail/softhsm2-kmd.conf")).unwrap();
    assert!(
        conf.lines().any(|l| l == "directories.tokendir = /var/lib/qutemail/kmd/softhsm-tokens"),
        "{conf}"
    );
    // The SoftHSM file is one the library reads: softhsm2-util lists the (empty) token store.
    let tokens = root.path().join("var/lib/qutemail/kmd/softhsm-tokens");
    let conf_path = root.path().join("softhsm2-test.conf");
    std::fs::write(
        &conf_path,
        conf.replace("/var/lib/qutemail/kmd/softhsm-tokens", tokens.to_str().unwrap()),
    )
    .unwrap();
    let out =
        Command::new("softhsm2-util").arg("--show-slots").env("SOFTHSM2_CONF", &conf_path).output().unwrap();
    assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_exec_start_parses_with_the_real_binary() {
    for unit in DAEMON_UNITS {
        let text = read_unit(unit);
        for key in ["ExecStartPre", "ExecStart"] {
            for line in values(&text, key) {
                let mut words = line.split_whitespace();
                let program = words.next().unwrap();
                let name = program.rsplit('/').next().unwrap();
                let package = match name {
                    "kmd" => "kmd",
                    "qutemail" => "qutemail-gateway",
                    "qkd-sim" => "qkd-sim",
                    other => panic!("{unit}: unexpected program {other}"),
                };
                assert_eq!(program, format!("/usr/bin/{name}"), "{unit}");
                // Every option of the line is known to the binary: clap stops at an unknown one
                // before it reaches --help.
                let out =
                    Command::new(workspace_bin(package, name)).args(words).arg("--help").output().unwrap();
                assert!(
                    out.status.success(),
                    "{unit}: `{line}` does not parse: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
