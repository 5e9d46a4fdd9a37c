#!/usr/bin/env bash
# End-to-end benchmark: sbk against a raw O_DIRECT read of the same disk image, in one run.
#
#   bash benches/e2e.sh [IMAGE_GIB] [WORKDIR]      (defaults: 4, /var/tmp)
#   SBK_BEFORE=/path/to/older/sbk bash benches/e2e.sh ...   also compares an older build, step by
#                                                          step (first backup, re-backup, 2%
#                                                          changed, restore, prune), in paired
#                                                          runs: benches/paired.sh
#
# Builds the release binary, makes a realistic disk image (an ext4 filesystem filled from the
# machine's /usr with mke2fs -d; free space stays zero), then measures: an O_DIRECT read of the
# image (dd), a first backup into a fresh repository, a second backup of the unchanged image, a
# backup after rewriting ~2% of the image, and a restore to a file (compared with cmp). Each
# step: wall time, throughput over the image size, ratio to the raw read, and peak RSS
# (/usr/bin/time); then benches/nbd.sh and benches/cbt.sh on the same image. Prints Markdown for
# docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-4}
base=${2:-/var/tmp}
source benches/lib.sh
bench_setup bench "$gib" "$base" /usr/bin/time mke2fs dd cmp

results=()
results+=("$(measure "raw O_DIRECT read (dd bs=16M)" dd if="$img" of=/dev/null bs=16M iflag=direct)")
export SBK_REPO=$work/repo
export SBK_CACHE_DIR=$work/cache
# The repository is encrypted (the default). The weak test KDF keeps Argon2id's deliberate 0.5 s
# per command out of the throughput figures; the unlock is measured on its own below.
export SBK_PASSWORD=benchmark SBK_TEST_KDF=weak
"$sbk" init --quiet
results+=("$(measure "sbk backup (first)" "$sbk" backup --quiet "$img")")
"$sbk" init --quiet --encryption none --repo "$work/repo-plain" 2>/dev/null
results+=("$(measure "unencrypted: sbk backup (first)" "$sbk" backup --quiet --repo "$work/repo-plain" "$img")")
# Memory per worker thread: the same first backup with 1 and 4 threads, into fresh repositories.
for t in 1 4; do
  "$sbk" init --quiet --repo "$work/repo-t$t"
  results+=("$(measure "sbk backup (first, --threads $t)" "$sbk" backup --quiet --threads $t --repo "$work/repo-t$t" "$img")")
  rm -rf "$work/repo-t$t"
done
results+=("$(measure "sbk backup (unchanged)" "$sbk" backup --quiet "$img")")
# A pristine copy for the changed-block section at the end (the 2% rewrite breaks the
# filesystem, which that section mounts).
cp --sparse=always "$img" "$work/pristine.img"
# Rewrite ~2% of the image: 1 MiB of new random data at evenly spread offsets.
blocks=$((size / 50 >> 20))
for i in $(seq 0 $((blocks - 1))); do
  dd if=/dev/urandom of="$img" bs=1M count=1 seek=$((i * (size >> 20) / blocks)) conv=notrunc status=none
