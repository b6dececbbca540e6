#!/usr/bin/env bash
# chatmem.sh [-n CHATS] SERVER...: memory per chat in flight. Each server
# binary runs with 2 workers and a 300 s simulated reply (the LLM timeout
# raised above it); bench/holdchats sends CHATS chats (default 10000), one
# per new connection, and holds them. Once the status counts every chat in
# flight, the workers' RSS is read, against the same before the chats; the
# in-flight count is read again after the RSS, and both are in the table. Alternate
# the builds to compare them: bench/chatmem.sh old/server ./server old/server ./server
set -euo pipefail
cd "$(dirname "$0")/.."
n=10000
if [ "${1:-}" = -n ]; then n=$2; shift 2; fi
ulimit -n 30000 2>/dev/null || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
go build -o "$out/holdchats" ./bench/holdchats
port=18700
rss() { local t=0; for w in $workers; do t=$((t + $(awk '$1 == "VmRSS:" {print $2}' /proc/"$w"/status))); done; echo "$t"; }
echo "| server | chats | in flight at the reading | workers' RSS before | with chats in flight | RSS per chat |"
echo "|---|---|---|---|---|---|"
for bin in "$@"; do
  port=$((port + 1))
  rm -rf "$out/data" && mkdir "$out/data"
  WORKERS=2 HOST=127.0.0.1 PORT=$port SIMULATED_LATENCY=300s LLM_TIMEOUT=600s ACCESS_LOG=false LOG_FORMAT=json \
    CONTROL_SOCKET="$out/data/control.sock" DATABASE_URL="sqlite:$out/data/s.db" "$bin" >"$out/server.log" 2>&1 &
  master=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
  sleep 2 # both workers up
  workers=$(cat /proc/"$master"/task/*/children)
  before=$(rss)
  "$out/holdchats" -addr "127.0.0.1:$port" -n "$n" >"$out/hold.txt" &
  hold=$!
  # Every chat started: the status counts them in flight.
  inflight() {
    "$bin" status --json --control-socket "$out/data/control.sock" 2>/dev/null |
      grep -o '"in_flight": *[0-9]*' | awk -F: '{s += $2} END {print s + 0}' || echo 0
  }
  for _ in $(seq 60); do
    [ "$(inflight)" -ge "$n" ] && break
    sleep 1
  done
  sleep 5 # the burst's garbage collected
  after=$(rss)
  # The status lags by a heartbeat; a chat that ended before the reading
  # would leave its connection, not its chat, in the RSS.
  sleep 2
  held=$(inflight)
  [ "$held" -ge "$n" ] || echo "chatmem: $bin: $held of $n chats in flight at the reading" >&2
  echo "| $bin | $n | $held | $(awk -v k="$before" 'BEGIN {printf "%.1f MiB", k / 1024}') | $(awk -v k="$after" 'BEGIN {printf "%.1f MiB", k / 1024}') | $(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN {printf "%.1f KB", (a - b) * 1.024 / n}') |"
  kill "$hold"; kill -TERM "$master"; wait "$master" 2>/dev/null || true
done
