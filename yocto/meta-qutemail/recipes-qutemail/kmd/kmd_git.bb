# nooelint: oelint.var.bbclassextend
# (A program for the target only: no native or SDK variant, so no BBCLASSEXTEND.)
SUMMARY = "QuteMail key management daemon: QKD keys, ETSI GS QKD 014"
DESCRIPTION = "kmd pulls key blocks from a QKD device, keeps them wrapped by a PKCS#11 HSM, \
               serves ETSI GS QKD 014 to local applications over mutual TLS and keeps its peer site in step."
SECTION = "net"

require recipes-qutemail/qutemail-common/qutemail-source.inc
require kmd-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# One package of the Cargo workspace; Cargo.lock is the workspace's.
CARGO_SRC_DIR = "kmd/daemon"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

FILES:${PN} += "${systemd_system_unitdir}/qutemail-kmd.service"

RDEPENDS:${PN} += "qutemail-common"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/qutemail/kmd --no-create-home \
                       --shell /sbin/nologin qutemail-kmd"

SYSTEMD_SERVICE:${PN} = "qutemail-kmd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    # The unit the Debian image ships, from the same source tree (image/systemd/).
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/image/systemd/qutemail-kmd.service ${D}${systemd_system_unitdir}/
    install -d ${D}${docdir}/qutemail
    install -m 0644 ${S}/docs/kmd-config.md ${S}/docs/kmd-peer-protocol.md ${S}/docs/serial-protocol.md \
        ${D}${docdir}/qutemail/
}
