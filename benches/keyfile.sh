#!/usr/bin/env bash
# A changed-block incremental opened with a password against one opened with a key file (issue
# 23): an encrypted repository (the real Argon2id parameters, not the tests' weak ones) holding
# a first backup of an ext4 image made from /usr, then ROUNDS rounds of 56 x 1 MiB of fresh
# random bytes written at random offsets and backed up with `--changed-blocks`, alternately
# unlocked by the password and by a key file. Prints each time and the medians.
#
#   bash benches/keyfile.sh [IMAGE_GIB] [WORKDIR] [ROUNDS]      (defaults: 7, /var/tmp, 3)
#
# SBK=/path/to/sbk measures another build (default: this checkout's release build).
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-7}
base=${2:-/var/tmp}
rounds=${3:-3}
source benches/lib.sh
bench_setup keyfile "$gib" "$base" /usr/bin/time mke2fs
sbk=${SBK:-$sbk}
unset SBK_TEST_KDF SBK_KEY_FILE
export SBK_REPO=$work/repo SBK_CACHE_DIR=$work/cache SBK_PASSWORD=benchmark
"$sbk" init --quiet
"$sbk" key add --quiet --new-key-file "$work/mover.key"
"$sbk" backup --quiet --source-name disk --cbt-token t0 "$img"
changes=56
# change N: writes the changes of round N into the image and their list to $work/list.
change() {
  : >"$work/list"
  local i off
  for i in $(seq 1 "$changes"); do
    off=$(( (RANDOM * 32768 + RANDOM) % ((size >> 20) - 1) ))
    dd if=/dev/urandom of="$img" bs=1M count=1 seek="$off" conv=notrunc status=none
    echo "$((off << 20)) $((1 << 20))" >>"$work/list"
  done
  sync "$img"
}
# timed N ARGS...: incremental backup N of the changes in $work/list (its parent the one
# before it, by token); prints seconds.
timed() {
  local n=$1; shift
  /usr/bin/time -f "TIME %e" "$sbk" backup --quiet --source-name disk --changed-blocks "$work/list" \
    --cbt-since "t$((n - 1))" --cbt-token "t$n" "$@" "$img" >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
  grep "^TIME" "$work/stderr" | tail -1 | cut -d' ' -f2
}
pw=() kf=()
for round in $(seq 1 "$rounds"); do
  echo "round $round of $rounds ..." >&2
  change; pw+=("$(timed $((2 * round - 1)))")
  change; kf+=("$(timed $((2 * round)) --key-file "$work/mover.key")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
echo
echo "Changed-block incremental of $changes x 1 MiB in a ${gib} GiB ext4 image, $rounds rounds, $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d)."
echo
echo "| unlocked by | seconds per round | median (s) |"
echo "|---|---|---:|"
echo "| password (Argon2id) | ${pw[*]} | $(median "${pw[@]}") |"
echo "| key file | ${kf[*]} | $(median "${kf[@]}") |"
