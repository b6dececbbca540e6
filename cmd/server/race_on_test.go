//go:build race

package main

// raceEnabled reports whether the tests run with the race detector, which
// the reliability reports state next to their figures.
const raceEnabled = true
