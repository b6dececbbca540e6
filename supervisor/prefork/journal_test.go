package prefork

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"
)

func TestJournalWriterPriorities(t *testing.T) {
	for _, console := range []bool{false, true} {
		var out bytes.Buffer
		var cw *zerolog.ConsoleWriter
		if console {
			cw = &zerolog.ConsoleWriter{NoColor: true}
		}
		log := zerolog.New(newJournalWriter(&out, cw)).Level(zerolog.TraceLevel)
		log.Debug().Msg("d")
		log.Info().Msg("i")
		log.Warn().Msg("w")
		log.Error().Msg("e")
		log.Log().Msg("n")
		lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
		want := []struct{ prio, msg string }{{"<7>", "d"}, {"<6>", "i"}, {"<4>", "w"}, {"<3>", "e"}, {"<6>", "n"}}
		if len(lines) != len(want) {
			t.Fatalf("console %v: %d lines, want %d:\n%s", console, len(lines), len(want), out.String())
		}
		for i, w := range want {
			if !strings.HasPrefix(lines[i], w.prio) || !strings.Contains(lines[i], w.msg) || strings.Count(lines[i], w.prio) != 1 {
				t.Errorf("console %v: line %q, want it to start with %s and hold %q", console, lines[i], w.prio, w.msg)
			}
		}
	}
}

func TestJournalStream(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stream")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &st)
	id := fmt.Sprintf("%d:%d", st.Dev, st.Ino)
	if !journalStream(f, id) {
		t.Errorf("journalStream(file, its own %s) = false, want true", id)
	}
	if journalStream(f, fmt.Sprintf("%d:%d", st.Dev, st.Ino+1)) || journalStream(f, "") || journalStream(&bytes.Buffer{}, id) {
		t.Error("journalStream = true for another stream, no JOURNAL_STREAM or a non-file, want false")
	}
}

// TestConsoleAccessLogOrder checks that the console format prints an
// access log line's fields in uvicorn's order: client, method, path,
// query, HTTP version, status.
func TestConsoleAccessLogOrder(t *testing.T) {
	var out bytes.Buffer
	cfg := DefaultConfig()
	cfg.LogFormat = "console"
	log := NewLogger(cfg, &out)
	log.Info().Str("request_id", "r1").Int("status", 200).Str("http_version", "1.1").Str("query", "a=1").
		Str("path", "/x").Str("method", "GET").Str("remote", "10.0.0.1").Str("user_agent", "ua").Msg("request")
	line := out.String()
	last := -1
	for _, f := range []string{"remote=", "method=", "path=", "query=", "http_version=", "status=", "user_agent=", "request_id="} {
		i := strings.Index(line, f)
		if i < 0 || i < last {
			t.Fatalf("console line %q: %s out of uvicorn's order", line, f)
		}
		last = i
	}
}
