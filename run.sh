#!/usr/bin/env bash
# The unified runner. With no environment it is development mode (RELOAD=true,
# one worker); RELOAD=false WORKERS=4 ./run.sh is production. It builds the
# server when needed and execs it; every decision beyond that is the server's.
set -euo pipefail
cd "$(dirname "$0")"
export RELOAD="${RELOAD:-true}"
if [ ! -x ./server ] || [ -n "$(find cmd supervisor worker handlers go.mod go.sum -newer ./server -print -quit 2>/dev/null)" ]; then
  make --no-print-directory build >&2
fi
exec ./server "$@"
