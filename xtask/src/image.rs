//! `cargo xtask image`: the appliance's Debian 12 disk image, and its boot test in qemu.
//!
//! `build` debootstraps Debian 12 (minbase and `image/build/packages.txt`, systemd-boot's EFI
//! binary included) into a directory, adds the project's release binaries, the units of
//! `image/systemd/` and the overlay of `image/rootfs/` (firewall, sysctl and journald settings,
//! first-boot provisioning) and applies the unit presets. It then assembles `qutemail.img`, a GPT
//! disk that boots by itself under UEFI, without a loop device or a mount:
//!
//! - the root file system as a separate ext4 file (`mke2fs -d` from the directory);
//! - the EFI system partition as a separate FAT32 file (`mkfs.vfat -C`, filled with mtools'
//!   `mmd`/`mcopy -i`): systemd-boot at the removable-media path `EFI/BOOT/BOOTX64.EFI` (so no
//!   firmware boot entry is needed), `loader/loader.conf` (`image/build/loader.conf`: no editor, so
//!   the kernel command line cannot be changed at the console) and a Boot Loader Specification
//!   entry with the kernel, the initrd and the command line of `image/build/cmdline.txt`;
//! - a sparse disk file partitioned with `sfdisk` (partition 1 the ESP, partition 2 the root,
//!   typed for the Discoverable Partitions Specification), both file systems copied in at their
//!   offsets with `dd conv=notrunc,sparse`.
//!
//! `boot-test` builds the image and boots that disk as a VM host does: OVMF's UEFI firmware, the
//! disk as the first virtio drive, no `-kernel`. Beside it a provisioning drop (a second virtual
//! disk labelled `QMPROVISION` holding a CA that this command made, so it can talk mutual TLS to
//! the appliance) and `qkd-sim`'s device on the guest's second UART. It checks on the console that
//! the kernel came up under UEFI with the loader entry's command line, then over forwarded ports
//! what an operator would: kmd answers ETSI GS QKD 014 status and its device link is up, the
//! gateway's socket unit answers SMTP on port 25, the web UI loads. Given a `qutemailctl backup`
//! archive (`--restore`), the drop carries it as an operator moving a site to a new appliance
//! would, first boot restores it into the fresh HSM token and store, and `--imap-user` reads that
//! account's INBOX back over IMAPS from the booted appliance.
//!
//! Debootstrap's downloads and the installed base system are cached under
//! `$CARGO_TARGET_DIR/image/cache/`, keyed by the package list, so a rebuild takes a minute.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use etsi014::client::{ClientOptions, ClientTlsConfig, Etsi014Client};
use serde::Serialize;

use crate::system;

const DEBIAN_SUITE: &str = "bookworm";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// The root file system's size in MiB; the files are sparse, so this is its room to grow.
const ROOT_SIZE_MIB: u64 = 3072;
/// The ext4 label of the root file system (what `root=` and /etc/fstab name), and the GPT name of
/// its partition.
const ROOT_LABEL: &str = "qutemail-root";
/// The EFI system partition's size in MiB: room for two kernels with their initrds (an update
/// writes the new one before removing the old) and FAT32's minimum cluster count.
const ESP_SIZE_MIB: u64 = 256;
/// The ESP's GPT partition name (/etc/fstab mounts it at /boot/efi by it) and its FAT label
/// (at most 11 characters).
const ESP_PARTLABEL: &str = "qutemail-esp";
const ESP_FAT_LABEL: &str = "QUTEMAILESP";
/// Where partition 1 starts, in MiB: the usual 1 MiB alignment, room for the primary GPT.
const FIRST_PARTITION_MIB: u64 = 1;
/// GPT partition types: the EFI system partition, and the x86-64 root file system of the
/// Discoverable Partitions Specification (so tools recognise the root without being told).
const ESP_TYPE_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_X86_64_TYPE_GUID: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// systemd-boot's EFI binary as Debian 12's systemd-boot-efi installs it in the image.
const SYSTEMD_BOOT_EFI: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// The console the loader entry gives the kernel: the screen, and the first serial port last so
/// it is /dev/console (a VM host's serial log, the boot test's console.log).
const CONSOLE_ARGS: &str = "console=tty0 console=ttyS0,115200";
/// The UEFI firmware of Debian's `ovmf` package (4 MiB flash layout, without Secure Boot keys),
/// code read-only and a per-boot copy of the variable store, as libvirt sets it up.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// What the `--report` calls the way the boot test boots the disk.
const BOOT_PATH: &str = "uefi-systemd-boot";
/// The binaries the image ships: (cargo package, binary).
const BINARIES: &[(&str, &str)] = &[
    ("kmd", "kmd"),
    ("qutemail-gateway", "qutemail"),
    ("qutemail-gateway", "qutemailctl"),
    ("qkd-sim", "qkd-sim"),
];

/// The site the boot test provisions.
const TEST_DOMAIN: &str = "boot.qutemail.test";
const TEST_KME: &str = "KME-BOOT";
const TEST_PEER_KME: &str = "KME-PEER";
const TEST_APP_SAE: &str = "BOOT-app";
const TEST_PEER_SAE: &str = "PEER-mail";
const TEST_LINK: &str = "link-boot";
/// Generous: the first boot under software emulation also makes keys and certificates.
const BOOT_DEADLINE: Duration = Duration::from_secs(900);

