#!/usr/bin/env bash
# File-level restore (issue 21): one 1 MiB file extracted from a snapshot of a GIB GiB ext4 disk
# holding DATA GiB of incompressible data, against a full restore of the same snapshot, in one
# run, on an unencrypted repository, page cache dropped before each. Prints a table for
# docs/benchmarks.md; fails if the extraction reads more than 16 MiB from the repository.
# Usage: benches/files.sh [GIB=8] [DATA_GIB=6] [BASE=/var/tmp]   (root: it loop-mounts the disk)
set -euo pipefail
cd "$(dirname "$0")/.."
# BYTES of a key-derived AES-CTR stream: incompressible, unique per KEY, fast to make. openssl is
# stopped by head's closed pipe, which is how it is meant to end.
stream() { { openssl enc -aes-128-ctr -pass "pass:$1" -nosalt -pbkdf2 </dev/zero 2>/dev/null || true; } | head -c "$2"; }
gib=${1:-8} data=${2:-6} base=${3:-/var/tmp}
for tool in mke2fs openssl mount; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool" >&2; exit 1; }
done
cargo build --release -p sbk >&2
sbk=$PWD/target/release/sbk
work=$(mktemp -d "$base/sbk-files.XXXXXX")
cleanup() { umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export SBK_REPO=$work/repo SBK_CACHE_DIR=$work/cache
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >"$work/out" 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}

echo "making a ${gib} GiB ext4 disk holding ${data} GiB of data ..." >&2
truncate -s "${gib}G" "$work/disk.img"
PATH=$PATH:/usr/sbin mke2fs -q -F -t ext4 "$work/disk.img"
mkdir "$work/mnt"
mount -o loop "$work/disk.img" "$work/mnt"
pieces=$((data * 4))
for i in $(seq 1 "$pieces"); do
  mkdir -p "$work/mnt/data/$((i % 8))"
  stream "$i" 256M >"$work/mnt/data/$((i % 8))/part-$i.bin"
  if [ "$i" = $((pieces / 2)) ]; then
    # The file asked for, written in the middle of the data.
    mkdir -p "$work/mnt/home/ann"
    stream wanted 1M >"$work/mnt/home/ann/wanted.bin"
  fi
done
want=$(sha256sum "$work/mnt/home/ann/wanted.bin" | cut -d' ' -f1)
umount "$work/mnt"

"$sbk" init -q --encryption none
drop
backup=$(secs "$sbk" backup --json "$work/disk.img")
id=$(grep -o '"snapshot": *"[0-9a-f]\{64\}"' "$work/out" | grep -o '[0-9a-f]\{64\}' | head -1)
drop
restore=$(secs "$sbk" restore "$id" "$work/restored.img")
rm -f "$work/restored.img"
drop
extract=$(secs "$sbk" extract "$id" 0:/home/ann/wanted.bin --target "$work/extracted" --json)
read_bytes=$(sed -n 's/.*"repository_bytes_read": *\([0-9]*\).*/\1/p' "$work/out")
got=$(sha256sum "$work/extracted/wanted.bin" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "the extracted file differs" >&2; exit 1; }
stored=$(du -sb "$work/repo" | cut -f1)

echo "| step | seconds | read from the repository | ratio to the full restore |"
echo "|---|---:|---:|---:|"
echo "| backup of the ${gib} GiB disk (${data} GiB data) | $backup | | |"
echo "| full restore | $restore | $((stored >> 20)) MiB (the repository) | 1.00 |"
awk -v e="$extract" -v r="$restore" -v b="$read_bytes" 'BEGIN {
  printf "| extract one 1 MiB file | %s | %.2f MiB | %.3f |\n", e, b / 1048576, e / r }'
if [ "$read_bytes" -gt $((16 << 20)) ]; then
  echo "extract read $read_bytes bytes from the repository, over the 16 MiB the issue allows" >&2
  exit 1
fi
