#!/usr/bin/env bash
#   bash benches/scale.sh CHUNKS [WORKDIR]      (LIMIT_MIB=256, SNAPSHOTS=20, SOURCES=2, IMAGE_MIB=4096)
#   KEEP=DIR bash benches/scale.sh CHUNKS       (the repository in DIR is kept, and reused)
#   ONLY="verify stats" bash benches/scale.sh CHUNKS       (only the commands named)
#   SBK=/path/to/sbk bash benches/scale.sh CHUNKS           (another build of sbk)
#   PAIRED=3 ONLY=none bash benches/scale.sh CHUNKS      (only the paired backups: PAIRED pairs of
#                                           backups of a new PAIRED_MIB image, default 2048, into an
#                                           empty repository and into this one; the median ratio)
#   S3=1 bash benches/scale.sh CHUNKS      (the repositories on SeaweedFS on loopback, started
#                                           here; each line adds the command's S3 requests)
# Issue 19's figures: a scale-repo repository of CHUNKS distinct chunks (unencrypted, for the
# timings), then every command the issue names, each inside a memory cgroup limited to
# LIMIT_MIB (the kernel reclaims mapped file pages under the limit, so what a command really
# holds is what counts). Prints one line per command: status, wall time, peak RSS (VmHWM, which
# counts mapped file pages) and the peak of anonymous memory (RssAnon, sampled every 20 ms).
# Exits 1 when any command fails or is killed by the limit: CI runs it at 10^6 chunks.
set -euo pipefail
cd "$(dirname "$0")/.."
chunks=${1:?usage: scale.sh CHUNKS [WORKDIR]}
limit=${LIMIT_MIB:-256}
snaps=${SNAPSHOTS:-20}
sources=${SOURCES:-2}
image_mib=${IMAGE_MIB:-4096}
cargo build --release -q -p sbk -p sbk-benches >&2
sbk=${SBK:-$PWD/target/release/sbk} # SBK=another build, to compare
scale=$PWD/target/release/scale-repo
if [ -n "${KEEP:-}" ]; then w=$KEEP; mkdir -p "$w"; else w=$(mktemp -d "${2:-/var/tmp}/sbk-scale.XXXXXX"); fi
# The disk it needs at once: the new image and its packs (2 x IMAGE_MIB, incompressible), the
# harness repository (0.3-0.45 KiB per chunk), the cache and the scratch files of stats (40 B
# per reference: about 3.4 GB at 10^7 chunks in 100 snapshots). A full disk would fail a
# command as if sbk were at fault, so say so first.
need_mib=$((2 * image_mib + chunks / 2000 + 4096))
free_mib=$(( $(df -Pk "$w" | awk 'NR == 2 {print $4}') / 1024 ))
if [ "$free_mib" -lt "$need_mib" ] && [ ! -d "$w/repo" ]; then
  echo "scale.sh: $w has $free_mib MiB free; $chunks chunks and a $image_mib MiB image need about $need_mib MiB" >&2
  [ -n "${KEEP:-}" ] || rm -rf "$w"
  exit 1
fi
cg="" wpid=""
cleanup() {
  # SIGKILL: weed mini outlives a SIGTERM.
  [ -n "$wpid" ] && kill -KILL "$wpid" 2>/dev/null && wait "$wpid" 2>/dev/null || true
  # Its gRPC sockets go to /tmp whatever it is told, named by port + 10000.
  if [ -n "$wpid" ]; then for p in 0 1 2 3 4; do rm -f /tmp/seaweedfs-*-grpc-$((port + 10000 + p)).sock; done; fi
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$w"
}
trap cleanup EXIT

# A memory cgroup of our own: v2 (memory.max) where the unified hierarchy has the controller,
# else v1 (memory.limit_in_bytes). Swap is limited too where the kernel accounts it, so a
# command cannot escape the limit by swapping.
if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
  cg=/sys/fs/cgroup/sbk-scale-$$
  mkdir "$cg"
  echo $((limit << 20)) > "$cg/memory.max"
  [ -f "$cg/memory.swap.max" ] && echo 0 > "$cg/memory.swap.max"
elif [ -d /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/sbk-scale-$$
  mkdir "$cg"
  echo $((limit << 20)) > "$cg/memory.limit_in_bytes"
  [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo $((limit << 20)) > "$cg/memory.memsw.limit_in_bytes"
else
  echo "scale.sh: no memory cgroup (neither v2 memory.max nor v1 memory.limit_in_bytes)" >&2
  exit 1
fi

failed=0
# limited NAME CMD...: runs CMD inside the cgroup, stdout to $w/NAME.out, and prints its figures.
limited() {
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ $name != paired-* ]] && ! [[ " $ONLY " == *" $name "* ]]; then return 0; fi
  local t0 t1 pid rc=0 anon=0 hwm=0 a h
  seconds=0
  t0=$(date +%s.%N)
  sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" "$@" > "$w/$name.out" 2> "$w/$name.err" &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    a=$(awk '/^RssAnon/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
    h=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
    [ "${a:-0}" -gt "$anon" ] && anon=$a
    [ "${h:-0}" -gt "$hwm" ] && hwm=$h
    sleep 0.02
  done
  wait $pid || rc=$?
  t1=$(date +%s.%N)
  seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
  printf '%-28s %-6s %8.2f s %6d MiB peak RSS %6d MiB peak anon\n' "$name" \
    "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" "$seconds" $((hwm / 1024)) $((anon / 1024))
  # SBK_S3_STATS makes sbk print its S3 requests on stderr, last.
  grep -h '^sbk: s3 requests' "$w/$name.err" | tail -1 | sed 's/^sbk: /    /' || true
  if [ $rc != 0 ]; then
    failed=1
    tail -3 "$w/$name.err" | sed 's/^/    /'
  fi
}

