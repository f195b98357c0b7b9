#!/usr/bin/env bash
# Build a minimal Debian 12 guest image for xe's qemu backend from Debian
# packages only, without mounting anything:
#
#   sudo vm/images/build-debian.sh OUT_DIR
#
# writes OUT_DIR/debian-12.qcow2 (ext4 root filesystem, no partition table,
# no bootloader), OUT_DIR/vmlinuz and OUT_DIR/initrd.img beside it; boot it
# with direct kernel boot:
#
#   xe node --provide --vm-backend qemu --qemu-image OUT_DIR/debian-12.qcow2 \
#     --qemu-kernel OUT_DIR/vmlinuz --qemu-initrd OUT_DIR/initrd.img
#
# (xe's default --qemu-append, `root=/dev/vda rw console=ttyS0 panic=-1`,
# matches this image.) The guest takes its lease's access key, host key and
# hostname from QEMU fw_cfg (`opt/xe/*`) in a unit that runs before sshd on
# every boot (xe-firstboot.service); it has no cloud-init, which keeps boot
# under TCG to ~30-70 s. Official cloud images (with cloud-init) need none of
# this: xe hands them the same three items as a NoCloud seed.
#
# Needs root (debootstrap), debootstrap, mkfs.ext4 (e2fsprogs >= 1.43 for -d)
# and qemu-img. Environment: XE_DEBIAN_MIRROR (default deb.debian.org),
# XE_IMAGE_SIZE (filesystem size, default 2G; each VM's overlay grows to its
# lease's disk and the guest grows the filesystem at boot).
set -euo pipefail

out=${1:?usage: build-debian.sh OUT_DIR}
mirror=${XE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
size=${XE_IMAGE_SIZE:-2G}
steps=5
n=0
step() { n=$((n + 1)); printf '==> [%d/%d] %s\n' "$n" "$steps" "$*"; }
die() { printf 'build-debian.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "debootstrap needs root: run it with sudo"
for tool in debootstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install debootstrap e2fsprogs qemu-utils"
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

step "debootstrap bookworm (minbase + kernel, systemd, dbus, openssh-server); 1.5-3 min"
# dbus: without it logind is missing and QMP system_powerdown is ignored.
debootstrap --variant=minbase \
  --include=linux-image-cloud-amd64,systemd-sysv,udev,dbus,openssh-server,e2fsprogs,kmod,iproute2 \
  bookworm "$root" "$mirror" | awk '
    /^I: Retrieving/ { if (++got % 25 == 0) print "    retrieved " got " packages"; fflush(); next }
    /^I: Validating/ { next }
    /^I: / { if ($2 != phase) { print "    " $0; phase = $2; fflush() } }'

step "configuring the guest"
echo xe-vm > "$root/etc/hostname"
# Empty machine-id: systemd makes a new one on each VM's first boot, so two
# VMs (and the host) never share one.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo 'LABEL=root / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"
echo 'nameserver 10.0.2.3' > "$root/etc/resolv.conf"
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/80-xe-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
ln -sf /lib/systemd/system/systemd-networkd.service \
  "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
# Nothing in this guest should wait for or poll the network at boot.
for unit in apt-daily.timer apt-daily-upgrade.timer systemd-networkd-wait-online.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# The host keys openssh-server's postinst made are the same in every VM built
# from this image: drop them; each VM gets its own from fw_cfg.
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/etc/ssh/sshd_config.d"
cat > "$root/etc/ssh/sshd_config.d/00-xe.conf" <<'EOF'
# xe: only the lease's key, as root; no passwords; the ed25519 host key the
# provider generated and signed into the lease's accept.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
UseDNS no
EOF
install -m 0755 /dev/stdin "$root/usr/local/sbin/xe-firstboot" <<'EOF'
#!/bin/sh
# xe-firstboot: before sshd starts, take the lease's items from QEMU fw_cfg.
# Runs on every boot (a restarted lease gets the same items again).
set -eu
modprobe qemu_fw_cfg 2>/dev/null || true
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/xe
if [ ! -r "$fw/authorized_keys/raw" ]; then
  echo "xe-firstboot: no opt/xe fw_cfg items; keeping sshd's own keys"
  [ -e /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
  exit 0
fi
umask 077
install -d -m 700 /root/.ssh
cat "$fw/authorized_keys/raw" > /root/.ssh/authorized_keys.new
mv -f /root/.ssh/authorized_keys.new /root/.ssh/authorized_keys
rm -f /etc/ssh/ssh_host_*
cat "$fw/ssh_host_ed25519_key/raw" > /etc/ssh/ssh_host_ed25519_key
ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key > /etc/ssh/ssh_host_ed25519_key.pub
if [ -r "$fw/hostname/raw" ]; then
  cat "$fw/hostname/raw" > /etc/hostname
  cat /etc/hostname > /proc/sys/kernel/hostname
fi
# The overlay is the lease's disk size; the filesystem is the image's.
resize2fs "$(findmnt -no SOURCE /)" >/dev/null 2>&1 || echo "xe-firstboot: resize2fs failed"
echo "xe-firstboot: lease items installed"
EOF
cat > "$root/etc/systemd/system/xe-firstboot.service" <<'EOF'
[Unit]
Description=xe: lease access key, host key and hostname from QEMU fw_cfg
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service
Before=ssh.service sshd.service systemd-hostnamed.service
ConditionVirtualization=vm

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/xe-firstboot
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/xe-firstboot.service \
  "$root/etc/systemd/system/multi-user.target.wants/xe-firstboot.service"
cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/initrd.img"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

step "writing the ext4 filesystem ($size) without mounting (mkfs.ext4 -d)"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw" "$size"

step "converting to qcow2"
qemu-img convert -f raw -O qcow2 "$work/root.raw" "$work/debian-12.qcow2"

step "installing into $out"
mv -f "$work/debian-12.qcow2" "$work/vmlinuz" "$work/initrd.img" "$out/"
ls -l "$out/debian-12.qcow2" "$out/vmlinuz" "$out/initrd.img"
