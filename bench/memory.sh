#!/usr/bin/env bash
# memory.sh: memory of the process model, idle. Builds ./server, the
# example docs/examples/hello and the plain-prefork baseline (stripped, as
# make build does), runs each with 2 workers on a loopback port, sends 20
# requests on new connections, waits 2 s and prints every process's RSS,
# PSS, anonymous and file-backed memory (from /proc/PID/smaps_rollup).
#   bench/memory.sh            # prints a markdown table
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(-trimpath -ldflags "-s -w")
go build "${flags[@]}" -o "$out/server" ./cmd/server
go build "${flags[@]}" -o "$out/hello" ./docs/examples/hello
go build "${flags[@]}" -o "$out/baseline" ./bench/baseline

kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/smaps_rollup"; }
mib() { awk -v n="$1" 'BEGIN {printf "%.1f", n / 1024}'; }

measure() { # measure NAME PORT CMD...
  local name=$1 port=$2 pid kids p rss pss anon
  shift 2
  mkdir -p "$out/data-$name"
  (cd "$out" && exec env WORKERS=2 HOST=127.0.0.1 PORT="$port" LOG_FORMAT=json ACCESS_LOG=false \
      DATABASE_URL="sqlite:$out/data-$name/s.db" "$@") >"$out/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
  sleep 1 # the second worker's start
  for _ in $(seq 20); do curl -s -o /dev/null -H 'Connection: close' "http://127.0.0.1:$port/health"; done
  sleep 2 # idle
  kids=$(cat /proc/"$pid"/task/*/children)
  for p in $pid $kids; do
    rss=$(kb "$p" Rss); pss=$(kb "$p" Pss); anon=$(kb "$p" Anonymous)
    echo "| $name | $( [ "$p" = "$pid" ] && echo parent || echo child ) | $(mib "$rss") | $(mib "$pss") | $(mib "$anon") | $(mib $((rss - anon))) |"
  done
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
}

echo "| program | process | RSS MiB | PSS MiB | anonymous MiB | file-backed MiB |"
echo "|---|---|---|---|---|---|"
measure baseline 18761 "$out/baseline" -addr 127.0.0.1:18761 -procs 2
measure hello 18762 "$out/hello"
measure server 18763 "$out/server"
ls -l "$out/baseline" "$out/hello" "$out/server" | awk '{printf "binary %s: %.1f MiB\n", $NF, $5 / 1048576}' | sed "s|$out/||"
