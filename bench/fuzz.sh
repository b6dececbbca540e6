#!/bin/sh
# Runs every Go fuzz target in the module (every "func FuzzXxx" in a
# _test.go file) for a bounded time each: FUZZTIME, default 20s. A new
# failing input is written to the package's testdata/fuzz/<Name>/ and then
# fails `go test` until fixed; the committed seeds already run in
# `make test`.
set -eu
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-20s}
grep -rl --include='*_test.go' '^func Fuzz' cmd handlers supervisor worker 2>/dev/null | sort | while read -r file; do
	pkg=./$(dirname "$file")
	grep '^func Fuzz' "$file" | sed 's/^func \(Fuzz[A-Za-z0-9_]*\).*/\1/' | while read -r name; do
		echo "== $pkg $name ($FUZZTIME)"
		go test -run '^$' -fuzz "^$name\$" -fuzztime "$FUZZTIME" "$pkg"
	done
done
