package main

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// exitTable reads the table of exit statuses in docs/architecture.md: each
// status with the text of its row.
func exitTable(t *testing.T) map[int]string {
	t.Helper()
	b, err := os.ReadFile("../../docs/architecture.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "\n## Exit statuses\n")
	if !ok {
		t.Fatal("docs/architecture.md has no section \"Exit statuses\"")
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	rows := map[int]string{}
	for _, line := range strings.Split(sec, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 {
			continue
		}
		code, err := strconv.Atoi(strings.TrimSpace(cells[1]))
		if err != nil {
			continue
		}
		rows[code] = strings.Join(cells[2:], "|")
	}
	return rows
}

// documentedExit returns the status whose row of the table of exit
// statuses (docs/architecture.md) mentions what. The process tests expect
// the status it returns, so the table and the code's exit paths agree.
func documentedExit(t *testing.T, what string) int {
	t.Helper()
	found := -1
	for code, row := range exitTable(t) {
		if strings.Contains(row, what) {
			if found >= 0 {
				t.Fatalf("%q is in the rows of exit statuses %d and %d", what, found, code)
			}
			found = code
		}
	}
	if found < 0 {
		t.Fatalf("no row of the exit statuses in docs/architecture.md mentions %q", what)
	}
	return found
}

// TestExitStatusTable: the table lists exactly the statuses the program
// uses, and each constant's meaning is the one its row gives.
func TestExitStatusTable(t *testing.T) {
	t.Parallel()
	rows := exitTable(t)
	if len(rows) != 4 {
		t.Errorf("exit statuses documented: %v, want 0, 1, 2 and 3", rows)
	}
	for _, tc := range []struct {
		what string
		code int
	}{
		{"orderly or forced shutdown", exitOK},
		{"`--help`", exitOK},
		{"address is in use", exitError},
		{"control command that found no server", exitError},
		{"a bad flag", exitUsage},
		{"the store cannot be opened", exitBootError},
		{"instance id is in use", exitBootError},
		{"a worker of the first generation", exitBootError},
	} {
		if got := documentedExit(t, tc.what); got != tc.code {
			t.Errorf("docs/architecture.md gives %d for %q, the code %d", got, tc.what, tc.code)
		}
	}
}
