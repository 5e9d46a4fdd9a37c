#!/usr/bin/env bash
# Changed-block incremental benchmark: ~1% of the files of an ext4 image rewritten through a
# mounted loop device, the changed 64 KiB blocks found by comparing the images, then in one
# run: a raw read of the changed image, a raw fsynced write of the changed blocks' size (the
# floor of storing them), `sbk backup --changed-blocks`, a full re-read by sbk into a copy of
# the repository (so that both store the same new data), and, when installed, the second
# backups by Borg and restic (which re-read everything).
#
#   bash benches/cbt.sh [IMAGE_GIB] [WORKDIR]      (defaults: 4, /var/tmp; needs root: mount)
#   CBT_IMAGE=disk.img bash benches/cbt.sh ...     uses that ext4 image (left unchanged)
#
# Borg and restic come from apt (borgbackup, restic) when run as root; without them their rows
# are left out, saying so. Prints Markdown for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-4}
base=${2:-/var/tmp}
if [ "$(id -u)" != 0 ]; then
  echo "Changed-block incremental: skipped (needs root to mount the image)."
  exit 0
fi
for tool in borg restic; do
  command -v "$tool" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq borgbackup restic; } >&2 || true
done
cargo build --release -p sbk >&2
sbk=$PWD/target/release/sbk
work=$(mktemp -d "$base/sbk-cbt.XXXXXX")
mnt=$work/mnt
trap 'umount "$mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
source benches/lib.sh
img=$work/pristine.img
if [ -n "${CBT_IMAGE:-}" ]; then
  cp --sparse=always "$CBT_IMAGE" "$img"
else
  echo "making a ${gib} GiB ext4 image from /usr ..." >&2
  make_image "$img" "$((gib << 30))"
fi
size=$(stat -c %s "$img")
export SBK_REPO=$work/repo SBK_CACHE_DIR=$work/cache SBK_PASSWORD=benchmark SBK_TEST_KDF=weak
"$sbk" init --quiet
"$sbk" backup --quiet --source-name cbt-disk --cbt-token base "$img"
# The other tools' first backups of the same image, encrypted as sbk's is.
export BORG_PASSPHRASE=benchmark BORG_REPO=$work/borg RESTIC_PASSWORD=benchmark RESTIC_REPOSITORY=$work/restic
have_borg=; have_restic=
if command -v borg >/dev/null 2>&1; then
  borg init --encryption=repokey-blake2 >&2 && borg create "::first" "$img" >&2 && have_borg=1
fi
if command -v restic >/dev/null 2>&1; then
  restic init --quiet >&2 && restic backup --quiet "$img" >&2 && have_restic=1
fi

img2=$work/changed.img
cp --sparse=always "$img" "$img2"
mkdir -p "$mnt"
mount -o loop "$img2" "$mnt"
budget=$((size / 100))
# Rewrite whole files of one directory tree (the one with the most files), as an update of
# one package or database would, up to ~1% of the image.
dir=$(find "$mnt" -mindepth 2 -maxdepth 3 -type d -printf '%p\n' | while read -r d; do
  echo "$(find "$d" -type f -size +4k | wc -l) $d"; done | sort -rn | head -1 | cut -d' ' -f2-)
{ find "$dir" -type f -size +4k -printf '%s %p\n' |
  awk -v b="$budget" '{ if (s + $1 <= b) { s += $1; print $2 } }' >"$work/rewrite"; } || true
rewritten=0
while read -r f; do
  n=$(stat -c %s "$f")
  head -c "$n" /dev/urandom | dd of="$f" conv=notrunc,fsync status=none
  rewritten=$((rewritten + n))
done <"$work/rewrite"
umount "$mnt"
python3 - "$img" "$img2" "$work/changed.list" <<'PY'
import sys
a, b, out = open(sys.argv[1], 'rb'), open(sys.argv[2], 'rb'), open(sys.argv[3], 'w')
block, off, start = 64 << 10, 0, None
while True:
    x, y = a.read(block), b.read(block)
    if not x and not y:
        break
    if x != y:
        start = off if start is None else start
    elif start is not None:
        out.write(f"{start} {off - start}\n"); start = None
    off += max(len(x), len(y))
if start is not None:
    out.write(f"{start} {off - start}\n")
PY
changed_bytes=$(awk '{s += $2} END {print s + 0}' "$work/changed.list")
# The full re-read goes into a copy of the repository as it is now, so that it stores the same
# new data as the incremental does (into the repository itself it would store nothing).
cp -a "$SBK_REPO" "$work/repo-full"
cp -a "$SBK_CACHE_DIR" "$work/cache-full"
sync
cbt=()
cbt+=("$(measure "raw O_DIRECT read of the changed image" dd if="$img2" of=/dev/null bs=16M iflag=direct)")
cbt+=("$(measure "raw write of the changed blocks' size (dd conv=fsync)" dd if="$img2" of="$work/floor" bs=1M count=$((changed_bytes >> 20)) conv=fsync)")
rm -f "$work/floor"
cbt+=("$(measure "sbk backup --changed-blocks (1% verified)" "$sbk" backup --quiet --source-name cbt-disk --changed-blocks "$work/changed.list" --cbt-since base --cbt-token next "$img2")")
touched=$("$sbk" snapshots --json | tr '{' '\n' | grep '"source":"cbt-disk"' | tail -1 | sed -n 's/.*"bytes_skipped":\([0-9]*\).*"segments_read":\([0-9]*\).*"segments_reused":\([0-9]*\).*/\2 \3, bytes skipped \1/p')
cbt+=("$(measure "sbk backup, full re-read of the same image" "$sbk" backup --quiet --repo "$work/repo-full" --cache-dir "$work/cache-full" --source-name cbt-disk "$img2")")
rm -rf "$work/repo-full" "$work/cache-full"
# Borg and restic have no changed-block input: their second backup reads the whole image.
[ -n "$have_borg" ] && cbt+=("$(measure "borg create (second backup, $(borg --version | cut -d' ' -f2))" borg create "::second" "$img2")")
[ -n "$have_restic" ] && cbt+=("$(measure "restic backup (second backup, $(restic version | cut -d' ' -f2))" restic backup --quiet "$img2")")
echo "Changed-block incremental: $((rewritten >> 20)) MiB of files rewritten in the mounted image; $((changed_bytes >> 20)) MiB in changed 64 KiB blocks; segments read / reused by the incremental: ${touched:-?}."
[ -z "$have_borg" ] && echo "Borg: not installed (apt-get install borgbackup), left out."
[ -z "$have_restic" ] && echo "restic: not installed (apt-get install restic), left out."
inc_t=$(echo "${cbt[2]}" | cut -d'|' -f2)
full_t=$(echo "${cbt[3]}" | cut -d'|' -f2)
echo "Incremental / full re-read: $(awk -v a="$inc_t" -v b="$full_t" 'BEGIN { printf "%.1f%%", 100 * a / b }')."
echo
echo "| step | wall time (s) | throughput (MiB/s) | ratio to raw read | peak RSS (MiB) |"
rows "$size" "${cbt[@]}"
