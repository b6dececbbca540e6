#!/bin/bash
# tls.sh: HTTP against HTTPS on GET /health, one build (BIN, default
# ./server), WORKERS=2, access log off: wrk -t2 -c50 -d8s on keep-alive
# connections (throughput) and with Connection: close (a new connection,
# so a new TLS handshake, per request). Three rounds, alternating. The
# certificate is a fresh self-signed ECDSA P-256 one.
set -u
BIN=$(realpath "${BIN:-./server}")
cd "$(mktemp -d)" || exit 1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out cert.pem \
  -days 2 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null
run() { # tls(0/1) close(0/1) port
  d=$(mktemp -d)
  extra=(); scheme=http
  if [ "$1" = 1 ]; then extra=(SSL_CERTFILE=$PWD/cert.pem SSL_KEYFILE=$PWD/key.pem); scheme=https; fi
  env WORKERS=2 ACCESS_LOG=false PORT=$3 HOST=127.0.0.1 LOG_FORMAT=json DATABASE_URL=sqlite:$d/s.db CONTROL_SOCKET=$d/c.sock "${extra[@]}" "$BIN" >/dev/null 2>$d/log &
  pid=$!
  for i in $(seq 100); do curl -sk -o /dev/null $scheme://127.0.0.1:$3/health && break; sleep 0.1; done
  hdr=(); [ "$2" = 1 ] && hdr=(-H "Connection: close")
  wrk -t2 -c50 -d8s "${hdr[@]}" $scheme://127.0.0.1:$3/health 2>/dev/null | awk '/Requests\/sec/ {print $2}'
  kill -TERM $pid; wait $pid 2>/dev/null; rm -rf $d
}
for r in 1 2 3; do
  echo "round $r keep-alive: http $(run 0 0 18$((RANDOM%900+100))) https $(run 1 0 18$((RANDOM%900+100)))"
  echo "round $r new-conn:   http $(run 0 1 18$((RANDOM%900+100))) https $(run 1 1 18$((RANDOM%900+100)))"
done
