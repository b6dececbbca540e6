#!/usr/bin/env bash
# idlecpu.sh SERVER...: the CPU the workers of each server binary spend in
# 10 s while 10,000 chats wait on them (2 workers, a 300 s simulated reply,
# one chat per connection, sent by bench/holdchats). Alternate the builds
# to compare them: bench/idlecpu.sh old/server ./server old/server ./server
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 30000 2>/dev/null || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
go build -o "$out/holdchats" ./bench/holdchats
port=18600
hz=$(getconf CLK_TCK)
for bin in "$@"; do
  port=$((port + 1))
  rm -rf "$out/data" && mkdir "$out/data"
  WORKERS=2 HOST=127.0.0.1 PORT=$port SIMULATED_LATENCY=300s ACCESS_LOG=false LOG_FORMAT=json \
    DATABASE_URL="sqlite:$out/data/s.db" "$bin" >"$out/server.log" 2>&1 &
  master=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
  sleep 2
  "$out/holdchats" -addr "127.0.0.1:$port" -n 10000 >"$out/hold.txt" &
  hold=$!
  sleep 20 # every chat sent and started
  workers=$(cat /proc/"$master"/task/*/children)
  ticks() { local t=0; for w in $workers; do t=$((t + $(awk '{print $14 + $15}' /proc/"$w"/stat))); done; echo "$t"; }
  a=$(ticks); sleep 10; b=$(ticks)
  echo "$bin: $(head -1 "$out/hold.txt"), workers' CPU in 10 s: $(awk -v t=$((b - a)) -v hz="$hz" 'BEGIN {printf "%.2f s", t / hz}')"
  kill "$hold"; kill -TERM "$master"; wait "$master" 2>/dev/null || true
done
