#!/usr/bin/env bash
# A CPU hog next to a calm site: the calm site's latency with and without the hog.
# Run as root (sites run as their own users, in their own cpu cgroups).
# Usage: bash bench/cpu_neighbour.sh [seconds per run, default 10]
# Needs: wrk (apt-get install wrk), a release build (cargo build --release).
set -euo pipefail
secs=${1:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
roost="$root/target/release/roost"
[ "$(id -u)" = 0 ] || { echo "run as root: sites need their own users and cgroups" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ -x "$roost" ] || (cd "$root" && cargo build --release)

# Not below /tmp: as root, workers see their own TMPDIR there (docs/operations.md).
mkdir -p /var/lib/roost-bench
work=$(mktemp -d -p /var/lib/roost-bench); chmod 755 "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
users=(roostbench-calm roostbench-hog)
cleanup() {
  [ -n "${node:-}" ] && kill "$node" 2>/dev/null && wait "$node" 2>/dev/null || true
  for u in "${users[@]}"; do userdel "$u" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for u in "${users[@]}"; do id "$u" >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin -K UID_MIN=2000 "$u"; done
mkdir -p "$work/apps"; chmod 755 "$work/apps"
cp "$root/bench/apps/spin.py" "$work/apps/"
reg="sqlite:$work/registry.db"
"$roost" --registry "$reg" site add calm --host calm.bench --entry "$work/apps/spin.py" \
  --user roostbench-calm --processes-max 2 >/dev/null
"$roost" --registry "$reg" site add hog --host hog.bench --entry "$work/apps/spin.py" \
  --user roostbench-hog --processes-max 4 >/dev/null
"$roost" --registry "$reg" serve --listen "127.0.0.1:$port" --cgroup-name roost-bench \
  --log-dir "$work/logs" --run-dir "$work/run" --tmp-dir "$work/tmp" 2>"$work/node.log" &
node=$!
for _ in $(seq 50); do curl -sf -H 'Host: calm.bench' "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
grep -o 'enforced=.*' "$work/node.log" | head -1 || true

measure() {
  wrk -t1 -c4 -d"${secs}s" --latency -H 'Host: calm.bench' "http://127.0.0.1:$port/" \
    | awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} /Requests\/sec/{rps=$2} END{printf "p50 %s  p99 %s  %s req/s\n", p50, p99, rps}'
}
echo "calm site alone:        $(measure)"
wrk -t1 -c8 -d"$((secs + 4))s" -H 'Host: hog.bench' "http://127.0.0.1:$port/spin?ms=500" >/dev/null &
hog=$!
sleep 2
echo "calm site beside a hog: $(measure)"
wait "$hog" || true