/// Host packages for building the image, and for booting it.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "installs Debian 12 into the image's root directory"),
    ("e2fsprogs", "mke2fs -d makes the root file system's ext4 image from that directory"),
    ("dosfstools", "mkfs.vfat makes the EFI system partition's FAT32 image"),
    ("mtools", "mmd and mcopy fill the EFI system partition's image without mounting it"),
    ("fdisk", "sfdisk writes the disk image's GPT partition table"),
    ("binutils", "strip: the image's binaries without debug sections"),
    ("systemd", "systemctl --root applies the image's unit presets"),
];
const BOOT_PACKAGES: &[(&str, &str)] = &[
    ("openssl", "the boot test's provisioning CA"),
    ("curl", "the boot test loads the web UI over HTTPS"),
    ("ovmf", "the UEFI firmware the boot test boots the disk with, as a VM host does"),
];

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build the appliance image (as root): debootstrap Debian 12, install the binaries, units
    /// and settings, make a GPT disk with an EFI system partition (systemd-boot) and the ext4
    /// root. Writes qutemail.img, a raw disk that boots under UEFI.
    Build {
        /// Output directory [default: $CARGO_TARGET_DIR/image/out].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build the image and boot the disk in qemu (software emulation, OVMF's UEFI firmware) with
    /// a simulated QKD device, checking ETSI GS QKD 014, SMTP on port 25 and the web UI over
    /// forwarded ports.
    BootTest {
        /// Output directory for the image [default: $CARGO_TARGET_DIR/image/out].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the checks' results as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Skip (and say so) when image/ and this command are unchanged since the boot test last
        /// passed on this machine.
        #[arg(long)]
        if_changed: bool,
        /// With --if-changed: only decide whether the boot test is due, write the report (status
        /// `skipped` or `due`) and stop, so a caller prepares a backup only when it will be used.
        #[arg(long, requires = "if_changed")]
        plan: bool,
        #[command(flatten)]
        site: BootSite,
    },
}

/// What the boot test's provisioning drop gives first boot, and what it reads back afterwards.
#[derive(clap::Args, Debug, Clone)]
pub struct BootSite {
    /// The site's mail domain in the drop's provision.conf (a restored backup must be of this
    /// domain).
    #[arg(long, value_name = "DOMAIN", default_value = TEST_DOMAIN)]
    site_domain: String,
    /// A `qutemailctl backup` archive that first boot restores (put on the drop as restore.qmb,
    /// as an operator moving a site to a new appliance does).
    #[arg(long, value_name = "FILE", requires = "restore_passphrase_file")]
    restore: Option<PathBuf>,
    /// The archive's passphrase (first line of FILE; put on the drop as restore-passphrase).
    #[arg(long, value_name = "FILE", requires = "restore")]
    restore_passphrase_file: Option<PathBuf>,
    /// After the other checks, read this account's INBOX over IMAPS (port 993, curl) and put
    /// every message in the report.
    #[arg(long, value_name = "ADDRESS", requires = "imap_password_file")]
    imap_user: Option<String>,
    /// The IMAP account's password (first line of FILE).
    #[arg(long, value_name = "FILE", requires = "imap_user")]
    imap_password_file: Option<PathBuf>,
}

pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Build { out } => {
            let built = build(&out.unwrap_or_else(default_out))?;
            eprintln!("image: {} (GPT, UEFI with systemd-boot)", built.image.display());
            eprintln!("kernel {}, command line: {}", built.kernel_version, built.kernel_options);
            Ok(())
        }
        ImageCommand::BootTest { out, report, if_changed, plan, site } => {
            boot_test(&out.unwrap_or_else(default_out), report.as_deref(), if_changed, plan, &site)
        }
    }
}

fn default_out() -> PathBuf {
    work_dir().join("out")
}

/// `$CARGO_TARGET_DIR/image`: caches, the root directory, the output.
fn work_dir() -> PathBuf {
    system::target_dir("image")
}

/// What `build` made.
struct BuiltImage {
    /// The GPT disk image.
    image: PathBuf,
    /// The kernel release the loader entry boots (`6.1.0-…-cloud-amd64`).
    kernel_version: String,
    /// The loader entry's `options`: what the kernel must report as its command line.
    kernel_options: String,
}

fn build(out: &Path) -> anyhow::Result<BuiltImage> {
    if !system::is_root() {
        bail!(
            "building the image needs root (debootstrap chroots, and the image's files must belong to root and the daemons' users)"
        );
    }
    system::ensure_packages(BUILD_PACKAGES, true)?;
    let started = Instant::now();
    let root_dir = system::workspace_root();
    let packages = read_list(&root_dir.join("image/build/packages.txt"))?;
    let cmdline = read_list(&root_dir.join("image/build/cmdline.txt"))?.join(" ");

    eprintln!("image: building the release binaries");
    let mut cargo = system::cargo();
    cargo.args(["build", "--release", "--quiet"]);
    for (package, _) in BINARIES {
        cargo.args(["-p", package]);
    }
    if !cargo.status().context("running cargo build --release")?.success() {
        bail!("building the release binaries failed");
    }

    let work = work_dir();
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache)?;
    let key = sha256_hex(format!("{DEBIAN_SUITE} {DEBIAN_MIRROR} {}", packages.join(",")).as_bytes())?;
    let key = &key[..16];
    let base = base_system(&cache, key, &packages)?;

    let rootfs = work.join("rootfs");
    remove_dir(&rootfs)?;
    eprintln!("image: copying the base system");
    exec(Command::new("cp").arg("-a").arg(&base).arg(&rootfs), "copying the base system")?;
    install_appliance(&root_dir, &rootfs)?;
    // Where /etc/fstab mounts the ESP (on first use), for updating the boot loader and kernel.
    std::fs::create_dir_all(rootfs.join("boot/efi"))?;

    let boot = rootfs.join("boot");
    let kernel = newest(&boot, "vmlinuz-")?;
    let kernel_version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("the kernel's file name names no version")?
        .to_string();
    let initrd = boot.join(format!("initrd.img-{kernel_version}"));
    if !initrd.is_file() {
        bail!("the image has kernel {kernel_version} but no {}", initrd.display());
    }
    let kernel_options = format!("root=LABEL={ROOT_LABEL} rw {CONSOLE_ARGS} {cmdline}");

    let root_fs = work.join("root.ext4");
    let _ = std::fs::remove_file(&root_fs);
    eprintln!("image: the root file system (mke2fs -d)");
    exec(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-E", "root_owner=0:0", "-d"])
            .arg(&rootfs)
            .arg(&root_fs)
            .arg(format!("{ROOT_SIZE_MIB}M")),
        "making the root file system (mke2fs -d)",
    )?;

    let esp = work.join("esp.vfat");
    eprintln!("image: the EFI system partition (systemd-boot, kernel {kernel_version})");
    make_esp(&root_dir, &rootfs, &esp, &kernel, &initrd, &kernel_version, &kernel_options)?;

    std::fs::create_dir_all(out)?;
    let image = out.join("qutemail.img");
    eprintln!("image: the GPT disk (sfdisk, dd)");
    make_disk(&image, &esp, &root_fs)?;
    eprintln!("image: built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(BuiltImage { image, kernel_version, kernel_options })
}

