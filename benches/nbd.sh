#!/usr/bin/env bash
# NBD benchmark: `sbk serve` against `sbk restore`, and an nbd:// backup against a file backup,
# in one run on one image.
#
#   bash benches/nbd.sh [IMAGE_GIB] [WORKDIR]      (defaults: 4, /var/tmp)
#   NBD_IMAGE=/path/to/disk.img bash benches/nbd.sh  uses that image instead of making one
#
# Measures: an O_DIRECT read of the image (the baseline), `sbk restore` of its snapshot to a
# file, `nbdcopy` of the same snapshot from `sbk serve` to a file (4 connections), random 4 KiB
# read latency over NBD (p50/p99, cold and warm chunk cache), the server's peak RSS under that
# load; then a backup of the image file and a backup of the same image exported by `qemu-nbd`,
# each into a fresh repository. Prints Markdown for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-4}
base=${2:-/var/tmp}
for tool in /usr/bin/time mke2fs dd cmp nbdcopy qemu-nbd; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool (apt-get install time e2fsprogs libnbd-bin qemu-utils)" >&2; exit 1; }
done
cargo build --release -p sbk -p sbk-benches --bin sbk --bin nbd-latency >&2
sbk=$PWD/target/release/sbk
latency=$PWD/target/release/nbd-latency
work=$(mktemp -d "$base/sbk-nbd.XXXXXX")
server=
qnbd=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; [ -n "$qnbd" ] && kill "$qnbd" 2>/dev/null; rm -rf "$work"' EXIT
source benches/lib.sh
img=${NBD_IMAGE:-$work/disk.img}
if [ -z "${NBD_IMAGE:-}" ]; then
  echo "making a ${gib} GiB ext4 image from /usr ..." >&2
  make_image "$img" "$((gib << 30))"
fi
size=$(stat -c %s "$img")
export SBK_REPO=$work/repo SBK_CACHE_DIR=$work/cache SBK_PASSWORD=benchmark SBK_TEST_KDF=weak
"$sbk" init --quiet
"$sbk" backup --quiet "$img"

r=()
r+=("$(measure "raw O_DIRECT read of the image (dd bs=16M)" dd if="$img" of=/dev/null bs=16M iflag=direct)")
r+=("$(measure "sbk restore latest to a file" "$sbk" restore --quiet latest "$work/restored.img")")
rm -f "$work/restored.img"
sock=$work/sbk.sock
"$sbk" serve --socket "$sock" --json >"$work/serve.out" 2>"$work/serve.err" &
server=$!
until grep -q listening "$work/serve.out" 2>/dev/null; do sleep 0.1; done
uri="nbd+unix:///latest?socket=$sock"
r+=("$(measure "nbdcopy -C 4 from sbk serve to a file" nbdcopy -C 4 "$uri" "$work/copied.img")")
cmp "$img" "$work/copied.img" >&2
rm -f "$work/copied.img"
# Latency: a server restarted with a cold chunk cache; 2000 random 4 KiB reads, then the same again.
kill "$server"; wait "$server" 2>/dev/null || true
"$sbk" serve --socket "$sock" --json >"$work/serve.out" 2>"$work/serve.err" &
server=$!
until grep -q listening "$work/serve.out" 2>/dev/null; do sleep 0.1; done
lat=$("$latency" "$uri" 2000)
nbdcopy -C 4 "$uri" null: 2>/dev/null || nbdcopy -C 4 "$uri" /dev/null
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
kill "$server"; wait "$server" 2>/dev/null || true
server=

# An nbd:// backup beside a file backup of the same bytes, into fresh repositories.
b=()
b+=("$(measure "raw O_DIRECT read of the image (dd bs=16M)" dd if="$img" of=/dev/null bs=16M iflag=direct)")
"$sbk" init --quiet --repo "$work/repo-file"
b+=("$(measure "sbk backup of the image file" "$sbk" backup --quiet --repo "$work/repo-file" "$img")")
rm -rf "$work/repo-file"
qemu-nbd -r -f raw -t -e 4 -x disk -k "$work/q.sock" "$img" &
qnbd=$!
until [ -S "$work/q.sock" ]; do sleep 0.1; done
"$sbk" init --quiet --repo "$work/repo-nbd"
b+=("$(measure "sbk backup of the same image from qemu-nbd (nbd+unix)" "$sbk" backup --quiet --repo "$work/repo-nbd" "nbd+unix:///disk?socket=$work/q.sock")")
kill "$qnbd"; qnbd=

echo
echo "Image: $((size >> 30)) GiB ext4 ($(( $(du -sk "$img" | cut -f1) / 1024 )) MiB allocated). Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(date -u +%Y-%m-%d)."
echo
echo "| step | wall time (s) | throughput (MiB/s) | ratio to raw read | peak RSS (MiB) |"
rows "$size" "${r[@]}"
echo
echo "Random 4 KiB reads over NBD from sbk serve (one connection, 2000 reads, then the same again): $lat"
echo "sbk serve peak RSS after that and a 4-connection nbdcopy (default --cache-size 256M): $((hwm / 1024)) MiB."
echo
echo "| step | wall time (s) | throughput (MiB/s) | ratio to raw read | peak RSS (MiB) |"
rows "$size" "${b[@]}"
