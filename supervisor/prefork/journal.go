package prefork

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/rs/zerolog"
)

// journalStream reports whether w is the stream systemd connected to the
// journal: JOURNAL_STREAM ("DEVICE:INODE", set by systemd for a service
// whose output goes to the journal) names w's file. Checking the file, as
// systemd asks, keeps a service that sends its output elsewhere itself
// from getting priority prefixes there.
func journalStream(w io.Writer, journal string) bool {
	f, ok := w.(*os.File)
	if !ok || journal == "" {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return journal == strconv.FormatUint(uint64(st.Dev), 10)+":"+strconv.FormatUint(st.Ino, 10)
}

// journalWriter starts every log line with its syslog priority, "<3>" for
// an error, which journald takes off the line and records as the entry's
// priority, so that journalctl -p err and -p warning select by level.
type journalWriter struct {
	out    io.Writer // the journal's stream
	mu     sync.Mutex
	line   bytes.Buffer
	format io.Writer // writes one event's text into line
}

// newJournalWriter returns a journalWriter onto out; console, if set,
// formats the events (zerolog.ConsoleWriter) and gets the line as Out.
func newJournalWriter(out io.Writer, console *zerolog.ConsoleWriter) *journalWriter {
	j := &journalWriter{out: out}
	j.format = &j.line
	if console != nil {
		console.Out = &j.line
		j.format = console
	}
	return j
}

// priorities maps zerolog's levels to syslog's (RFC 5424 numbers).
var priorities = map[zerolog.Level]string{
	zerolog.TraceLevel: "<7>",
	zerolog.DebugLevel: "<7>",
	zerolog.InfoLevel:  "<6>",
	zerolog.WarnLevel:  "<4>",
	zerolog.ErrorLevel: "<3>",
	zerolog.FatalLevel: "<2>",
	zerolog.PanicLevel: "<0>",
	zerolog.NoLevel:    "<6>",
}

func (j *journalWriter) Write(p []byte) (int, error) {
	return j.WriteLevel(zerolog.NoLevel, p)
}

// WriteLevel writes the priority and the line in one write, so that the
// lines of the processes sharing the stream never interleave.
func (j *journalWriter) WriteLevel(l zerolog.Level, p []byte) (int, error) {
	prio, ok := priorities[l]
	if !ok {
		prio = "<6>"
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.line.Reset()
	j.line.WriteString(prio)
	if _, err := j.format.Write(p); err != nil {
		return 0, err
	}
	if _, err := j.out.Write(j.line.Bytes()); err != nil {
		return 0, fmt.Errorf("journal: %w", err)
	}
	return len(p), nil
}

// errorLines writes plain text onto the journal's stream with the error
// priority at the start of every line: the messages a program prints
// before its logger exists (a bad flag, an unreadable env file) are errors,
// and journalctl -p err must show them as the log lines' errors are shown.
type errorLines struct{ out io.Writer }

func (e errorLines) Write(p []byte) (int, error) {
	var b bytes.Buffer
	for _, line := range bytes.SplitAfter(p, []byte("\n")) {
		if len(line) > 0 {
			b.WriteString(priorities[zerolog.ErrorLevel])
			b.Write(line)
		}
	}
	if _, err := e.out.Write(b.Bytes()); err != nil {
		return 0, err
	}
	return len(p), nil
}