/// The EFI system partition as a FAT32 file: systemd-boot (from the image's own systemd-boot-efi,
/// so the appliance carries the loader it boots with), the loader configuration and one Boot
/// Loader Specification type #1 entry with the kernel and initrd beside it.
fn make_esp(
    root_dir: &Path,
    rootfs: &Path,
    esp: &Path,
    kernel: &Path,
    initrd: &Path,
    kernel_version: &str,
    kernel_options: &str,
) -> anyhow::Result<()> {
    let loader = rootfs.join(SYSTEMD_BOOT_EFI);
    if !loader.is_file() {
        bail!("the image has no /{SYSTEMD_BOOT_EFI}: is systemd-boot-efi still in image/build/packages.txt?");
    }
    let _ = std::fs::remove_file(esp);
    exec(
        Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", ESP_FAT_LABEL, "-C"])
            .arg(esp)
            // mkfs.vfat -C takes the size in KiB.
            .arg((ESP_SIZE_MIB * 1024).to_string()),
        "making the EFI system partition (mkfs.vfat)",
    )?;

    let loader_conf = root_dir.join("image/build/loader.conf");
    if !loader_conf.is_file() {
        bail!("{} is missing: systemd-boot's configuration for the ESP", loader_conf.display());
    }
    // The loader entry is written beside the ESP's image, then copied in.
    let entry = esp.with_file_name("qutemail.conf");
    // BLS type #1: paths are relative to the ESP's root; the kernel's directory is named after its
    // version, as kernel-install lays it out, so an update can add a second entry beside this one.
    std::fs::write(
        &entry,
        format!(
            "# QuteMail appliance (written by `cargo xtask image build`; Boot Loader Specification type #1).\n\
             title      QuteMail appliance (Debian 12)\n\
             version    {kernel_version}\n\
             linux      /qutemail/{kernel_version}/linux\n\
             initrd     /qutemail/{kernel_version}/initrd\n\
             options    {kernel_options}\n"
        ),
    )?;

    let kernel_dir = format!("::/qutemail/{kernel_version}");
    let mmd = ["::/EFI", "::/EFI/BOOT", "::/EFI/systemd", "::/loader", "::/loader/entries", "::/qutemail"];
    exec(mtools("mmd", esp).args(mmd).arg(&kernel_dir), "creating the ESP's directories (mmd)")?;
    let copies: [(&Path, String); 6] = [
        (&loader, "::/EFI/BOOT/BOOTX64.EFI".into()),
        (&loader, "::/EFI/systemd/systemd-bootx64.efi".into()),
        (&loader_conf, "::/loader/loader.conf".into()),
        (&entry, "::/loader/entries/qutemail.conf".into()),
        (kernel, format!("{kernel_dir}/linux")),
        (initrd, format!("{kernel_dir}/initrd")),
    ];
    for (from, to) in &copies {
        exec(
            mtools("mcopy", esp).arg(from).arg(to),
            &format!("copying {} to the ESP's {to} (mcopy)", from.display()),
        )?;
    }
    Ok(())
}

/// An mtools command working on the FAT image `esp` (`-i`); the drive letter checks that mtools
/// makes for real floppies and disks do not apply to an image file.
fn mtools(tool: &str, esp: &Path) -> Command {
    let mut command = Command::new(tool);
    command.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(esp);
    command
}

/// The GPT disk: the ESP at 1 MiB, the root after it, room for the backup GPT at the end. The
/// file is sparse, and so are the copies (`dd conv=sparse` skips the file systems' empty blocks).
fn make_disk(image: &Path, esp: &Path, root_fs: &Path) -> anyhow::Result<()> {
    const MIB: u64 = 1024 * 1024;
    const SECTORS_PER_MIB: u64 = MIB / 512;
    let root_start = FIRST_PARTITION_MIB + ESP_SIZE_MIB;
    // One MiB at the end holds the backup GPT (33 sectors).
    let disk_mib = root_start + ROOT_SIZE_MIB + 1;
    let _ = std::fs::remove_file(image);
    std::fs::File::create(image)
        .and_then(|f| f.set_len(disk_mib * MIB))
        .with_context(|| format!("creating {}", image.display()))?;

    let table = format!(
        "label: gpt\nunit: sectors\n\
         start={}, size={}, type={ESP_TYPE_GUID}, name=\"{ESP_PARTLABEL}\"\n\
         start={}, size={}, type={ROOT_X86_64_TYPE_GUID}, name=\"{ROOT_LABEL}\"\n",
        FIRST_PARTITION_MIB * SECTORS_PER_MIB,
        ESP_SIZE_MIB * SECTORS_PER_MIB,
        root_start * SECTORS_PER_MIB,
        ROOT_SIZE_MIB * SECTORS_PER_MIB,
    );
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(image)
        .stdin(Stdio::piped())
        .spawn()
        .context("running sfdisk")?;
    sfdisk.stdin.take().context("sfdisk's stdin")?.write_all(table.as_bytes())?;
    let status = sfdisk.wait()?;
    if !status.success() {
        bail!("partitioning {} (sfdisk) failed ({status})", image.display());
    }

    for (fs, start_mib, what) in [(esp, FIRST_PARTITION_MIB, "the ESP"), (root_fs, root_start, "the root")] {
        exec(
            Command::new("dd")
                .arg(format!("if={}", fs.display()))
                .arg(format!("of={}", image.display()))
                .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
                .arg(format!("seek={start_mib}")),
            &format!("copying {what} file system into the disk (dd)"),
        )?;
    }
    Ok(())
}

