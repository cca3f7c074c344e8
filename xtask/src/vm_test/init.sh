#!/bin/busybox sh
# PID 1 of the vm-test guest. It prepares the host's root file system (shared
# read-only over 9p) as a root the tests can run in, then runs the plan the
# host wrote into the results share (run.sh) and powers off. It never reports
# success itself: the host only believes the result files run.sh writes.

/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "vm-test: $*"; }
# Without run.sh's final marker the host fails the run, so stopping early is
# always seen as a failure.
die() {
    say "guest setup failed: $*"
    poweroff -f
}

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# In dependency order, soft dependencies included (computed on the host:
# busybox insmod knows no dependencies; without crc32c_generic before
# libcrc32c, nft fails with "Protocol not supported" where nf_tables uses it).
for m in $(cat /modules.load); do
    insmod "/lib/modules/$m.ko" || die "insmod $m"
done

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results ||
    die "mounting the results share"
# cache=loose: the host root is read-only for the whole run, so caching its
# pages in the guest is safe, and it makes starting binaries from it fast.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose hostroot /host ||
    die "mounting the host root"

H=/host
mount -t proc proc $H/proc || die "proc"
mount -t sysfs sysfs $H/sys || die "sysfs"
mount -t devtmpfs devtmpfs $H/dev || die "devtmpfs"
mkdir -p $H/dev/pts $H/dev/shm
mount -t devpts devpts $H/dev/pts || die "devpts"
mount -t tmpfs tmpfs $H/dev/shm || die "tmpfs on /dev/shm"
# Writable scratch: /run/netns of `ip netns`. The host's /tmp stays visible
# (a checkout may live there); the tests' temporary files go to the scratch
# disk through TMPDIR (guest.rs).
mount -t tmpfs tmpfs $H/run || die "tmpfs on /run"
# A disk file system where the host has one: the memory tests put their
# sparse files in /var/tmp, whose page cache (unlike tmpfs's) reclaim can
# drop. The host gives an empty sparse image as the first virtio disk.
mke2fs -q /dev/vda > /dev/null || die "mke2fs on the scratch disk"
mount -t ext2 /dev/vda $H/var/tmp || die "mounting the scratch disk"
mount -t tracefs tracefs $H/sys/kernel/tracing || die "tracefs"
mount -t debugfs debugfs $H/sys/kernel/debug || die "debugfs"
mount -t bpf bpf $H/sys/fs/bpf || die "bpffs"
# Debian's own layout for these kernels: one cgroup2 hierarchy with the
# memory controller (6.12 has no v1 memory controller at all).
mount -t cgroup2 cgroup2 $H/sys/fs/cgroup || die "cgroup2"
echo +memory > $H/sys/fs/cgroup/cgroup.subtree_control || die "memory controller"
for c in cpu pids io; do
    echo "+$c" > $H/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || say "no $c controller"
done
ip link set lo up || die "loopback"

say "guest ready: $(uname -r), $(grep MemTotal /proc/meminfo)"
sh /results/run.sh
sync
poweroff -f
