//! The README's first command: `cargo xtask demo` brings up both sites and describes them in
//! `state.json` under the documented names.

use std::path::Path;
use std::process::Command;

use qutemail_e2e::{LiveDemo, xtask};

#[test]
fn the_demo_comes_up_and_state_json_keeps_its_contract() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().to_str().unwrap();
    let out = xtask(&["demo", "--check", "--state-dir", state_dir]);
    assert!(
        out.status.success(),
        "demo failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["version"], 1);
    assert_eq!(state["state_dir"].as_str().unwrap(), dir.path().canonicalize().unwrap().to_str().unwrap());
    assert_eq!(state["link"]["id"], "link-a-b");
    assert!(state["link"]["simulator_pid"].as_u64().unwrap() > 0);
    assert!(state["link"]["control_socket"].as_str().unwrap().ends_with("qkd-sim.sock"));
    assert!(std::path::Path::new(state["link"]["simulator_config"].as_str().unwrap()).exists());
    for (site, role) in [("A", "transmitter"), ("B", "receiver")] {
        let s = &state["sites"][site];
        assert_eq!(s["name"], site);
        assert!(s["qkd_device"]["pty"].as_str().unwrap().starts_with("/dev/pts/"), "{s}");
        assert_eq!(s["qkd_device"]["role"], role);
        assert!(s["qkd_device"]["device_id"].as_str().unwrap().starts_with("QSIM-"));
        assert!(s["qkd_device"]["baud_rate"].as_u64().unwrap() > 0);
    }
    check_site_keys(&state);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("QuteMail demo is up"), "{stdout}");
    // With --check the demo stops what it started.
    let pid = state["link"]["simulator_pid"].as_u64().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qkd-sim still running after the demo exited"
    );
    assert_stopped(&state);

    // The fixed ports are free again: run the demo live, take a key at A with curl and the
    // same key at B, then stop the demo with Ctrl-C (SIGINT).
    live_demo_hands_out_the_same_key_at_both_sites();
}

fn check_site_keys(state: &serde_json::Value) {
    for (site, domain, kme) in [("A", "a.qutemail.test", "KME-A"), ("B", "b.qutemail.test", "KME-B")] {
        let s = &state["sites"][site];
        assert_eq!(s["domain"], domain, "{s}");
        assert_eq!(s["kme_id"], kme, "{s}");
        assert!(s["etsi014_url"].as_str().unwrap().starts_with("https://127.0.0.1:"), "{s}");
        assert!(s["metrics_url"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{s}");
        assert!(s["kmd_pid"].as_u64().unwrap() > 0, "{s}");
        assert!(Path::new(s["kmd_config"].as_str().unwrap()).is_file(), "{s}");
        assert!(Path::new(s["ca_cert"].as_str().unwrap()).is_file(), "{s}");
        let saes = s["saes"].as_array().unwrap();
        let ids: Vec<&str> = saes.iter().map(|x| x["sae_id"].as_str().unwrap()).collect();
        assert_eq!(ids, [format!("{site}-mail"), format!("{site}-app")], "{s}");
        for sae in saes {
            assert!(Path::new(sae["cert"].as_str().unwrap()).is_file(), "{sae}");
            assert!(Path::new(sae["key"].as_str().unwrap()).is_file(), "{sae}");
        }
    }
    for (site, user) in [("A", "alice@a.qutemail.test"), ("B", "bob@b.qutemail.test")] {
        let g = &state["sites"][site]["gateway"];
        assert!(g["pid"].as_u64().unwrap() > 0, "{g}");
        for f in ["config", "site_card", "tls_ca"] {
            assert!(Path::new(g[f].as_str().unwrap()).is_file(), "{f}: {g}");
        }
        assert!(g["smtp_mx"].as_str().unwrap().starts_with("127.0.0.1:"), "{g}");
        for listener in ["smtp_submission", "pop3", "pop3s", "imap", "imaps"] {
            assert!(g[listener].as_str().unwrap().starts_with("127.0.0.1:"), "{listener}: {g}");
        }
        assert_eq!(state["sites"][site]["users"][0]["address"], user);
        assert!(!state["sites"][site]["users"][0]["password"].as_str().unwrap().is_empty());
    }
    let dir = Path::new(state["state_dir"].as_str().unwrap());
    for p in [
        "pki",
        "hsm/A",
        "hsm/B",
        "kmd-A.toml",
        "kmd-B.toml",
        "store/A",
        "store/B",
        "mail/A",
        "mail/B",
        "logs",
    ] {
        assert!(dir.join(p).exists(), "{p} missing in {}", dir.display());
    }
}

fn assert_stopped(state: &serde_json::Value) {
    let mut pids = vec![state["link"]["simulator_pid"].as_u64().unwrap()];
    for site in ["A", "B"] {
        pids.push(state["sites"][site]["kmd_pid"].as_u64().unwrap());
        pids.push(state["sites"][site]["gateway"]["pid"].as_u64().unwrap());
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still running after the demo exited"
        );
    }
}

fn curl(site: &serde_json::Value, sae: usize, path: &str) -> serde_json::Value {
    let sae = &site["saes"][sae];
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "20", "--cacert"])
        .arg(site["ca_cert"].as_str().unwrap())
        .arg("--cert")
        .arg(sae["cert"].as_str().unwrap())
        .arg("--key")
        .arg(sae["key"].as_str().unwrap())
        .arg(format!("{}{path}", site["etsi014_url"].as_str().unwrap()))
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {path}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn live_demo_hands_out_the_same_key_at_both_sites() {
    let demo = LiveDemo::start();
    let state = demo.state.clone();
    check_site_keys(&state);
    let (a, b) = (demo.site("A"), demo.site("B"));
    let enc = curl(a, 0, "/api/v1/keys/B-mail/enc_keys");
    let key = &enc["keys"][0];
    let id = key["key_ID"].as_str().unwrap();
    let dec = curl(b, 0, &format!("/api/v1/keys/A-mail/dec_keys?key_ID={id}"));
    assert_eq!(dec["keys"][0]["key_ID"], id, "{dec}");
    assert_eq!(dec["keys"][0]["key"], key["key"], "the same key at both sites: {enc} {dec}");

    let (status, out) = demo.stop();
    assert!(status.success(), "demo exited with {status} after SIGINT: {out}");
    assert!(out.contains("QuteMail demo is up"), "{out}");
    assert_stopped(&state);
}