/// The base system (debootstrap of the package list), cached by `key`: the downloaded packages
/// as debootstrap's tarball, and the installed directory.
fn base_system(cache: &Path, key: &str, packages: &[String]) -> anyhow::Result<PathBuf> {
    let base = cache.join(format!("base-{key}"));
    if base.join("etc/debian_version").is_file() {
        return Ok(base);
    }
    let tarball = cache.join(format!("debootstrap-{key}.tgz"));
    let include = format!("--include={}", packages.join(","));
    if !tarball.is_file() {
        eprintln!("image: downloading Debian {DEBIAN_SUITE} packages (debootstrap --make-tarball)");
        let partial = cache.join(format!("debootstrap-{key}.tgz.partial"));
        let scratch = cache.join(format!("make-tarball-{key}"));
        remove_dir(&scratch)?;
        exec(
            Command::new("debootstrap")
                .args(["--variant=minbase", &include])
                .arg(format!("--make-tarball={}", partial.display()))
                .arg(DEBIAN_SUITE)
                .arg(&scratch)
                .arg(DEBIAN_MIRROR),
            "debootstrap --make-tarball",
        )?;
        remove_dir(&scratch)?;
        std::fs::rename(&partial, &tarball)?;
    }
    eprintln!("image: installing the base system (debootstrap --unpack-tarball)");
    let partial = cache.join(format!("base-{key}.partial"));
    remove_dir(&partial)?;
    let unpacked = exec(
        Command::new("debootstrap")
            .args(["--variant=minbase", &include])
            .arg(format!("--unpack-tarball={}", tarball.display()))
            .arg(DEBIAN_SUITE)
            .arg(&partial)
            .arg(DEBIAN_MIRROR),
        "debootstrap --unpack-tarball",
    );
    if let Err(e) = unpacked {
        return Err(e.context(unconfigured_packages(&partial)));
    }
    // What debootstrap leaves behind that an image must not carry.
    for leftover in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = partial.join(leftover);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::remove_file(&path)?;
            }
        }
    }
    std::fs::rename(&partial, &base)?;
    Ok(base)
}

/// Why debootstrap could not configure the base system, in dpkg's words: debootstrap itself
/// only says "Failure while configuring base packages" (a new Debian point release can add a
/// dependency it cannot resolve, such as a virtual package), so CI's log names the package.
fn unconfigured_packages(root: &Path) -> String {
    let proc_dir = root.join("proc");
    let mounted = Command::new("mount").args(["-t", "proc", "proc"]).arg(&proc_dir).status();
    let out = Command::new("chroot").arg(root).args(["dpkg", "--configure", "-a"]).output();
    if mounted.is_ok_and(|s| s.success()) {
        let _ = Command::new("umount").arg(&proc_dir).status();
    }
    match out {
        Ok(out) => {
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("dpkg --configure -a in the half-built base system says:\n{}", tail.join("\n"))
        }
        Err(e) => format!("dpkg --configure -a could not run in {}: {e}", root.display()),
    }
}

/// Installs the binaries, units, documentation and the overlay into `rootfs` and makes it an
/// appliance: presets applied, root locked, no host identity.
fn install_appliance(root_dir: &Path, rootfs: &Path) -> anyhow::Result<()> {
    eprintln!("image: installing QuteMail");
    let bin = system::target_dir("release");
    for (_, name) in BINARIES {
        let dest = rootfs.join("usr/bin").join(name);
        std::fs::copy(bin.join(name), &dest).with_context(|| format!("installing {name}"))?;
        exec(Command::new("strip").arg("--strip-debug").arg(&dest), "strip")?;
        set_mode(&dest, 0o755)?;
    }

    let units = root_dir.join("image/systemd");
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(&units)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    names.sort();
    for path in names {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let dest = if name.ends_with(".service") || name.ends_with(".socket") || name.ends_with(".timer") {
            rootfs.join("usr/lib/systemd/system").join(name)
        } else if name.ends_with(".sysusers") {
            rootfs.join("usr/lib/sysusers.d").join(name.replace(".sysusers", ".conf"))
        } else if name.ends_with(".tmpfiles") {
            rootfs.join("usr/lib/tmpfiles.d").join(name.replace(".tmpfiles", ".conf"))
        } else if name.ends_with(".rules") {
            rootfs.join("usr/lib/udev/rules.d").join(name)
        } else if name.ends_with(".md") {
            rootfs.join("usr/share/doc/qutemail/systemd").join(name)
        } else {
            bail!(
                "image/systemd/{name}: not a unit, sysusers.d, tmpfiles.d, udev rule or README; where does it go?"
            );
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&path, &dest).with_context(|| format!("installing {}", path.display()))?;
        set_mode(&dest, 0o644)?;
    }

    // The documentation the units point at (Documentation=file:/usr/share/doc/qutemail/...).
    let doc = rootfs.join("usr/share/doc/qutemail");
    std::fs::create_dir_all(&doc)?;
    for entry in std::fs::read_dir(root_dir.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md")
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, doc.join(name))?;
        }
    }

    // The overlay: configuration and the first-boot script, modes as in the repository.
    exec(
        Command::new("cp")
            .args(["-R", "--preserve=mode", "--no-preserve=ownership"])
            .arg(root_dir.join("image/rootfs/."))
            .arg(rootfs),
        "copying image/rootfs",
    )?;

    // The web UI's `[web]` table, which first boot appends to qutemail.toml (port 443 comes from
    // qutemail-gateway-web.socket).
    let dest = rootfs.join("usr/share/qutemail");
    std::fs::create_dir_all(&dest)?;
    let web_table = root_dir.join("image/build/gateway-web.toml");
    std::fs::copy(&web_table, dest.join("gateway-web.toml"))
        .with_context(|| format!("installing {}", web_table.display()))?;
    // Presets decide what starts (usr/lib/systemd/system-preset/10-qutemail.preset); systemctl
    // --root works on a directory without a running systemd.
    exec(
        Command::new("systemctl").arg(format!("--root={}", rootfs.display())).arg("preset-all"),
        "systemctl preset-all",
    )?;
    // No password for root (console login only if the provisioning drop sets one); no host
    // identity: machine-id empty (systemd makes one and applies the presets on first boot).
    exec(Command::new("chroot").arg(rootfs).args(["passwd", "--lock", "root"]), "locking root")?;
    std::fs::write(rootfs.join("etc/machine-id"), "")?;
    // Without logind, getty-static.service starts gettys on tty2-6; one console getty is enough.
    let _ = std::fs::remove_file(rootfs.join("etc/systemd/system/getty-static.service"));
    std::os::unix::fs::symlink("/dev/null", rootfs.join("etc/systemd/system/getty-static.service"))?;
    let _ = std::fs::remove_file(rootfs.join("var/lib/dbus/machine-id"));
    let resolv = rootfs.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The boot test.

