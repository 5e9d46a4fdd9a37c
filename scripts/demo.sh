#!/usr/bin/env bash
# Builds sbk, makes a sample disk image, backs it up twice, restores it and compares the bytes.
# Usage: bash scripts/demo.sh [IMAGE_SIZE_MIB]    (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}

cargo build --release -p sbk
sbk=$PWD/target/release/sbk
work=$(mktemp -d "${TMPDIR:-/var/tmp}/sbk-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
img=$work/disk.img

# The sample disk: a real ext4 filesystem holding a copy of /usr/bin and /usr/share when
# mke2fs is there; otherwise a sparse image with the machine's binaries at scattered offsets.
truncate -s "${size_mib}M" "$img"
if command -v mke2fs >/dev/null 2>&1 || [ -x /usr/sbin/mke2fs ]; then
  tree=$work/tree
  mkdir -p "$tree"
  cp -a /usr/bin "$tree/" 2>/dev/null || true
  cp -a /usr/share "$tree/" 2>/dev/null || true
  PATH=$PATH:/usr/sbin mke2fs -q -F -t ext4 -d "$tree" "$img" || PATH=$PATH:/usr/sbin mke2fs -q -F -t ext4 -d "$tree/bin" "$img"
  rm -rf "$tree"
else
  seek=1
  for f in /usr/bin/*; do
    [ -f "$f" ] || continue
    dd if="$f" of="$img" bs=1M seek=$seek conv=notrunc status=none 2>/dev/null || true
    seek=$(( (seek + 7) % (size_mib - 8) + 1 ))
  done
fi
echo "sample image: $img ($(du -h --apparent-size "$img" | cut -f1) apparent, $(du -h "$img" | cut -f1) allocated)"

export SBK_REPO=$work/repo
# The repository is encrypted (the default); its password comes from SBK_PASSWORD here. On a
# terminal without it, sbk asks; a real job uses --password-file or --password-command.
export SBK_PASSWORD=${SBK_PASSWORD:-demo password, not a secret}
export SBK_CACHE_DIR=$work/cache
"$sbk" init
"$sbk" backup "$img" --tag demo
"$sbk" backup "$img" --tag demo-again
"$sbk" snapshots
"$sbk" restore latest "$work/restored.img"
"$sbk" key list
cmp "$img" "$work/restored.img"
echo "OK: the restored image is byte-identical to the source"
