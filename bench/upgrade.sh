#!/bin/bash
# upgrade.sh [ROUNDS]: a deploy under wrk load, two ways, alternated.
#   upgrade: install a new build, then `server upgrade` (the hitless upgrade)
#   restart: SIGTERM to the master, wait for it to exit, start the new build
#            (what `systemctl restart` does without socket activation)
# wrk -t2 -c50 -d12s on GET /health (keep-alive), the deploy 4 s in; 2
# workers. Prints, per round, wrk's requests and errors (socket errors and
# non-2xx) and, for the upgrade, how long `server upgrade` took and how long
# the new master took from its start to all its workers ready (its log).
# Builds ./server twice (v1, v2) into a temporary folder first.
set -e
rounds=${1:-3}
dir=$(mktemp -d)
trap 'kill $(cat $dir/pid 2>/dev/null) 2>/dev/null; rm -rf $dir' EXIT
go build -ldflags "-X main.version=v1" -o $dir/v1 ./cmd/server
go build -ldflags "-X main.version=v2" -o $dir/v2 ./cmd/server

start() { # port
  DATABASE_URL=sqlite:$dir/s.db CONTROL_SOCKET=$dir/c.sock WORKERS=2 PORT=$1 HOST=127.0.0.1 \
    LOG_FORMAT=json ACCESS_LOG=false $dir/server >/dev/null 2>>$dir/log &
  echo $! >$dir/pid
  for i in $(seq 200); do curl -s -o /dev/null 127.0.0.1:$1/health && return; sleep 0.05; done
  echo "server did not start" >&2; exit 1
}

round() { # how port
  install -m 0755 $dir/v1 $dir/server
  : >$dir/log
  start $2
  wrk -t2 -c50 -d12s http://127.0.0.1:$2/health >$dir/wrk 2>&1 &
  w=$!
  sleep 4
  install -m 0755 $dir/v2 $dir/server
  t0=$(date +%s%N)
  if [ $1 = upgrade ]; then
    $dir/server upgrade --control-socket $dir/c.sock >/dev/null
    took="upgrade answered in $((($(date +%s%N) - t0) / 1000000)) ms, new master ready $(grep -o '"took_ms":[0-9.]*' $dir/log | cut -d: -f2) ms after it started"
  else
    old=$(cat $dir/pid)
    kill -TERM $old
    while kill -0 $old 2>/dev/null; do sleep 0.01; done
    start $2
    took="serving again after $((($(date +%s%N) - t0) / 1000000)) ms"
  fi
  wait $w
  req=$(awk '/requests in/ {print $1}' $dir/wrk)
  err=$(awk '/Socket errors/ {s=0; for (i=4;i<=NF;i+=2) s+=$i; print s}' $dir/wrk)
  non2xx=$(awk '/Non-2xx/ {print $NF}' $dir/wrk)
  echo "$1: $req requests, ${err:-0} socket errors, ${non2xx:-0} non-2xx; $took"
  # The server now running (the new master, or the restarted one).
  pid=$(grep -o '"new_pid":[0-9]*' $dir/log | tail -1 | cut -d: -f2)
  [ $1 = upgrade ] && [ -n "$pid" ] && echo $pid >$dir/pid
  kill -TERM $(cat $dir/pid)
  while kill -0 $(cat $dir/pid) 2>/dev/null; do sleep 0.05; done
}

for r in $(seq $rounds); do
  for how in upgrade restart; do
    round $how 18$((RANDOM % 900 + 100))
  done
done