/// The boot test's findings, as `--report` writes them.
#[derive(Serialize, Default)]
struct Report {
    /// `passed`, `failed` or `skipped`.
    status: String,
    /// Why it was skipped, or what failed.
    reason: Option<String>,
    inputs_sha256: String,
    /// How the disk was booted: `uefi-systemd-boot` (OVMF, systemd-boot from the ESP).
    boot_path: String,
    build_seconds: Option<f64>,
    boot_seconds: Option<f64>,
    /// The kernel's `efi:` line on the console: the UEFI firmware it booted under.
    efi_firmware: Option<String>,
    /// The kernel's `Command line:` on the console: what systemd-boot passed from the entry.
    kernel_command_line: Option<String>,
    /// The first-boot stamp's `done` line seen on the console.
    firstboot_done: bool,
    smtp_banner: Option<String>,
    etsi014_status: Option<serde_json::Value>,
    /// `kmd_device_link_state{link=…,state="up"}` from kmd's metrics.
    device_link_up: Option<bool>,
    key_blocks_received: Option<f64>,
    /// HTTP status and the start of the page from `GET /`.
    web_status: Option<u16>,
    web_page_start: Option<String>,
    /// The mail domain the drop provisioned.
    site_domain: String,
    /// What first boot said of the restore of the drop's backup (its `restore:` lines on the
    /// console), when the drop held one.
    restore_lines: Option<Vec<String>>,
    /// The `--imap-user`'s INBOX as IMAPS served it after the boot, in UID order.
    imap_inbox: Option<Vec<ImapMessage>>,
    console_log: PathBuf,
    /// The disk as the guest left it (a copy of the built image), for scans of its bytes.
    booted_disk: PathBuf,
    /// The provisioning drop's disk image.
    drop_disk: PathBuf,
}

/// One message read over IMAPS.
#[derive(Serialize)]
struct ImapMessage {
    uid: u32,
    /// `BODY[]`: the file holding the exact bytes the server sent.
    file: PathBuf,
    sha256: String,
}

fn boot_test(
    out: &Path,
    report_path: Option<&Path>,
    if_changed: bool,
    plan: bool,
    site: &BootSite,
) -> anyhow::Result<()> {
    let inputs = inputs_hash()?;
    let stamp = work_dir().join("boot-test.passed");
    let mut report =
        Report { inputs_sha256: inputs.clone(), site_domain: site.site_domain.clone(), ..Report::default() };
    if if_changed && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == inputs) {
        let reason = format!(
            "image boot test SKIPPED: image/ (units included) and the image tooling are unchanged since the boot test last passed on this machine (inputs sha256 {inputs}; remove {} to force a run)",
            stamp.display()
        );
        eprintln!("{reason}");
        report.status = "skipped".into();
        report.reason = Some(reason);
        return write_report(report_path, &report);
    }
    if plan {
        report.status = "due".into();
        report.reason = Some(format!("image/ or the image tooling changed (inputs sha256 {inputs})"));
        return write_report(report_path, &report);
    }
    let result = boot_test_run(out, site, &mut report);
    match &result {
        Ok(()) => {
            report.status = "passed".into();
            // Recorded only if nothing changed while it ran, so the record names what booted.
            if inputs_hash()? == inputs {
                std::fs::write(&stamp, format!("{inputs}\n"))?;
            } else {
                eprintln!(
                    "boot test: image/ or the tooling changed during the run; the pass is not recorded"
                );
            }
        }
        Err(e) => {
            report.status = "failed".into();
            report.reason = Some(format!("{e:#}"));
        }
    }
    write_report(report_path, &report)?;
    result
}

fn write_report(path: Option<&Path>, report: &Report) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    match path {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display())),
        None => {
            println!("{json}");
            Ok(())
        }
    }
}

/// SHA-256 over what decides whether the image could boot differently: every file under image/
/// (the units are in image/systemd/) and the tooling that builds and tests it.
fn inputs_hash() -> anyhow::Result<String> {
    let root = system::workspace_root();
    let mut files = Vec::new();
    collect_files(&root.join("image"), &mut files)?;
    files.push(root.join("xtask/src/image.rs"));
    files.push(root.join("tests/tests/image_boot.rs"));
    files.sort();
    let mut all = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap_or(&f);
        all.extend_from_slice(rel.to_string_lossy().as_bytes());
        all.push(0);
        if let Ok(bytes) = std::fs::read(&f) {
            all.extend_from_slice(&sha256_hex(&bytes)?.into_bytes());
        }
        all.push(b'\n');
    }
    sha256_hex(&all)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Ends the boot test's processes however it ends.
struct Processes(Vec<(&'static str, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("boot test: stopped {name}");
        }
    }
}