export SBK_CACHE_DIR=$w/cache
repo=$w/repo copy=$w/copy
if [ -n "${S3:-}" ]; then
  [ -z "${KEEP:-}" ] || { echo "scale.sh: KEEP keeps local repositories only" >&2; exit 1; }
  # SeaweedFS's weed (scripts/test.sh installs it), outside the cgroup: only sbk is measured.
  weed=${SBK_TEST_WEED:-$PWD/target/peers/seaweedfs/bin/weed}
  [ -x "$weed" ] || { echo "scale.sh: no weed binary: run scripts/test.sh once, or set SBK_TEST_WEED" >&2; exit 1; }
  port=$((20000 + RANDOM % 20000))
  mkdir -p "$w/weed"
  "$weed" -logdir="$w/weed" mini -dir="$w/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false \
    -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -bucket=scale \
    -s3.port=$port -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
    -admin.port=$((port + 4)) -filer.localSocket="$w/weed/filer.sock" -s3.localSocket="$w/weed/s3.sock" \
    >"$w/weed.log" 2>&1 &
  wpid=$!
  export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=scale AWS_SECRET_ACCESS_KEY=scalesecret AWS_REGION=us-east-1
  export SBK_S3_STATS=1
  repo=s3://scale/repo copy=s3://scale/copy
  # Ready once its bucket takes a repository (the bucket is made after the port opens).
  for _ in $(seq 100); do
    $sbk init -q --encryption none --repo s3://scale/probe 2>/dev/null && break
    sleep 0.3
  done
fi
echo "scale-repo: $chunks chunks, $snaps snapshots of $sources sources, unencrypted, at $repo; limit $limit MiB"
[ -n "${S3:-}" ] || [ ! -d $repo ] && $scale --repo $repo --chunks "$chunks" --snapshots "$snaps" --sources "$sources" --encryption none > $w/scale.json
cat $w/scale.json

# A new image: incompressible data, so that every chunk of it is new.
[[ -z "${ONLY:-}" || "$ONLY" == *backup* ]] && head -c $((image_mib << 20)) /dev/urandom > $w/new.img
sync
limited backup-new $sbk backup -q --threads 2 --repo $repo $w/new.img
limited backup-unchanged $sbk backup -q --threads 2 --repo $repo $w/new.img
rm -f $w/new.img
# Issue 19: a backup into this repository at >= 0.9x the throughput of the same backup into an
# empty one. Each pair backs up a new image (new chunks for both), the empty repository first.
if [ -n "${PAIRED:-}" ]; then
  ratios=""
  for i in $(seq "$PAIRED"); do
    head -c $((${PAIRED_MIB:-2048} << 20)) /dev/urandom > $w/pair.img
    sync
    rm -rf $w/empty
    $sbk init -q --encryption none --repo $w/empty
    limited paired-empty-$i $sbk backup -q --threads 2 --repo $w/empty $w/pair.img
    empty_s=$seconds
    limited paired-full-$i $sbk backup -q --threads 2 --repo $repo $w/pair.img
    ratios="$ratios $(awk -v e="$empty_s" -v f="$seconds" 'BEGIN { printf "%.3f", e / f }')"
  done
  rm -rf $w/empty $w/pair.img
  echo "paired: throughput into this repository / into an empty one:$ratios; median $(echo $ratios | tr ' ' '\n' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
fi
limited snapshots $sbk snapshots --repo $repo --json
sample=$($sbk snapshots --repo $repo --json | python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin) if x["tags"]]; print(s[len(s)//2]["id"])')
limited restore $sbk restore -q --repo $repo "$sample" $w/restored.img
if [ -f $w/restored.img ]; then
  want=$($scale --expect $repo "$sample")
  got=$(sha256sum < $w/restored.img | cut -d' ' -f1)
  rm -f $w/restored.img
  if [ "$want" != "$got" ]; then echo "restore: sha256 $got, expected $want" >&2; failed=1; fi
fi
limited verify $sbk verify -q --repo $repo
limited verify-subset-1% $sbk verify -q --repo $repo --read-data-subset 1%
limited stats $sbk stats -q --repo $repo
rm -rf $w/copy; $sbk init -q --encryption none --repo $copy
limited copy-one $sbk copy -q --repo $copy --from-repo $repo "$sample"
limited repair-index $sbk repair index -q --repo $repo
limited forget-half $sbk forget -q --repo $repo --keep-last $(( snaps / sources / 2 > 1 ? snaps / sources / 2 : 1 ))
limited prune-mark $sbk prune -q --repo $repo --grace 0s
limited prune-sweep $sbk prune -q --repo $repo --grace 0s
limited prune-exclusive $sbk prune -q --repo $repo --exclusive
exit $failed
