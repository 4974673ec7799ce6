# nooelint: oelint.var.bbclassextend
# (A program for the target only: no native or SDK variant, so no BBCLASSEXTEND.)
SUMMARY = "QuteMail QKD device simulator, for labs and vendor conformance tests"
DESCRIPTION = "qkd-sim simulates a QKD device pair with a physics-based key rate and QBER and \
               serves both ends over pseudo-terminals (serial protocol) or as ETSI GS QKD 014 KMEs; it also \
               tests a device against the serial protocol. Not for production appliances."
SECTION = "net"

require recipes-qutemail/qutemail-common/qutemail-source.inc
require qkd-sim-crates.inc

inherit cargo cargo-update-recipe-crates systemd

CARGO_SRC_DIR = "devices/qkd-sim"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

# DynamicUser= in the unit: no user to create. Installed but off: it also waits for
# /etc/qutemail/qkd-sim.toml.
SYSTEMD_SERVICE:${PN} = "qkd-sim.service"
SYSTEMD_AUTO_ENABLE:${PN} = "disable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/image/systemd/qkd-sim.service ${D}${systemd_system_unitdir}/
    install -d ${D}${docdir}/qutemail
    install -m 0644 ${S}/docs/qkd-sim.md ${D}${docdir}/qutemail/
}

FILES:${PN} += "${systemd_system_unitdir}/qkd-sim.service"
