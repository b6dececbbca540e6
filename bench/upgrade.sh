#!/bin/bash
# upgrade.sh [ROUNDS]: a deploy, three ways, alternated in each round.
#   upgrade: install a new build, then `server upgrade` (the hitless
#            upgrade), under wrk
#   restart: SIGTERM to the master, wait for it to exit, start the new build
#            (what `systemctl restart` does without socket activation),
#            under wrk
#   quiet:   the upgrade with no wrk running: how fast it is when the
#            machine is not saturated by the load generator itself
# wrk -t2 -c50 -d12s on GET /health (keep-alive), the deploy 4 s in; 2
# workers. Prints, per round, wrk's requests and errors (socket errors and
# non-2xx); for an upgrade, how long `server upgrade` took, how long the new
# master took from its start to all its workers ready (took_ms of its log
# line) and where that time went (from the log's timestamps, to the ms);
# for a restart, how long from SIGTERM until the new build answered. Then
# the medians. Builds ./server twice (v1, v2) into a temporary folder first.
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

# phases: from the log of one upgrade, in ms after the old master started
# the new one: the new master's main (Go start-up, settings), its store
# ready (open, migrations, instance claim), its first worker started, its
# last worker ready, and the old master told.
phases() {
  awk -F'"time":"' '
    function ms(line,  t) { split(line, a, "\""); t = substr(a[1], 12, 12); split(t, h, ":"); return (h[1]*3600 + h[2]*60 + h[3]) * 1000 }
    /"message":"upgrade started"/ { t0 = ms($2) }
    t0 == "" { next }
    /"message":"upgrade: new master starting"/ { m = ms($2) - t0 }
    /"message":"store ready"/ && m != "" && s == "" { s = ms($2) - t0 }
    /"message":"worker started"/ && s != "" && w == "" { w = ms($2) - t0 }
    /"message":"Application startup complete"/ { r = ms($2) - t0 }
    /"message":"new master ready, old workers draining"/ { d = ms($2) - t0 }
    END { printf "main %d, store ready %d, first worker started %d, all workers ready %d, old master told %d ms", m, s, w, r, d }
  ' $dir/log
}

round() { # how port
  install -m 0755 $dir/v1 $dir/server
  : >$dir/log
  start $2
  if [ $1 != quiet ]; then
    wrk -t2 -c50 -d12s http://127.0.0.1:$2/health >$dir/wrk 2>&1 &
    w=$!
    sleep 4
  else
    w= ; : >$dir/wrk; sleep 1
  fi
  install -m 0755 $dir/v2 $dir/server
  t0=$(date +%s%N)
  if [ $1 != restart ]; then
    $dir/server upgrade --control-socket $dir/c.sock >/dev/null
    answered=$((($(date +%s%N) - t0) / 1000000))
    took=$(grep -o '"took_ms":[0-9.]*' $dir/log | cut -d: -f2 | cut -d. -f1)
    echo "$1 $answered $took" >>$dir/figures
    what="upgrade answered in $answered ms, new master ready $took ms after it started ($(phases))"
  else
    old=$(cat $dir/pid)
    kill -TERM $old
    while kill -0 $old 2>/dev/null; do sleep 0.01; done
    start $2
    again=$((($(date +%s%N) - t0) / 1000000))
    echo "$1 $again" >>$dir/figures
    what="serving again after $again ms"
  fi
  [ -n "$w" ] && wait $w
  req=$(awk '/requests in/ {print $1}' $dir/wrk)
  err=$(awk '/Socket errors/ {s=0; for (i=4;i<=NF;i+=2) s+=$i; print s}' $dir/wrk)
  non2xx=$(awk '/Non-2xx/ {print $NF}' $dir/wrk)
  [ $1 != quiet ] && echo "${err:-0} ${non2xx:-0}" >>$dir/errors.$1
  echo "$1: ${req:--} requests, ${err:-0} socket errors, ${non2xx:-0} non-2xx; $what"
  # The server now running (the new master, or the restarted one).
  pid=$(grep -o '"new_pid":[0-9]*' $dir/log | tail -1 | cut -d: -f2)
  [ $1 != restart ] && [ -n "$pid" ] && echo $pid >$dir/pid
  kill -TERM $(cat $dir/pid)
  while kill -0 $(cat $dir/pid) 2>/dev/null; do sleep 0.05; done
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq $rounds); do
  for how in upgrade restart quiet; do
    round $how 18$((RANDOM % 900 + 100))
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "medians over $rounds rounds:"
for how in upgrade quiet; do
  echo "  $how: answered $(awk -v h=$how '$1 == h {print $2}' $dir/figures | median) ms, new master ready $(awk -v h=$how '$1 == h {print $3}' $dir/figures | median) ms after its start"
done
echo "  restart: serving again $(awk '$1 == "restart" {print $2}' $dir/figures | median) ms after SIGTERM"
for how in upgrade restart; do
  echo "  $how under wrk: $(awk '{print $1 + $2}' $dir/errors.$how | median) errors"
done
