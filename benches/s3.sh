#!/usr/bin/env bash
# S3 benchmark: backup and restore of one image to SeaweedFS on loopback beside the local
# backend, in one run, with the S3 requests sent per GiB and peak RSS.
#
#   bash benches/s3.sh [IMAGE_GIB] [WORKDIR]      (defaults: 2, /var/tmp)
#
# Needs SeaweedFS's weed: $SBK_TEST_WEED, or target/peers/seaweedfs/bin/weed (scripts/test.sh
# installs it). Prints Markdown for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-2}
base=${2:-/var/tmp}
weed=${SBK_TEST_WEED:-$PWD/target/peers/seaweedfs/bin/weed}
[ -x "$weed" ] || { echo "no weed binary: run scripts/test.sh once, or set SBK_TEST_WEED" >&2; exit 1; }
cargo build --release -p sbk >&2
sbk=$PWD/target/release/sbk
work=$(mktemp -d "$base/sbk-s3.XXXXXX")
wpid=
# SIGKILL: weed mini outlives a SIGTERM (four were found running long after their runs).
# Its gRPC sockets go to /tmp whatever it is told, named by port + 10000: removed here too.
trap '[ -n "$wpid" ] && { kill -KILL "$wpid" 2>/dev/null; wait "$wpid" 2>/dev/null; for p in 0 1 2 3 4; do rm -f /tmp/seaweedfs-*-grpc-$((port + 10000 + p)).sock; done; }; rm -rf "$work"' EXIT
source benches/lib.sh
img=$work/disk.img
echo "making a ${gib} GiB ext4 image from /usr ..." >&2
make_image "$img" "$((gib << 30))"
size=$(stat -c %s "$img")

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1
port=$((20000 + RANDOM % 20000))
mkdir -p "$work/weed"
"$weed" -logdir="$work" mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -webdav=false \
  -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -bucket=bench \
  -s3.port=$port -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
  -admin.port=$((port + 4)) -filer.localSocket="$work/filer.sock" -s3.localSocket="$work/s3.sock" >"$work/weed.log" 2>&1 &
wpid=$!
export AWS_ENDPOINT_URL=http://127.0.0.1:$port SBK_PASSWORD=benchmark SBK_TEST_KDF=weak
until "$sbk" --repo s3://bench/probe snapshots >/dev/null 2>&1 || [ $? = 10 ]; do sleep 0.3; done

r=()
r+=("$(measure "raw O_DIRECT read of the image (dd bs=16M)" dd if="$img" of=/dev/null bs=16M iflag=direct)")
"$sbk" init --quiet --repo "$work/local"
r+=("$(measure "local: sbk backup" "$sbk" backup --quiet --repo "$work/local" --cache-dir "$work/c1" "$img")")
"$sbk" init --quiet --repo s3://bench/repo
r+=("$(SBK_S3_STATS=1 measure "S3 (SeaweedFS): sbk backup" "$sbk" backup --quiet --repo s3://bench/repo --cache-dir "$work/c2" "$img")")
backup_requests=$(grep 's3 requests' "$work/stderr" | tail -1 | sed 's/.*requests: //')
r+=("$(measure "local: sbk restore" "$sbk" restore --quiet --repo "$work/local" latest "$work/r1.img")")
cmp "$img" "$work/r1.img" >&2; rm -f "$work/r1.img"
r+=("$(SBK_S3_STATS=1 measure "S3 (SeaweedFS): sbk restore" "$sbk" restore --quiet --repo s3://bench/repo --cache-dir "$work/c2" latest "$work/r2.img")")
restore_requests=$(grep 's3 requests' "$work/stderr" | tail -1 | sed 's/.*requests: //')
cmp "$img" "$work/r2.img" >&2; rm -f "$work/r2.img"
stored=$(du -sk "$work/local/packs" | cut -f1)

echo
echo "Image: $((size >> 30)) GiB ext4 ($(( $(du -sk "$img" | cut -f1) / 1024 )) MiB allocated, $((stored / 1024)) MiB of packs). SeaweedFS $("$weed" version 2>/dev/null | head -1 | awk '{print $3}') (weed mini) on loopback. Machine: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d)."
echo
echo "| step | wall time (s) | throughput (MiB/s) | ratio to raw read | peak RSS (MiB) |"
rows "$size" "${r[@]}"
echo
echo "S3 requests of the backup: $backup_requests (per GiB of image: divide by $((size >> 30)))."
echo "S3 requests of the restore: $restore_requests."