done
results+=("$(measure "sbk backup (2% changed)" "$sbk" backup --quiet "$img")")
results+=("$(measure "raw O_DIRECT read (again)" dd if="$img" of=/dev/null bs=16M iflag=direct)")
results+=("$(measure "sbk restore to file" "$sbk" restore --quiet latest "$work/restored.img")")
cmp "$img" "$work/restored.img" >&2
rm -f "$work/restored.img"
results+=("$(measure "unencrypted: sbk restore to file" "$sbk" restore --quiet --repo "$work/repo-plain" latest "$work/restored.img")")
rm -f "$work/restored.img"
plain_pack_bytes=$(find "$work/repo-plain/packs" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
plain_verify=$(measure "unencrypted: verify" "$sbk" verify --quiet --read-data --repo "$work/repo-plain")
enc_first_pack_bytes=$(find "$work/repo/packs" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
enc_verify=$(measure "encrypted: verify" "$sbk" verify --quiet --read-data)
# The unlock: Argon2id with the default parameters, in a repository of its own.
env -u SBK_TEST_KDF "$sbk" init --quiet --repo "$work/repo-kdf"
kdf=$(measure "unlock" env -u SBK_TEST_KDF "$sbk" snapshots --quiet --repo "$work/repo-kdf")
rm -rf "$work/repo-kdf" "$work/repo-plain"
# The cache gone (a new host): the next backup rebuilds it from the index files.
rm -rf "$work/cache"
results+=("$(measure "sbk backup (unchanged, no cache)" "$sbk" backup --quiet "$img")")
repo_kib=$(du -sk "$work/repo" | cut -f1)

# Maintenance: verify --read-data against an O_DIRECT read of the same packs; then forget the
# first two snapshots and prune.
pack_bytes=$(find "$work/repo/packs" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
maint=()
# GNU find substitutes {} inside an argument: one dd per pack.
maint+=("$(measure "raw O_DIRECT read of the packs" find "$work/repo/packs" -type f -exec dd if={} of=/dev/null bs=16M iflag=direct status=none \;)")
maint+=("$(measure "sbk verify --read-data" "$sbk" verify --quiet --read-data)")
ids=$("$sbk" snapshots --json | tr ',' '\n' | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' | head -2)
"$sbk" forget --quiet $ids
before_kib=$(du -sk "$work/repo/packs" | cut -f1)
# At once (--exclusive): what one run reclaims. Beside backups, the same work is split over two
# runs (one marks, the next deletes).
maint+=("$(measure "sbk prune --exclusive (default --max-unused 5)" "$sbk" prune --quiet --exclusive)")
after_kib=$(du -sk "$work/repo/packs" | cut -f1)
maint+=("$(measure "sbk prune --exclusive --max-unused 0" "$sbk" prune --quiet --exclusive --max-unused 0)")
after0_kib=$(du -sk "$work/repo/packs" | cut -f1)
alloc_kib=$(du -sk "$img" | cut -f1)

echo
echo "Image: ${gib} GiB ext4 ($((alloc_kib / 1024)) MiB allocated), repository after the backups: $((repo_kib / 1024)) MiB."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(date -u +%Y-%m-%d)."
echo
echo "| step | wall time (s) | throughput (MiB/s) | ratio to raw read | peak RSS (MiB) |"
rows "$size" "${results[@]}"
echo
echo "Maintenance, over the $((pack_bytes >> 20)) MiB of packs after the backups:"
echo
echo "| step | wall time (s) | throughput over the packs (MiB/s) | ratio to raw read of the packs | peak RSS (MiB) |"
rows "$pack_bytes" "${maint[@]}"
echo
echo "verify --read-data of the same image's packs, encrypted ($((enc_first_pack_bytes >> 20)) MiB of packs, before the maintenance above): $(echo "$enc_verify" | cut -d'|' -f2) s; unencrypted ($((plain_pack_bytes >> 20)) MiB of packs, one snapshot): $(echo "$plain_verify" | cut -d'|' -f2) s."
echo "Unlock of an encrypted repository with the default Argon2id parameters (sbk snapshots of an empty repository): $(echo "$kdf" | cut -d'|' -f2) s, peak RSS $(( $(echo "$kdf" | cut -d'|' -f3) / 1024 )) MiB."
echo
echo "After forgetting the first two of the four snapshots, packs went from $((before_kib / 1024)) MiB to $((after_kib / 1024)) MiB with prune --exclusive (packs less than 5% unused are left alone), and to $((after0_kib / 1024)) MiB with --max-unused 0."

# NBD: sbk serve beside sbk restore, and an nbd:// backup beside a file backup, on the pristine
# image (benches/nbd.sh; needs nbdcopy and qemu-nbd).
if command -v nbdcopy >/dev/null 2>&1 && command -v qemu-nbd >/dev/null 2>&1; then
  echo
  NBD_IMAGE="$work/pristine.img" bash benches/nbd.sh "$gib" "$base"
else
  echo
  echo "NBD: skipped (needs nbdcopy and qemu-nbd: apt-get install libnbd-bin qemu-utils)."
fi

# Changed-block incremental (benches/cbt.sh) on the pristine image, with Borg and restic
# beside it when they are installed.
echo
CBT_IMAGE="$work/pristine.img" bash benches/cbt.sh "$gib" "$base"

# An older build, step by step against this one, in paired runs (benches/paired.sh).
if [ -n "${SBK_BEFORE:-}" ]; then
  echo
  bash benches/paired.sh "$gib" "$base"
fi
