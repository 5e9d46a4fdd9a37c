# Shared by the end-to-end benchmark scripts (sourced, not run). Needs $work (a scratch folder).

# bench_setup NAME GIB BASE TOOL...: checks that the tools are there, builds the release binary
# ($sbk), makes a scratch folder under BASE ($work, removed at exit) and an ext4 image of GIB GiB
# in it ($img, $size bytes).
bench_setup() {
  local name=$1 gib=$2 base=$3; shift 3
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool (apt-get install time e2fsprogs)" >&2; exit 1; }
  done
  cargo build --release -p sbk >&2
  sbk=$PWD/target/release/sbk
  work=$(mktemp -d "$base/sbk-$name.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  img=$work/disk.img
  size=$((gib << 30))
  echo "making a ${gib} GiB ext4 image from /usr ..." >&2
  make_image "$img" "$size"
}

# make_image IMG BYTES: a realistic disk image, an ext4 filesystem filled to about half from the
# machine's /usr in /usr's order (binaries, libraries, text); free space stays zero.
make_image() {
  local img=$1 size=$2 tree=$work/tree
  mkdir -p "$tree"
  { find /usr/bin /usr/share /usr/include /usr/lib -xdev -type f -printf '%s %p\n' 2>/dev/null || true; } |
    awk -v b="$((size * 50 / 100))" '{ s += $1; if (s > b) exit; sub(/^[0-9]+ /, ""); print }' >"$work/files" || true
  tar -cf - -T "$work/files" 2>/dev/null | tar -xf - -C "$tree" || true
  truncate -s "$size" "$img"
  PATH=$PATH:/usr/sbin mke2fs -q -F -t ext4 -d "$tree" "$img"
  rm -rf "$tree"
}

# measure LABEL CMD...: runs CMD under /usr/bin/time; prints "label|seconds|rss_kib".
measure() {
  local label=$1; shift
  local out
  out=$( { /usr/bin/time -f "TIME %e %M" "$@" >/dev/null 2>"$work/stderr"; } 2>&1 ) || true
  if ! grep -q "^TIME" "$work/stderr"; then cat "$work/stderr" >&2; echo "$label failed" >&2; exit 1; fi
  local t rss
  read -r _ t rss < <(grep "^TIME" "$work/stderr" | tail -1)
  if grep -q "Command exited with non-zero status" "$work/stderr"; then cat "$work/stderr" >&2; echo "$label failed" >&2; exit 1; fi
  echo "$label|$t|$rss"
}

# rows BYTES RESULT...: table rows from "label|seconds|rss_kib" results; throughput over BYTES, and
# the ratio to the first result (the raw read).
rows() {
  local bytes=$1; shift
  local raw
  raw=$(echo "$1" | cut -d'|' -f2)
  echo "|---|---:|---:|---:|---:|"
  for r in "$@"; do
    IFS='|' read -r label t rss <<<"$r"
    awk -v l="$label" -v t="$t" -v r="$rss" -v raw="$raw" -v size="$bytes" 'BEGIN {
      tp = size / 1048576 / (t > 0 ? t : 0.01); rawtp = size / 1048576 / (raw > 0 ? raw : 0.01);
      printf "| %s | %.2f | %.0f | %.2fx | %.0f |\n", l, t, tp, tp / rawtp, r / 1024 }'
  done
}
