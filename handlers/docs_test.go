package handlers

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// readAPIDoc returns docs/api.md, the API contract the tests below hold
// the code to.
func readAPIDoc(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../docs/api.md")
	if err != nil {
		t.Fatalf("read the API documentation: %v", err)
	}
	return string(b)
}

// TestErrorCodesDocumented: every status the API answers with its own code
// has a row in the error table of docs/api.md.
func TestErrorCodesDocumented(t *testing.T) {
	doc := readAPIDoc(t)
	for status, code := range codes {
		if row := fmt.Sprintf("| %d | `%s` |", status, code); !strings.Contains(doc, row) {
			t.Errorf("docs/api.md has no error table row %q", row)
		}
	}
}

// TestActivityTypesDocumented: the activity type table of docs/api.md lists
// activityTypes, the list type= is checked against, in the same order.
func TestActivityTypesDocumented(t *testing.T) {
	doc := readAPIDoc(t)
	_, table, ok := strings.Cut(doc, "| `type` | `data` |")
	if !ok {
		t.Fatalf("docs/api.md has no activity type table (header | `type` | `data` |)")
	}
	table, _, _ = strings.Cut(table, "\n\n")
	var documented []string
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z.]+)` \\|").FindAllStringSubmatch(table, -1) {
		documented = append(documented, m[1])
	}
	if !slices.Equal(documented, activityTypes) {
		t.Errorf("docs/api.md activity types = %q, want activityTypes %q", documented, activityTypes)
	}
}
