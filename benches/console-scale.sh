#!/usr/bin/env bash
#   bash benches/console-scale.sh [SNAPSHOTS]        (default 10000; SOURCES=100)
# Issue 22's figure: every page of `sbk console` over a scale-repo repository of SNAPSHOTS
# snapshots (unencrypted, SOURCES sources), timed in Debian's chromium by
# tests/e2e/console_browser.py (from the request to the load event), while the console's
# background count of the repository runs. Prints the timings as JSON; exits 1 when a page
# takes a second or more. Needs what scripts/test.sh installs (the venv with Playwright, chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
snaps=${1:-10000}
sources=${SOURCES:-100}
python=${SBK_TEST_PYTHON:-$PWD/target/peers/seaweedfs/bin/python}
chromium=${SBK_TEST_CHROMIUM:-$(command -v chromium || echo /usr/bin/chromium)}
cargo build --release -q -p sbk -p sbk-benches >&2
sbk=$PWD/target/release/sbk
w=$(mktemp -d /var/tmp/sbk-console-scale.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$w"
}
trap cleanup EXIT
export SBK_CACHE_DIR=$w/cache SBK_STATE_DIR=$w/state
t0=$(date +%s.%N)
target/release/scale-repo --repo "$w/repo" --chunks $((snaps * 20)) --snapshots "$snaps" \
  --sources "$sources" --encryption none > "$w/scale.json"
t1=$(date +%s.%N)
head -c 32 /dev/urandom | base64 > "$w/token" && chmod 600 "$w/token"
mkfifo "$w/out"
"$sbk" --json console --repo "$w/repo" --token-file "$w/token" --listen 127.0.0.1:0 > "$w/out" 2> "$w/console.err" &
pid=$!
read -r line < "$w/out"
t2=$(date +%s.%N)
base=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listening"])' "$line")
# A snapshot in the middle and its source.
read -r snap source < <("$sbk" snapshots --repo "$w/repo" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
m = s[len(s) // 2]
print(m["id"], m["source"])')
python3 - "$w/case.json" <<PY
import json, sys
json.dump({
    "base": "$base", "token": open("$w/token").read().strip(), "chromium": "$chromium",
    "repos": [{"location": "$w/repo", "snapshots": $snaps}],
    "timed": {
        "overview": "/", "sources": "/sources", "source": "/r/0/source/$source",
        "snapshot": "/r/0/snap/$snap", "files": "/r/0/snap/$snap/files",
        "jobs": "/jobs", "exports": "/exports",
    },
    "budget_ms": 1000,
}, open(sys.argv[1], "w"))
PY
"$python" tests/e2e/console_browser.py "$w/case.json" > "$w/timings.json"
python3 - "$w/timings.json" "$snaps" "$sources" "$t0" "$t1" "$t2" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))["timings"]
snaps, sources, t0, t1, t2 = sys.argv[2], sys.argv[3], *map(float, sys.argv[4:7])
print(json.dumps({"snapshots": int(snaps), "sources": int(sources),
                  "harness_s": round(t1 - t0, 1), "console_start_s": round(t2 - t1, 2),
                  "pages_ms": {k: round(v) for k, v in t.items()}}))
PY
