# nooelint: oelint.var.suggestedvar.CVE_PRODUCT
SUMMARY = "QuteMail appliance image: kmd and the mail gateway on a read-only root"
DESCRIPTION = "A minimal systemd image with the QuteMail key management daemon, the mail gateway, \
               SoftHSM as the default PKCS#11 module and an nftables firewall. The root file system is read-only; \
               /etc/qutemail and /var/lib/qutemail belong on a persistent data partition (yocto/README.md)."
BUGTRACKER = "https://example.invalid/qutemail/issues"
SECTION = "images"
LICENSE = "MIT"

inherit core-image

# Read-only root, and none of the development conveniences (no empty root password, no debug
# tools, no package manager on the appliance).
IMAGE_FEATURES += "read-only-rootfs"
IMAGE_FEATURES:remove = "debug-tweaks allow-empty-password empty-root-password allow-root-login \
                         post-install-logging tools-debug tools-profile dbg-pkgs package-management ssh-server-dropbear ssh-server-openssh"

IMAGE_INSTALL = "packagegroup-core-boot \
                 kmd \
                 qutemail-gateway \
                 qutemail-common \
                 ca-certificates \
                 ${CORE_IMAGE_EXTRA_INSTALL}"

IMAGE_LINGUAS = ""
