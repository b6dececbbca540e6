#!/bin/bash
# idle.sh BIN HEADERS N: worker RSS growth for N idle keep-alive connections
# on a server built at BIN with LIMIT_REQUEST_HEADERS=HEADERS, one worker.
set -u
d=$(mktemp -d); port=$((19000 + RANDOM % 900))
go build -o "$d/idleconns" "$(cd "$(dirname "$0")" && pwd)/idleconns"
WORKERS=1 TIMEOUT_KEEP_ALIVE=120 ACCESS_LOG=false LIMIT_REQUEST_HEADERS=$2 PORT=$port HOST=127.0.0.1 \
  LOG_FORMAT=json DATABASE_URL=sqlite:$d/s.db CONTROL_SOCKET=$d/c.sock "$(realpath "$1")" >/dev/null 2>"$d/log" &
pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "127.0.0.1:$port/health" && break; sleep 0.1; done
sleep 1
echo "$(basename "$1") headers=$2 $("$d/idleconns" "127.0.0.1:$port" "$(pgrep -P $pid | head -1)" "$3")"
kill -TERM $pid; wait $pid 2>/dev/null; rm -rf "$d"
