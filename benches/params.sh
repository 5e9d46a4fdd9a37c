#!/usr/bin/env bash
# Chooses sbk's defaults by measurement: average chunk size and zstd level against dedup between
# two versions of a realistic disk image, stored size, metadata size and backup throughput.
#
#   bash benches/params.sh IMAGE          (IMAGE: e.g. the ext4 image benches/e2e.sh makes)
#
# Version 2 of the image is version 1 with ~2% rewritten in 1 MiB pieces spread over it.
# Prints a Markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
img=${1:?usage: params.sh IMAGE}
cargo build --release -p sbk >&2
sbk=$PWD/target/release/sbk
work=$(mktemp -d "$(dirname "$img")/sbk-params.XXXXXX")
trap 'rm -rf "$work"' EXIT
size=$(stat -c %s "$img")
v2=$work/v2.img
cp --sparse=always "$img" "$v2"
blocks=$((size / 50 >> 20))
for i in $(seq 0 $((blocks - 1))); do
  dd if=/dev/urandom of="$v2" bs=1M count=1 seek=$((i * (size >> 20) / blocks + 3)) conv=notrunc status=none
done
raw=$( { /usr/bin/time -f "%e" dd if="$img" of=/dev/null bs=16M iflag=direct status=none; } 2>&1 | tail -1)

echo "| avg chunk | zstd | first backup (MiB/s) | ratio to raw read | v2 new data (MiB) | v2 data / new data | stored after v1+v2 (MiB) | metadata per snapshot (KiB) | chunks |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for chunk in 64K 256K 1M 4M; do
  for level in 1 3; do
    repo=$work/repo-$chunk-$level
    "$sbk" init --repo "$repo" --quiet --chunk-size "$chunk" --compression-level "$level"
    start=$(date +%s.%N)
    first=$("$sbk" backup --repo "$repo" --json "$img")
    end=$(date +%s.%N)
    second=$("$sbk" backup --repo "$repo" --json "$v2")
    stored=$(du -sk "$repo/packs" | cut -f1)
    manifest=$(stat -c %s "$repo"/snapshots/* | sort -n | tail -1)
    python3 - "$first" "$second" "$chunk" "$level" "$start" "$end" "$raw" "$size" "$stored" "$manifest" <<'PY'
import json, sys
first, second = json.loads(sys.argv[1])[0], json.loads(sys.argv[2])[0]
chunk, level = sys.argv[3], int(sys.argv[4])
start, end, raw, size, stored, manifest = (float(x) for x in sys.argv[5:11])
tp = size / 2**20 / (end - start)
rawtp = size / 2**20 / raw
data = second["size"] - second["bytes_zero"]
new = second["new_bytes"]
# Metadata of one snapshot: its manifest plus its segment trees (37 bytes per data extent,
# 8 per tree header), before compression.
meta = (manifest + 37 * first["chunks"] + 8 * size / 2**24) / 1024
print(f"| {chunk} | {level} | {tp:.0f} | {tp / rawtp:.2f}x | {new / 2**20:.1f} | {data / max(new, 1):.1f}x "
      f"| {stored / 1024:.0f} | {meta:.0f} | {first['chunks']} |")
PY
  done
done
echo
echo "Raw O_DIRECT read of the image: ${raw} s for $((size >> 20)) MiB; $(nproc) cores."
