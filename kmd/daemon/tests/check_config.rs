//! `kmd check-config` and `--help`, run as an operator would.

mod common;

use common::{Site, run_kmd};

fn check(site: &Site, text: &str) -> (bool, String, String) {
    let path = site.write_config(text);
    let out = run_kmd(&["check-config", "--config", path.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_configuration_is_summarised() {
    let site = Site::new();
    let (ok, stdout, stderr) = check(&site, &site.config(""));
    assert!(ok, "{stderr}");
    let path = site.path().join("kmd.toml");
    assert!(stdout.starts_with(&format!("{}: valid\n", path.display())), "{stdout}");
    for line in [
        "site      Site A (KME ID KME-A)",
        "sae       A-mail (CN \"A-mail\")",
        "metrics   http://127.0.0.1:0/metrics",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    assert!(stdout.contains(&format!("PIN from file {}", site.pin_file.display())), "{stdout}");
    assert!(!stdout.contains(qutemail_hsm::testing::USER_PIN), "the PIN itself is never printed");
}

#[test]
fn problems_are_reported_with_file_line_column_and_key() {
    let site = Site::new();
    let path = site.path().join("kmd.toml");

    let text = site.config("").replace("[metrics]\n", "[metrics]\nlisten_port = 9464\n");
    let (ok, _, stderr) = check(&site, &text);
    let line = text.lines().position(|l| l.starts_with("listen_port")).unwrap() + 1;
    assert!(!ok);
    assert!(
        stderr.starts_with(&format!(
            "{}:{line}:1: metrics.listen_port: unknown field `listen_port`",
            path.display()
        )),
        "{stderr}"
    );

    let extra = "[[link]]\nid = \"A-B\"\npeer_kme_id = \"KME-B\"\npeer_url = \"https://b:8444\"\n\
                 device = { serial = { path = \"/dev/null\" } }\n[link.pool]\nlow_water = 900\nhigh_water = 500\n";
    let (ok, _, stderr) = check(&site, &site.config(extra));
    assert!(!ok);
    assert!(
        stderr.contains("[link.pool] low_water (900) must be below high_water (500) (link \"A-B\")"),
        "{stderr}"
    );
    assert!(stderr.contains("[peer] is required"), "every problem is listed: {stderr}");

    let text = site
        .config("")
        .replace(&format!("pin = {{ file = \"{}\" }}", site.pin_file.display()), "pin = \"123456\"");
    let (ok, _, stderr) = check(&site, &text);
    assert!(!ok);
    assert!(stderr.contains("[hsm] pin: an inline PIN is never accepted"), "{stderr}");
    assert!(!stderr.contains("123456"), "{stderr}");
}

#[test]
fn missing_files_are_named_by_key_and_path() {
    let site = Site::new();
    let text = site
        .config("")
        .replace("client_ca = \"ca.pem\"", "client_ca = \"nowhere/ca.pem\"")
        .replace(&site.pin_file.display().to_string(), "/nonexistent/hsm.pin");
    let (ok, _, stderr) = check(&site, &text);
    assert!(!ok);
    let ca = site.path().join("nowhere/ca.pem");
    assert!(stderr.contains(&format!("[etsi014] client_ca: cannot read {}", ca.display())), "{stderr}");
    assert!(stderr.contains("[hsm] pin.file: cannot open /nonexistent/hsm.pin"), "{stderr}");

    // A key that is not a key.
    std::fs::write(site.path().join("kmd.key"), "not PEM").unwrap();
    let (ok, _, stderr) = check(&site, &site.config(""));
    assert!(!ok);
    assert!(stderr.contains("[etsi014] server_key"), "{stderr}");
}

#[test]
fn help_documents_every_flag() {
    let out = run_kmd(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config <FILE>",
        "/etc/qutemail/kmd.toml",
        "--log-level <FILTER>",
        "check-config",
        "enrol-sae",
        "run",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    for sub in ["run", "check-config"] {
        let out = run_kmd(&[sub, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("--config <FILE>") && help.contains("[default: /etc/qutemail/kmd.toml]"),
            "{help}"
        );
    }
    let out = run_kmd(&["enrol-sae", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in
        ["--ca-cert <FILE>", "--ca-key <FILE>", "--sae-id <ID>", "--out <DIR>", "--days <N>", "--force"]
    {
        let line =
            help.lines().find(|l| l.contains(flag)).unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        let documented = line.trim().len() > flag.len() + 4
            || help.lines().skip_while(|l| !l.contains(flag)).nth(1).is_some_and(|l| !l.trim().is_empty());
        assert!(documented, "{flag} has no description:\n{help}");
    }
    assert!(!help.contains("--config"), "enrol-sae reads no configuration:\n{help}");
}
