#!/usr/bin/env bash
#   bash benches/rss.sh [WORKDIR]
# Peak RSS of a first backup of the first 1, 4 and 8 GiB of one 8 GiB ext4 image (same kind of
# data at every size), --threads 2, three runs each.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p sbk >&2
sbk=$PWD/target/release/sbk
w=$(mktemp -d "${1:-/var/tmp}/sbk-rss.XXXXXX")
trap 'rm -rf "$w"' EXIT
tree=$w/tree; mkdir -p $tree
budget=$((8 * 1024 * 1024 * 1024 / 2))
{ find /usr/bin /usr/share /usr/include /usr/lib -xdev -type f -printf '%s %p\n' 2>/dev/null || true; } |
  awk -v b="$budget" '{ s += $1; if (s > b) exit; sub(/^[0-9]+ /, ""); print }' > $w/files || true
tar -cf - -T $w/files 2>/dev/null | tar -xf - -C $tree || true
truncate -s 8G $w/img8; PATH=$PATH:/usr/sbin mke2fs -q -F -t ext4 -d $tree $w/img8; rm -rf $tree
for g in 1 4; do dd if=$w/img8 of=$w/img$g bs=16M count=$((g * 64)) conv=sparse status=none; done
for run in 1 2 3; do
  for g in 1 4 8; do
    rm -rf $w/repo $w/cache
    SBK_CACHE_DIR=$w/cache $sbk init -q --encryption none --repo $w/repo 2>/dev/null
    /usr/bin/time -f "$g GiB run $run: %M KiB %e s" env SBK_CACHE_DIR=$w/cache $sbk backup -q --threads 2 --repo $w/repo $w/img$g
  done
done
