//! The README's first command: `cargo xtask demo` brings up both sites and describes them in
//! `state.json` under the documented names.

use qutemail_e2e::xtask;

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
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("QuteMail demo is up"), "{stdout}");
    // With --check the demo stops what it started.
    let pid = state["link"]["simulator_pid"].as_u64().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qkd-sim still running after the demo exited"
    );
}
