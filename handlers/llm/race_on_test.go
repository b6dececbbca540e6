//go:build race

package llm

// raceEnabled reports whether the race detector is on: it caps live
// goroutines at 8128 and inflates memory, so the memory test skips.
const raceEnabled = true
