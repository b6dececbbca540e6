package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// wrkResult is what one wrk run printed.
type wrkResult struct {
	RPS                                 float64
	Requests                            int
	P50, P99                            time.Duration
	Connect, Read, Write, Timeout, Non2 int
	Raw                                 string
}

// Errors is the sum of every error wrk counts.
func (w wrkResult) Errors() int { return w.Connect + w.Read + w.Write + w.Timeout + w.Non2 }

var (
	reRPS      = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	reRequests = regexp.MustCompile(`(\d+) requests in`)
	reSocket   = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	reNon2     = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	reLatency  = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$`)
)

// runWrk runs wrk against url, parses its report and writes the raw output
// to rawPath. It runs wrk once more when wrk's first connection (its
// address check, before any load) is refused, and then appends a note to
// retried if it is not nil: refused there means no load was sent at all, so
// the second attempt measures the same thing.
func runWrk(threads, conns int, dur time.Duration, url, rawPath string, retried *[]string) (wrkResult, error) {
	w, err := runWrkOnce(threads, conns, dur, url, rawPath)
	if err != nil && strings.Contains(w.Raw, "unable to connect") {
		if retried != nil {
			*retried = append(*retried, time.Now().UTC().Format("15:04:05")+" "+url+": "+strings.TrimSpace(lastLine(w.Raw)))
		}
		time.Sleep(200 * time.Millisecond)
		w, err = runWrkOnce(threads, conns, dur, url, rawPath)
	}
	return w, err
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndexByte(s, '\n')+1:]
}

func runWrkOnce(threads, conns int, dur time.Duration, url, rawPath string) (wrkResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), dur+30*time.Second)
	defer cancel()
	args := []string{"-t" + strconv.Itoa(threads), "-c" + strconv.Itoa(conns),
		"-d" + strconv.Itoa(int(dur.Seconds())) + "s", "--latency", url}
	out, err := exec.CommandContext(ctx, "wrk", args...).CombinedOutput()
	text := "$ wrk " + strings.Join(args, " ") + "\n" + string(out)
	if rawPath != "" {
		os.WriteFile(rawPath, []byte(text), 0o644)
	}
	if err != nil {
		return wrkResult{Raw: text}, fmt.Errorf("wrk: %w: %s", err, out)
	}
	return parseWrk(text)
}

func parseWrk(text string) (wrkResult, error) {
	r := wrkResult{Raw: text}
	m := reRPS.FindStringSubmatch(text)
	if m == nil {
		return r, fmt.Errorf("wrk: no Requests/sec in %q", text)
	}
	r.RPS, _ = strconv.ParseFloat(m[1], 64)
	if m := reRequests.FindStringSubmatch(text); m != nil {
		r.Requests, _ = strconv.Atoi(m[1])
	}
	if m := reSocket.FindStringSubmatch(text); m != nil {
		r.Connect, _ = strconv.Atoi(m[1])
		r.Read, _ = strconv.Atoi(m[2])
		r.Write, _ = strconv.Atoi(m[3])
		r.Timeout, _ = strconv.Atoi(m[4])
	}
	if m := reNon2.FindStringSubmatch(text); m != nil {
		r.Non2, _ = strconv.Atoi(m[1])
	}
	for _, m := range reLatency.FindAllStringSubmatch(text, -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[m[3]]
		d := time.Duration(v * float64(unit))
		if m[1] == "50" {
			r.P50 = d
		} else {
			r.P99 = d
		}
	}
	return r, nil
}

// wrkVersion returns wrk's first line of -v output, e.g. "wrk 4.1.0 [epoll] ...".
func wrkVersion() string {
	out, _ := exec.Command("wrk", "-v").CombinedOutput()
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}
