#!/usr/bin/env bash
# Restore against a plain copy (issue 23): `sbk restore` of an ext4 image made from /usr against
# `cp --sparse=always SRC DST && sync DST` of the same image to the same filesystem, page cache
# dropped before each (as root), alternating, ROUNDS rounds; prints each time and the ratio of
# the medians. The restore verifies every chunk as always; its result is compared with cmp.
#
#   bash benches/restore.sh [IMAGE_GIB] [WORKDIR] [ROUNDS]      (defaults: 3, /var/tmp, 3)
#
# SBK=/path/to/sbk measures another build (default: this checkout's release build); extra
# restore arguments go in RESTORE_ARGS (for example "--threads 4").
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-3}
base=${2:-/var/tmp}
rounds=${3:-3}
[ "$(id -u)" = 0 ] || { echo "needs root: the page cache is dropped before each run" >&2; exit 1; }
source benches/lib.sh
bench_setup restore "$gib" "$base" /usr/bin/time mke2fs cmp
sbk=${SBK:-$sbk}
export SBK_REPO=$work/repo SBK_CACHE_DIR=$work/cache SBK_PASSWORD=benchmark SBK_TEST_KDF=weak
"$sbk" init --quiet
"$sbk" backup --quiet --source-name disk "$img"
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# timed CMD...: wall seconds of CMD.
timed() {
  /usr/bin/time -f "TIME %e" "$@" >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
  grep "^TIME" "$work/stderr" | tail -1 | cut -d' ' -f2
}
cps=() restores=()
for round in $(seq 1 "$rounds"); do
  echo "round $round of $rounds ..." >&2
  drop
  cps+=("$(timed sh -c "cp --sparse=always '$img' '$work/copy.img' && sync '$work/copy.img'")")
  rm -f "$work/copy.img"
  drop
  # shellcheck disable=SC2086 # RESTORE_ARGS is a list of arguments
  restores+=("$(timed "$sbk" restore --quiet ${RESTORE_ARGS:-} latest "$work/restored.img")")
  cmp "$img" "$work/restored.img" >&2
  rm -f "$work/restored.img"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
mc=$(median "${cps[@]}") mr=$(median "${restores[@]}")
echo
echo "Restore of a ${gib} GiB ext4 image ($(( $(du -sk "$img" | cut -f1) / 1024 )) MiB allocated), $rounds rounds, $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d)."
echo
echo "| step | seconds per round | median (s) |"
echo "|---|---|---:|"
echo "| cp --sparse=always + sync | ${cps[*]} | $mc |"
echo "| sbk restore ${RESTORE_ARGS:-} | ${restores[*]} | $mr |"
echo
awk -v r="$mr" -v c="$mc" 'BEGIN { printf "restore / cp: %.2fx\n", r / c }'
