//! The appliance image boots: `cargo xtask image boot-test` builds the Debian 12 disk image (GPT,
//! an EFI system partition with systemd-boot, the ext4 root), boots that disk in qemu (software
//! emulation) under OVMF's UEFI firmware as a VM host would, with a provisioning drop and a
//! simulated QKD device on its second UART, and reports what it found on the console and over the
//! forwarded ports. This test runs it and checks the report as an operator would read it.
//!
//! The boot takes minutes, so it runs only when `image/` (the units included) or the image
//! tooling changed since it last passed on this machine (a content hash kept in
//! `$CARGO_TARGET_DIR/image/boot-test.passed`); a fresh machine or CI cache always runs it.
//! When it does not run, the test says so plainly on stderr.

use std::process::Stdio;

use qutemail_e2e::cargo;

#[test]
fn the_image_boots_provisions_itself_and_serves_mail_etsi014_and_the_web_ui() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    // Progress goes to stderr as it happens: the build and boot take minutes.
    let status = cargo()
        .args(["run", "--quiet", "-p", "xtask", "--", "image", "boot-test", "--if-changed", "--report"])
        .arg(&report_path)
        .stdin(Stdio::null())
        .status()
        .expect("running cargo xtask image boot-test");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&report_path)
            .unwrap_or_else(|e| panic!("no report from the boot test ({e}); exit {status}")),
    )
    .unwrap();
    assert!(status.success(), "the image boot test failed: {report:#}");

    if report["status"] == "skipped" {
        eprintln!("SKIPPED: {}", report["reason"].as_str().unwrap());
        return;
    }
    assert_eq!(report["status"], "passed", "{report:#}");

    // The disk booted by itself: UEFI firmware (OVMF, "EDK II") started systemd-boot from the
    // ESP, which started the kernel with the loader entry's command line (the root by label,
    // the serial console and the hardening arguments of image/build/cmdline.txt).
    assert_eq!(report["boot_path"], "uefi-systemd-boot", "{report:#}");
    let firmware = report["efi_firmware"].as_str().unwrap_or_default();
    assert!(firmware.starts_with("EFI v") && firmware.contains("EDK II"), "{report:#}");
    let cmdline = report["kernel_command_line"].as_str().unwrap_or_default();
    for arg in ["root=LABEL=qutemail-root", "console=ttyS0,115200", "init_on_free=1", "vsyscall=none"] {
        assert!(cmdline.split_whitespace().any(|a| a == arg), "{arg} missing from {cmdline:?}");
    }

    // First boot ran (the stamp's last step) and the gateway answers on port 25 through
    // qutemail-gateway-smtp.socket, under the site name first boot configured.
    assert_eq!(report["firstboot_done"], true, "{report:#}");
    let banner = report["smtp_banner"].as_str().unwrap();
    assert!(banner.starts_with("220 mail.boot.qutemail.test"), "{banner}");

    // kmd answers ETSI GS QKD 014 over mutual TLS with a client certificate from the CA handed
    // to first boot, as the site named in the provisioning drop.
    let etsi = &report["etsi014_status"];
    assert_eq!(etsi["source_KME_ID"], "KME-BOOT", "{etsi}");
    assert_eq!(etsi["target_KME_ID"], "KME-PEER", "{etsi}");
    assert_eq!(etsi["master_SAE_ID"], "BOOT-app", "{etsi}");
    assert_eq!(etsi["slave_SAE_ID"], "PEER-mail", "{etsi}");

    // kmd opened the QKD device (ttyS1, /dev/qkd0 in its unit's private /dev) and key blocks
    // came over it from the simulator on the host.
    assert_eq!(report["device_link_up"], true, "{report:#}");
    assert!(report["key_blocks_received"].as_f64().unwrap() > 0.0, "{report:#}");

    // The web UI over HTTPS on port 443 (through its socket unit).
    assert_eq!(report["web_status"], 200, "{report:#}");
    assert!(report["web_page_start"].as_str().unwrap().to_ascii_lowercase().contains("<html"), "{report:#}");
    eprintln!(
        "image boot test: built in {:.0} s, booted to all checks in {:.0} s",
        report["build_seconds"].as_f64().unwrap_or_default(),
        report["boot_seconds"].as_f64().unwrap_or_default()
    );
}
