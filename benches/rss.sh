#!/usr/bin/env bash
# Peak memory of first backups (issue 19: at most 128 MiB with --threads 2 for 64 KiB to 4 MiB
# chunks and 1 to 32 GiB sources, into an empty repository with the default pack size).
#
#   bash benches/rss.sh [WORKDIR] [GIB...]      (defaults: /var/tmp, 1 4 32)
#
# Each source is incompressible (AES-CTR bytes from openssl, every chunk new: the most a backup
# holds) and streamed to `sbk backup -` so that no image of 32 GiB is needed; the repository does
# take that much disk. Prints peak RSS (VmHWM) and the peak of anonymous memory (RssAnon, sampled
# every 10 ms: mapped cache tables are file pages) per chunk size and source size.
# SBK=/path/to/sbk measures another build; CHUNKS="64K 4M" other chunk sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-/var/tmp}
shift || true
sizes=${*:-1 4 32}
command -v openssl >/dev/null || { echo "needs openssl" >&2; exit 1; }
if [ -z "${SBK:-}" ]; then cargo build --release -p sbk >&2; fi
sbk=${SBK:-$PWD/target/release/sbk}
w=$(mktemp -d "$base/sbk-rss.XXXXXX")
trap 'rm -rf "$w"' EXIT
echo "| average chunk | source (GiB) | peak RSS (MiB) | peak anonymous (MiB) | seconds |"
echo "|---|---:|---:|---:|---:|"
for chunk in ${CHUNKS:-64K 256K 1M 4M}; do
  for gib in $sizes; do
    rm -rf "$w/repo" "$w/cache"
    SBK_CACHE_DIR=$w/cache "$sbk" init -q --encryption none --chunk-size "$chunk" --repo "$w/repo"
    start=$(date +%s.%N)
    # openssl fails once head has all it wants and closes the pipe: that is the end, not an error.
    { openssl enc -aes-128-ctr -pass pass:sbk-rss -nosalt -pbkdf2 -in /dev/zero 2>/dev/null || true; } |
      head -c "$((gib << 30))" |
      SBK_CACHE_DIR=$w/cache "$sbk" backup -q --threads 2 --repo "$w/repo" --source-name rss - 2>"$w/err" &
    # $! is the pipeline's last command: sbk.
    pid=$! anon=0 hwm=0
    while kill -0 "$pid" 2>/dev/null; do
      if s=$(cat "/proc/$pid/status" 2>/dev/null); then
        a=$(awk '/^RssAnon/ { print $2 }' <<<"$s"); h=$(awk '/^VmHWM/ { print $2 }' <<<"$s")
        [ -n "$a" ] && [ "$a" -gt "$anon" ] && anon=$a
        [ -n "$h" ] && hwm=$h
      fi
      sleep 0.01
    done
    wait "$pid" || { cat "$w/err" >&2; echo "backup of $gib GiB with $chunk chunks failed" >&2; exit 1; }
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    echo "| $chunk | $gib | $((hwm / 1024)) | $((anon / 1024)) | $secs |"
  done
done