fn boot_test_run(out: &Path, site: &BootSite, report: &mut Report) -> anyhow::Result<()> {
    let domain = site.site_domain.as_str();
    let started = Instant::now();
    let built = build(out)?;
    report.build_seconds = Some(started.elapsed().as_secs_f64());
    system::ensure_packages(BOOT_PACKAGES, true)?;
    ensure_qemu()?;

    let dir = work_dir().join("boot-test");
    remove_dir(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let console = dir.join("console.log");
    report.console_log = console.clone();

    // The site CA, made here and handed to first boot in the drop, so this side holds an SAE
    // client certificate the appliance's kmd trusts.
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    make_test_pki(&pki)?;
    let drop = dir.join("drop");
    std::fs::create_dir_all(&drop)?;
    std::fs::copy(pki.join("ca.pem"), drop.join("ca.pem"))?;
    std::fs::copy(pki.join("ca.key"), drop.join("ca.key"))?;
    std::fs::write(
        drop.join("provision.conf"),
        format!(
            "# Provisioning drop of the image boot test (docs/operations.md, First boot).\n\
             SITE_DOMAIN={domain}\nSITE_NAME=Boot test\nKME_ID={TEST_KME}\nAPP_SAE_IDS={TEST_APP_SAE}\n\
             LINK_ID={TEST_LINK}\nLINK_PEER_KME_ID={TEST_PEER_KME}\nLINK_PEER_URL=https://kmd.peer.qutemail.test:8444\n\
             LINK_PEER_SAE_IDS={TEST_PEER_SAE}\nLINK_DEVICE=/dev/qkd0\nLINK_BAUD_RATE=115200\n"
        ),
    )?;
    // A backup to restore, as an operator moving the site to this appliance hands it over.
    let mut drop_mib = 8;
    if let (Some(archive), Some(passphrase)) = (&site.restore, &site.restore_passphrase_file) {
        std::fs::copy(archive, drop.join("restore.qmb"))
            .with_context(|| format!("copying the backup {}", archive.display()))?;
        std::fs::copy(passphrase, drop.join("restore-passphrase"))
            .with_context(|| format!("copying {}", passphrase.display()))?;
        drop_mib += std::fs::metadata(archive)?.len().div_ceil(1 << 20) * 5 / 4;
    }
    let drop_image = dir.join("provision.img");
    report.drop_disk = drop_image.clone();
    exec(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "QMPROVISION", "-d"])
            .arg(&drop)
            .arg(&drop_image)
            .arg(format!("{drop_mib}M")),
        "making the provisioning drop",
    )?;

    // The simulated QKD device: one end on a pty that qemu connects to the guest's ttyS1.
    let sim_config = dir.join("qkd-sim.toml");
    std::fs::write(
        &sim_config,
        format!(
            "# The boot test's simulated link: the guest's kmd holds one end (over its UART), nobody the other.\n\
             link_id = \"{TEST_LINK}\"\n\n[physics]\ndistance_km = 25.0\npulse_rate_hz = 1.0e8\n\n\
             [blocks]\nsifted_bits_per_block = 8192\nmax_key_bytes = 512\n\n[serial]\nbaud_rate = 115200\n\n\
             [alice]\ndevice_id = \"QSIM-BOOT-A\"\n\n[bob]\ndevice_id = \"QSIM-BOOT-B\"\n"
        ),
    )?;
    let sim_state = dir.join("qkd-sim.json");
    let sim_log = std::fs::File::create(dir.join("qkd-sim.log"))?;
    let sim = Command::new(system::target_dir("release").join("qkd-sim"))
        .arg("run")
        .arg("--config")
        .arg(&sim_config)
        .arg("--control-socket")
        .arg(dir.join("qkd-sim.sock"))
        .arg("--state-file")
        .arg(&sim_state)
        .args(["--print-every", "0"])
        .stdin(Stdio::null())
        .stdout(sim_log.try_clone()?)
        .stderr(sim_log)
        .spawn()
        .context("starting qkd-sim")?;
    let mut processes = Processes(vec![("qkd-sim", sim)]);
    let sim_info = wait_for_json(&sim_state, Duration::from_secs(60))?;
    let pty = sim_info["alice"]["pty"]
        .as_str()
        .with_context(|| format!("{} names no alice.pty", sim_state.display()))?
        .to_string();

    // The disk the guest writes to is a copy: the built image stays as built. So is the firmware's
    // variable store, which the firmware writes its boot entries to.
    let disk = dir.join("disk.img");
    report.booted_disk = disk.clone();
    exec(
        Command::new("cp").arg("--sparse=always").arg(&built.image).arg(&disk),
        "copying the image for the boot",
    )?;
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS}"))?;
    report.boot_path = BOOT_PATH.into();
    let ports = Ports::pick()?;
    let hostfwd = [
        (ports.smtp, 25),
        (ports.web, 443),
        (ports.etsi014, 8443),
        (ports.metrics, 9464),
        (ports.imaps, 993),
    ]
    .iter()
    .map(|(host, guest)| format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"))
    .collect::<String>();
    let qemu_log = std::fs::File::create(dir.join("qemu.log"))?;
    eprintln!("boot test: booting the disk under qemu (TCG, UEFI); console: {}", console.display());
    let boot_started = Instant::now();
    // As a VM host boots a UEFI guest: the firmware in flash, the disk first in the boot order,
    // the kernel and its command line coming from the disk's loader entry.
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1536"])
        .args(["-nographic", "-no-reboot", "-monitor", "none"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("file={},if=none,id=disk,format=raw,cache=unsafe", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=disk,bootindex=0"])
        .arg("-drive")
        .arg(format!("file={},if=none,id=drop,format=raw,readonly=on", drop_image.display()))
        .args(["-device", "virtio-blk-pci,drive=drop"])
        .args(["-netdev", &format!("user,id=net0{hostfwd}"), "-device", "virtio-net-pci,netdev=net0"])
        .args(["-device", "virtio-rng-pci"])
        // ttyS0: the console into a file; ttyS1: the simulated QKD device's pty.
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(&pty)
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone()?)
        .stderr(qemu_log)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    processes.0.push(("qemu", qemu));

    let deadline = Instant::now() + BOOT_DEADLINE;
    let alive = |processes: &mut Processes| -> anyhow::Result<()> {
        for (name, child) in processes.0.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}); see {}", dir.display());
            }
        }
        Ok(())
    };

    // 1. SMTP on port 25, served by the gateway through its socket unit.
    let banner =
        poll(deadline, &mut processes, &alive, "the SMTP banner on port 25", || smtp_banner(ports.smtp))?;
    eprintln!("boot test: SMTP after {:.0} s: {banner}", boot_started.elapsed().as_secs_f64());
    if !banner.starts_with("220 ") || !banner.contains(&format!("mail.{domain}")) {
        bail!("the SMTP banner is not the gateway's: {banner:?}");
    }
    report.smtp_banner = Some(banner);
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    report.firstboot_done = console_text.contains("qutemail-firstboot: done");
    if site.restore.is_some() {
        let lines: Vec<String> = console_text
            .lines()
            .filter_map(|l| Some(l.split_once("qutemail-firstboot: restore: ")?.1.trim_end().to_string()))
            .collect();
        if lines.is_empty() {
            bail!("first boot did not report restoring the drop's backup; see {}", console.display());
        }
        report.restore_lines = Some(lines);
    }

    // The kernel came from the disk under UEFI (the firmware named in its EFI line) with the
    // loader entry's command line: systemd-boot found the entry and passed its options on.
    report.efi_firmware = kernel_message(&console_text, "efi: EFI v").map(|v| format!("EFI v{v}"));
    report.kernel_command_line = kernel_message(&console_text, "Command line: ").map(str::to_string);
    match &report.kernel_command_line {
        Some(line) if line.contains(&built.kernel_options) => {}
        Some(line) => bail!(
            "the kernel booted with {line:?}, not the loader entry's options {:?}",
            built.kernel_options
        ),
        None => bail!("the console ({}) shows no kernel command line", console.display()),
    }
    if report.efi_firmware.is_none() {
        bail!(
            "the console ({}) shows no UEFI firmware: the kernel did not boot under UEFI",
            console.display()
        );
    }

    // 2. ETSI GS QKD 014 status over mutual TLS, as the app SAE, for the pair with the peer site.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tls = ClientTlsConfig::from_files(
        &pki.join("ca.pem"),
        &pki.join(format!("{TEST_APP_SAE}.pem")),
        &pki.join(format!("{TEST_APP_SAE}.key")),
    )?;
    let options = ClientOptions { timeout: Duration::from_secs(20), ..ClientOptions::default() };
    let client = Etsi014Client::with_options(&format!("https://127.0.0.1:{}", ports.etsi014), tls, options)?;
    let status = poll(deadline, &mut processes, &alive, "kmd's ETSI 014 status", || {
        rt.block_on(client.status(TEST_PEER_SAE)).map_err(|e| e.to_string())
    })?;
    if status.source_kme_id != TEST_KME || status.target_kme_id != TEST_PEER_KME {
        bail!("ETSI 014 status names other KMEs: {status:?}");
    }
    report.etsi014_status = Some(serde_json::to_value(&status)?);
    eprintln!("boot test: ETSI 014 status: {}", serde_json::to_string(&status)?);

    // 3. kmd opened its serial device (under its unit, through /dev/qkd0) and receives blocks.
    let (up, blocks) =
        poll(deadline, &mut processes, &alive, "kmd's device link up with key blocks", || {
            let text = http_get_plain(ports.metrics, "/metrics")?;
            let up = metric(&text, &format!("kmd_device_link_state{{link=\"{TEST_LINK}\",state=\"up\"}}"));
            let blocks = received_blocks(&text);
            match (up, blocks) {
                (Some(u), Some(b)) if u == 1.0 && b > 0.0 => Ok((true, b)),
                _ => Err(format!("link up {up:?}, blocks received {blocks:?}")),
            }
        })?;
    report.device_link_up = Some(up);
    report.key_blocks_received = Some(blocks);
    eprintln!("boot test: device link up, {blocks} key blocks received");

    // 4. The web UI over HTTPS (port 443 through its socket unit).
    let (code, page) = poll(deadline, &mut processes, &alive, "the web UI on port 443", || {
        https_get(domain, ports.web, &pki.join("ca.pem"))
    })?;
    report.web_status = Some(code);
    report.web_page_start = Some(page.chars().take(200).collect());
    if code != 200 || !page.to_ascii_lowercase().contains("<html") {
        bail!("GET / on the web UI answered {code}: {page:.200}");
    }

    // 5. A user's mail over IMAPS (port 993 through its socket unit), as a mail client reads it.
    if let (Some(user), Some(password_file)) = (&site.imap_user, &site.imap_password_file) {
        let imap = ImapsClient::new(&dir, domain, ports.imaps, &pki.join("ca.pem"), user, password_file)?;
        let uids =
            poll(deadline, &mut processes, &alive, "the INBOX over IMAPS on port 993", || imap.uids())?;
        let mut inbox = Vec::new();
        for uid in uids {
            let body = imap.fetch(uid).map_err(|e| anyhow::anyhow!("IMAPS FETCH of UID {uid}: {e}"))?;
            let file = dir.join(format!("imap-inbox-{uid}.eml"));
            std::fs::write(&file, &body)?;
            inbox.push(ImapMessage { uid, file, sha256: sha256_hex(&body)? });
        }
        eprintln!("boot test: {} messages in {user}'s INBOX over IMAPS", inbox.len());
        report.imap_inbox = Some(inbox);
    }
    report.boot_seconds = Some(boot_started.elapsed().as_secs_f64());
    eprintln!(
        "boot test: passed ({:.0} s build, {:.0} s boot to checks done)",
        report.build_seconds.unwrap_or_default(),
        boot_started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Host ports forwarded to the guest.
struct Ports {
    smtp: u16,
    web: u16,
    etsi014: u16,
    metrics: u16,
    imaps: u16,
}

impl Ports {
    /// Free ports (bound and released; qemu binds them a moment later).
    fn pick() -> anyhow::Result<Self> {
        let listeners: Vec<TcpListener> =
            (0..5).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
        let port = |i: usize| listeners[i].local_addr().map(|a| a.port());
        Ok(Self { smtp: port(0)?, web: port(1)?, etsi014: port(2)?, metrics: port(3)?, imaps: port(4)? })
    }
}

/// An IMAPS client made of curl, as the boot test's mail client: the account's credentials in a
/// curl config file (mode 0600), never on a command line.
struct ImapsClient {
    config: PathBuf,
    base: String,
}

impl ImapsClient {
    fn new(
        dir: &Path,
        domain: &str,
        port: u16,
        ca: &Path,
        user: &str,
        password_file: &Path,
    ) -> anyhow::Result<Self> {
        let password = std::fs::read_to_string(password_file)
            .with_context(|| format!("reading {}", password_file.display()))?;
        let password = password.lines().next().unwrap_or_default();
        if [user, password].iter().any(|s| s.contains(['"', '\\', '\n'])) {
            bail!("the IMAP user or password holds a quote, backslash or newline");
        }
        let config = dir.join("imaps.curlrc");
        std::fs::write(
            &config,
            format!(
                "silent\nshow-error\nmax-time = 60\ncacert = \"{}\"\nresolve = \"mail.{domain}:{port}:127.0.0.1\"\n\
                 user = \"{user}:{password}\"\n",
                ca.display()
            ),
        )?;
        set_mode(&config, 0o600)?;
        Ok(Self { config, base: format!("imaps://mail.{domain}:{port}/INBOX") })
    }

    fn curl(&self, url: &str, command: Option<&str>) -> Result<Vec<u8>, String> {
        let mut cmd = Command::new("curl");
        cmd.arg("--config").arg(&self.config).arg(url);
        if let Some(c) = command {
            cmd.args(["--request", c]);
        }
        let out = cmd.output().map_err(|e| format!("running curl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(out.stdout)
    }

    /// `UID SEARCH ALL`: the INBOX's UIDs.
    fn uids(&self) -> Result<Vec<u32>, String> {
        let out = self.curl(&self.base, Some("UID SEARCH ALL"))?;
        let text = String::from_utf8_lossy(&out);
        let line =
            text.lines().find_map(|l| l.strip_prefix("* SEARCH")).ok_or(format!("no SEARCH in {text:?}"))?;
        line.split_whitespace().map(|n| n.parse().map_err(|_| format!("not a UID: {n:?}"))).collect()
    }

    /// `UID FETCH uid BODY[]`: the message's bytes.
    fn fetch(&self, uid: u32) -> Result<Vec<u8>, String> {
        self.curl(&format!("{}/;UID={uid}", self.base), None)
    }
}

/// Calls `attempt` until it succeeds or the deadline passes, checking that the processes live.
fn poll<T>(
    deadline: Instant,
    processes: &mut Processes,
    alive: &dyn Fn(&mut Processes) -> anyhow::Result<()>,
    what: &str,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<T> {
    loop {
        alive(processes)?;
        let last = match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!("{what}: no answer before the deadline (last: {last})");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn smtp_banner(port: u16) -> Result<String, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(|e| e.to_string())?;
    // user-mode networking accepts and then closes while nothing listens in the guest.
    if line.is_empty() {
        return Err("connection closed without a banner".into());
    }
    let _ = (&stream).write_all(b"QUIT\r\n");
    Ok(line.trim_end().to_string())
}

fn http_get_plain(port: u16, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {:.80}", text));
    }
    Ok(text)
}

fn https_get(domain: &str, port: u16, ca: &Path) -> Result<(u16, String), String> {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("mail.{domain}:{port}:127.0.0.1"))
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("https://mail.{domain}:{port}/"))
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (page, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().map_err(|_| format!("curl printed no status: {code}"))?, page.to_string()))
}

/// The first kernel message on the console that starts with `prefix` (after the timestamp, as in
/// `[    0.000000] efi: EFI v2.70 by EDK II`), without the prefix.
fn kernel_message<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().find_map(|line| {
        let at = line.find(prefix)?;
        Some(line[at + prefix.len()..].trim_end())
    })
}

