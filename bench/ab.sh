#!/bin/bash
# ab.sh WORKERS ACCESS_LOG: alternate two server builds under wrk -t2 -c100 -d8s on
# GET /health, three rounds each (ROUNDS="1 2" for fewer), old first (OLD=path,
# NEW=path; defaults below).
run() { # bin workers accesslog port
  d=$(mktemp -d)
  WORKERS=$2 ACCESS_LOG=$3 PORT=$4 HOST=127.0.0.1 LOG_FORMAT=json DATABASE_URL=sqlite:$d/s.db CONTROL_SOCKET=$d/c.sock $1 >/dev/null 2>$d/log &
  pid=$!
  for i in $(seq 100); do curl -s -o /dev/null 127.0.0.1:$4/health && break; sleep 0.1; done
  wrk -t2 -c100 -d8s http://127.0.0.1:$4/health 2>/dev/null | awk '/Requests\/sec/ {print $2}'
  kill -TERM $pid; wait $pid 2>/dev/null; rm -rf $d
}
for r in ${ROUNDS:-1 2 3}; do
  for v in old new; do
    bin=${OLD:-/tmp/server-old}; [ $v = new ] && bin=${NEW:-./server}
    echo "$v workers=$1 access=$2 round $r: $(run $bin $1 $2 18$((RANDOM%900+100)))"
  done
done
