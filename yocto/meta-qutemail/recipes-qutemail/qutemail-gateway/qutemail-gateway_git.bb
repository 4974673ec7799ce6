# nooelint: oelint.var.bbclassextend
# (A program for the target only: no native or SDK variant, so no BBCLASSEXTEND.)
SUMMARY = "QuteMail mail gateway: SMTP, IMAP, POP3, webmail with QKD keys"
DESCRIPTION = "The gateway accepts and delivers mail (SMTP, submission), serves it over IMAP, \
               POP3 and the web, seals mail between sites with QKD and ML-KEM keys and keeps it encrypted at rest. \
               qutemailctl is its operator's tool."
SECTION = "net"

require recipes-qutemail/qutemail-common/qutemail-source.inc
require qutemail-gateway-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

CARGO_SRC_DIR = "appliance/gateway"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

FILES:${PN} += "${systemd_system_unitdir}/qutemail-gateway.service \
                ${systemd_system_unitdir}/qutemail-gateway-*.socket"

RDEPENDS:${PN} += "qutemail-common"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/qutemail/gateway --no-create-home \
                       --shell /sbin/nologin qutemail"

# The sockets start the service (the mail and web ports are privileged; the service has no
# capabilities); the service is enabled too, for the outbound queue.
GATEWAY_SOCKETS = "smtp submission submissions imap imaps pop3 pop3s web"
SYSTEMD_SERVICE:${PN} = "qutemail-gateway.service \
                         ${@' '.join('qutemail-gateway-%s.socket' % s for s in d.getVar('GATEWAY_SOCKETS').split())}"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    # cargo_do_install installs every binary of the crate: the daemon (qutemail) and the
    # operator's tool (qutemailctl: users, queue, links, certificates, DNS records). Both ship.
    test -x ${D}${bindir}/qutemail
    test -x ${D}${bindir}/qutemailctl
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/image/systemd/qutemail-gateway.service ${D}${systemd_system_unitdir}/
    for s in ${GATEWAY_SOCKETS}; do
        install -m 0644 ${S}/image/systemd/qutemail-gateway-$s.socket ${D}${systemd_system_unitdir}/
    done
    install -d ${D}${docdir}/qutemail
    install -m 0644 ${S}/docs/gateway-config.md ${S}/docs/envelope-format.md ${D}${docdir}/qutemail/
}