/// The value of the sample whose name and labels are exactly `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// All key blocks kmd received, summed over links and results.
fn received_blocks(text: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("kmd_key_blocks_received_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    if values.is_empty() { None } else { Some(values.iter().sum()) }
}

/// The test's site CA and the app SAE's client certificate, with openssl (ECDSA P-256).
fn make_test_pki(dir: &Path) -> anyhow::Result<()> {
    let ca_ext = dir.join("ca.cnf");
    std::fs::write(
        &ca_ext,
        "[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n\
         keyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        exec(Command::new("openssl").current_dir(dir).args(args), &format!("openssl {}", args[0]))
    };
    openssl(&[
        "genpkey",
        "-quiet",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ca.key",
    ])?;
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        "ca.key",
        "-subj",
        "/CN=QuteMail boot test CA",
        "-days",
        "7",
        "-config",
        "ca.cnf",
        "-extensions",
        "v3_ca",
        "-out",
        "ca.pem",
    ])?;
    let key = format!("{TEST_APP_SAE}.key");
    let csr = format!("{TEST_APP_SAE}.csr");
    let pem = format!("{TEST_APP_SAE}.pem");
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl(&["genpkey", "-quiet", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key])?;
    openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={TEST_APP_SAE}"), "-out", &csr])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "7",
        "-extfile",
        "client.ext",
        "-out",
        &pem,
    ])?;
    Ok(())
}

