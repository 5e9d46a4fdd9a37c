#!/usr/bin/env bash
# This build against an older one, step by step, in paired runs on the same image.
#
#   SBK_BEFORE=/path/to/older/sbk bash benches/paired.sh [IMAGE_GIB] [WORKDIR] [ROUNDS]
#                                                    (defaults: 4, /var/tmp, 3)
#
# Each round runs both builds (in alternating order, so that neither always sees a warmer page
# cache), each into a fresh repository: a first backup of an ext4 image made from /usr, a backup
# of the unchanged image, a backup after rewriting ~2% of it, a restore to a file (compared with
# cmp), then forget of the first two snapshots and `prune --exclusive --max-unused 0` (which
# reads, verifies and rewrites every pack holding an unused blob). Prints, per step, the median
# wall time and CPU time (user + system) of each build over the rounds and their ratios (this
# build / the older one): below 1.00 this build is faster. Machines are noisy: only ratios from
# the same run mean anything, and CPU time is the steadier of the two.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-4}
base=${2:-/var/tmp}
rounds=${3:-3}
before=${SBK_BEFORE:?set SBK_BEFORE to the older sbk binary}
source benches/lib.sh
bench_setup paired "$gib" "$base" /usr/bin/time mke2fs cmp
now=$sbk
# The changed image: ~2% rewritten, 1 MiB of random data at evenly spread offsets.
cp --sparse=always "$img" "$work/changed.img"
blocks=$((size / 50 >> 20))
for i in $(seq 0 $((blocks - 1))); do
  dd if=/dev/urandom of="$work/changed.img" bs=1M count=1 seek=$((i * (size >> 20) / blocks)) conv=notrunc status=none
done
export SBK_PASSWORD=benchmark SBK_TEST_KDF=weak
# measure_cpu LABEL CMD...: like lib.sh's measure, but "label|seconds|cpu_seconds": wall time,
# and user + system CPU time, which a noisy machine disturbs far less than wall time.
measure_cpu() {
  local label=$1; shift
  /usr/bin/time -f "TIME %e %U %S" "$@" >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; echo "$label failed" >&2; exit 1; }
  local t u sy
  read -r _ t u sy < <(grep "^TIME" "$work/stderr" | tail -1)
  echo "$label|$t|$(awk -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f", u + s }')"
}
steps=("backup (first)" "backup (unchanged)" "backup (2% changed)" "restore to file" "prune --exclusive --max-unused 0")

# run_build NAME BIN: one round of every step for one build; appends "name|step|seconds" lines.
run_build() {
  local name=$1 bin=$2 repo=$work/repo-$1
  export SBK_REPO=$repo SBK_CACHE_DIR=$work/cache-$1
  rm -rf "$repo" "$SBK_CACHE_DIR"
  "$bin" init --quiet
  local r
  r=$(measure_cpu "${steps[0]}" "$bin" backup --quiet --source-name disk "$img"); echo "$name|$r" >>"$work/results"
  r=$(measure_cpu "${steps[1]}" "$bin" backup --quiet --source-name disk "$img"); echo "$name|$r" >>"$work/results"
  r=$(measure_cpu "${steps[2]}" "$bin" backup --quiet --source-name disk "$work/changed.img"); echo "$name|$r" >>"$work/results"
  r=$(measure_cpu "${steps[3]}" "$bin" restore --quiet latest "$work/restored.img"); echo "$name|$r" >>"$work/results"
  cmp "$work/changed.img" "$work/restored.img" >&2
  rm -f "$work/restored.img"
  local ids
  ids=$("$bin" snapshots --json | tr ',' '\n' | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' | head -2)
  "$bin" forget --quiet $ids
  r=$(measure_cpu "${steps[4]}" "$bin" prune --quiet --exclusive --max-unused 0); echo "$name|$r" >>"$work/results"
  rm -rf "$repo" "$SBK_CACHE_DIR"
}

: >"$work/results"
for round in $(seq 1 "$rounds"); do
  echo "round $round of $rounds ..." >&2
  if [ $((round % 2)) = 1 ]; then
    run_build before "$before"; run_build now "$now"
  else
    run_build now "$now"; run_build before "$before"
  fi
done

echo
echo "Paired runs: ${gib} GiB ext4 image, $rounds rounds, $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d)."
echo "Before: $("$before" --version 2>/dev/null || echo "$before"); now: $("$now" --version)."
echo
echo "| step | wall before (s) | wall now (s) | wall now / before | CPU before (s) | CPU now (s) | CPU now / before |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for step in "${steps[@]}"; do
  awk -F'|' -v s="$step" '
    function median(a, n,   i, j, t) {
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    $2 == s && $1 == "before" { bw[++nb] = $3; bc[nb] = $4 }
    $2 == s && $1 == "now" { ww[++nw] = $3; wc[nw] = $4 }
    END {
      mbw = median(bw, nb); mww = median(ww, nw); mbc = median(bc, nb); mwc = median(wc, nw)
      printf "| sbk %s | %.2f | %.2f | %.3f | %.2f | %.2f | %.3f |\n", s, mbw, mww, (mbw > 0 ? mww / mbw : 0), mbc, mwc, (mbc > 0 ? mwc / mbc : 0)
    }' "$work/results"
done
