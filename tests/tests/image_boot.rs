//! The appliance image boots: `cargo xtask image boot-test` builds the Debian 12 disk image (GPT,
//! an EFI system partition with systemd-boot, the ext4 root), boots that disk in qemu (software
//! emulation) under OVMF's UEFI firmware as a VM host would, with a provisioning drop and a
//! simulated QKD device on its second UART, and reports what it found on the console and over the
//! forwarded ports. This test runs it and checks the report as an operator would read it.
//!
//! It is also the disaster-recovery drill an operator runs when an appliance is lost: site B of
//! the live two-site demo receives a QKD-sealed (hybrid) message from site A, `qutemailctl backup`
//! archives B while it serves, and the freshly built image, provisioned as B's domain with the
//! archive on its provisioning drop, restores it at first boot into its own new SoftHSM token.
//! Bob then reads the message over IMAPS from the booted appliance: the same bytes B served
//! before, and its plaintext nowhere on the appliance's disk.
//!
//! The boot takes minutes, so it runs only when `image/` (the units included) or the image
//! tooling changed since it last passed on this machine (a content hash kept in
//! `$CARGO_TARGET_DIR/image/boot-test.passed`); a fresh machine or CI cache always runs it.
//! When it does not run, the test says so plainly on stderr.

use std::path::Path;
use std::process::Stdio;

use qutemail_e2e::gateway::{DemoGateway, wait_for};
use qutemail_e2e::site::{imaps_inbox, submit};
use qutemail_e2e::{LiveDemo, cargo, file_contains};

const PASSPHRASE: &str = "moving day for site B, 2026";

/// Runs `cargo xtask image boot-test ARGS… --report FILE` and returns the report.
fn boot_test(args: &[&str], report_path: &Path) -> serde_json::Value {
    // Progress goes to stderr as it happens: the build and boot take minutes.
    let status = cargo()
        .args(["run", "--quiet", "-p", "xtask", "--", "image", "boot-test", "--report"])
        .arg(report_path)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("running cargo xtask image boot-test");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(report_path)
            .unwrap_or_else(|e| panic!("no report from the boot test ({e}); exit {status}")),
    )
    .unwrap();
    assert!(status.success(), "the image boot test failed: {report:#}");
    report
}

#[test]
fn the_image_boots_restores_a_backup_and_serves_mail_etsi014_and_the_web_ui() {
    let dir = tempfile::tempdir().unwrap();
    let plan = boot_test(&["--if-changed", "--plan"], &dir.path().join("plan.json"));
    if plan["status"] == "skipped" {
        eprintln!("SKIPPED: {}", plan["reason"].as_str().unwrap());
        return;
    }
    assert_eq!(plan["status"], "due", "{plan:#}");

    // The site to move: B of the live demo, holding a hybrid QKD-sealed message from A.
    let demo = LiveDemo::start();
    let (a, b) = (demo.site("A").clone(), demo.site("B").clone());
    let domain = b["domain"].as_str().unwrap().to_owned();
    let bob = b["users"][0]["address"].as_str().unwrap().to_owned();
    let bob_password = b["users"][0]["password"].as_str().unwrap().to_owned();
    let mut nonce = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut nonce).unwrap();
    let canary = format!("image-restore-canary-{:016x}", u64::from_le_bytes(nonce));
    let body = dir.path().join("body.txt");
    std::fs::write(&body, format!("Everything must survive the move:\n{canary}\n")).unwrap();
    assert_eq!(submit(&a, &bob, "Before the move", &body, None), "{}");
    let mut before = Vec::new();
    wait_for("A's message in Bob's INBOX at B", std::time::Duration::from_secs(180), || {
        before = imaps_inbox(&b, &bob, &bob_password);
        !before.is_empty()
    });
    assert_eq!(before.len(), 1);
    let before = before.remove(0);
    let text = String::from_utf8_lossy(&before);
    assert!(text.contains("X-QKD-Secure: True") && text.contains(&canary), "{text}");

    let archive = dir.path().join("site-b.qmb");
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, format!("{PASSPHRASE}\n")).unwrap();
    DemoGateway::of(&demo, "B").qutemailctl(&[
        "backup",
        "--out",
        archive.to_str().unwrap(),
        "--passphrase-file",
        passphrase.to_str().unwrap(),
    ]);
    assert!(!file_contains(&archive, canary.as_bytes()), "the archive holds the plaintext");
    // The old appliance is gone (and the demo's fixed ports are free for other tests).
    drop(demo);

    let password_file = dir.path().join("bob-password");
    std::fs::write(&password_file, format!("{bob_password}\n")).unwrap();
    let report = boot_test(
        &[
            "--if-changed",
            "--site-domain",
            &domain,
            "--restore",
            archive.to_str().unwrap(),
            "--restore-passphrase-file",
            passphrase.to_str().unwrap(),
            "--imap-user",
            &bob,
            "--imap-password-file",
            password_file.to_str().unwrap(),
        ],
        &dir.path().join("report.json"),
    );
    if report["status"] == "skipped" {
        // Another run passed the same image in between: nothing of this one was checked.
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
    assert!(banner.starts_with(&format!("220 mail.{domain}")), "{banner}");

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
    // First boot restored the backup: B's domain, its one message, every key re-wrapped by the
    // appliance's own new token.
    let restore =
        report["restore_lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect::<Vec<_>>();
    let summary =
        restore.iter().find(|l| l.starts_with("restored ")).unwrap_or_else(|| panic!("{restore:?}"));
    assert!(summary.starts_with(&format!("restored {domain} from a backup")), "{summary}");
    assert!(summary.contains(" 1 messages") && summary.contains("wrapped by this site's HSM"), "{summary}");

    // Bob reads his mail from the new appliance over IMAPS: the very bytes B served before the
    // move, the QKD protection headers included.
    let inbox = report["imap_inbox"].as_array().unwrap();
    assert_eq!(inbox.len(), 1, "{report:#}");
    let after = std::fs::read(inbox[0]["file"].as_str().unwrap()).unwrap();
    assert_eq!(String::from_utf8_lossy(&after), String::from_utf8_lossy(&before));
    assert_eq!(after, before);

    // Nothing on the appliance's disk (nor the drop, which carried the archive) holds the
    // plaintext: the restored message is stored sealed, its keys wrapped by the appliance's HSM.
    for disk in [&report["booted_disk"], &report["drop_disk"]] {
        let disk = Path::new(disk.as_str().unwrap());
        assert!(!file_contains(disk, canary.as_bytes()), "{} holds the message's plaintext", disk.display());
    }

    eprintln!(
        "image boot test: built in {:.0} s, booted to all checks in {:.0} s",
        report["build_seconds"].as_f64().unwrap_or_default(),
        report["boot_seconds"].as_f64().unwrap_or_default()
    );
}