/// qemu-system-x86 from bookworm-backports: Debian 12's own qemu-system-x86 (7.2) cannot be
/// installed beside the backported qemu-utils (10.0) that some machines carry (qemu-utils
/// Breaks: qemu-system-common << 8.0, so apt would remove it); the backport matches it, and works
/// the same on a machine without it.
fn ensure_qemu() -> anyhow::Result<()> {
    if Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    if !system::is_root() {
        bail!("qemu-system-x86_64 is missing: run `cargo xtask image boot-test` as root to install it");
    }
    let sources = Path::new("/etc/apt/sources.list.d/qutemail-bookworm-backports.sources");
    let has_backports = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("bookworm-backports")))
        })
        .unwrap_or(false)
        || std::fs::read_to_string("/etc/apt/sources.list").is_ok_and(|t| t.contains("bookworm-backports"));
    if !has_backports {
        std::fs::write(
            sources,
            "# Added by `cargo xtask image boot-test` for qemu-system-x86 (xtask/src/image.rs).\n\
             Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )?;
    }
    exec(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"), "apt-get update")?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "-t", "bookworm-backports", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install -t bookworm-backports qemu-system-x86",
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn exec(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status =
        command.status().with_context(|| format!("{what}: cannot start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child.stdin.take().context("sha256sum's stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or_default().to_string())
}

/// The non-comment, non-empty lines of a list file.
fn read_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// The file in `dir` whose name starts with `prefix`, the last in version order.
fn newest(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .collect();
    found.sort();
    found.pop().with_context(|| format!("no {prefix}* in {}", dir.display()))
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn wait_for_json(path: &Path, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(value) = serde_json::from_str(&text)
        {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {} s", path.display(), timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
