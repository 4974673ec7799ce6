# nooelint: oelint.var.bbclassextend
# (A program for the target only: no native or SDK variant, so no BBCLASSEXTEND.)
SUMMARY = "QuteMail appliance files shared by kmd and the mail gateway"
DESCRIPTION = "The tmpfiles.d entries for /etc/qutemail and the state directories, the SoftHSM \
               configuration of each daemon, the udev rule that names the QKD device /dev/qkd0, the sysusers.d \
               entries and the firewall rules of the Debian appliance image."
SECTION = "net"

require recipes-qutemail/qutemail-common/qutemail-source.inc

inherit allarch

FILES:${PN} += "${nonarch_libdir}/tmpfiles.d ${nonarch_libdir}/sysusers.d ${nonarch_base_libdir}/udev/rules.d"

RDEPENDS:${PN} += "nftables softhsm"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -d ${D}${nonarch_libdir}/tmpfiles.d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${S}/image/systemd/qutemail.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/qutemail.conf
    install -m 0644 ${S}/image/systemd/qutemail.sysusers ${D}${nonarch_libdir}/sysusers.d/qutemail.conf
    install -m 0644 ${S}/image/systemd/70-qutemail-qkd.rules ${D}${nonarch_base_libdir}/udev/rules.d/
    install -d ${D}${sysconfdir}
    install -m 0644 ${S}/image/rootfs/etc/nftables.conf ${D}${sysconfdir}/nftables-qutemail.conf
}
