#!/usr/bin/env bash
# Benchmarks of the process model, the Agent API, reload, metrics and
# PostgreSQL (make
# bench runs this after make build). Installs wrk if missing, builds the
# baseline and the driver into bench/out/bin, runs every scenario (about 12
# minutes) and prints the summary.
# Raw results: bench/out/ (results.json, summary.md, wrk reports, CSVs, logs).
# Arguments are passed to the driver: bench/run.sh -run api,reload,metrics
# SERVER=path/to/server measures another build than ./server.
set -euo pipefail
cd "$(dirname "$0")/.."
server="${SERVER:-./server}"

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk
fi
[ -x "$server" ] || { echo "bench: $server missing: run make build first" >&2; exit 1; }

# The api scenario holds 10,000 client connections open at once.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 12000 ]; then
  echo "bench: ulimit -n is $(ulimit -n): the api scenario needs about 12000" >&2
fi

out=bench/out
mkdir -p "$out/bin"
rm -rf "$out/logs" "$out"/*.txt "$out"/*.csv
go build -o "$out/bin/baseline" ./bench/baseline
go build -o "$out/bin/procbench" ./bench/procbench

"$out/bin/procbench" -server "$server" -baseline "$out/bin/baseline" -out "$out" "$@"

# Past one machine: SQLite against PostgreSQL, one and two hosts. Runs with
# the full suite (no arguments) when PostgreSQL answers.
if [ "$#" -eq 0 ]; then
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    go run ./bench/pgbench -server "$server" -out "$out"
  else
    echo "bench: PostgreSQL not reachable on 127.0.0.1:5432: pgbench skipped" >&2
  fi
fi
