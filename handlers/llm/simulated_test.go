package llm

import (
	"context"
	"errors"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestSimulatedDeterministic(t *testing.T) {
	s := NewSimulated(SimulatedConfig{})
	req := Request{Messages: []Message{
		{Role: "system", Content: "You are terse."},
		{Role: "user", Content: "first question"},
		{Role: "assistant", Content: "first answer"},
		{Role: "user", Content: "  What  is\tthe weather   today? "},
	}}
	var a, b collector
	ra, err := s.Complete(context.Background(), req, a.add)
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	rb, err := s.Complete(context.Background(), req, b.add)
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	if ra != rb || strings.Join(a.deltas, "|") != strings.Join(b.deltas, "|") {
		t.Errorf("same request gave %+v then %+v, want identical replies and deltas", ra, rb)
	}
	if joinDeltas(a.deltas) != ra.Text {
		t.Errorf("deltas concatenate to %q, want Text %q", joinDeltas(a.deltas), ra.Text)
	}
	if !strings.Contains(ra.Text, `"What is the weather today?"`) || !strings.Contains(ra.Text, "simulated") {
		t.Errorf("Text = %q, want it labelled simulated and quoting the last user message", ra.Text)
	}
	want := Usage{PromptTokens: 3 + 2 + 2 + 5, CompletionTokens: len(a.deltas)}
	if ra.Provider != "simulated" || ra.Model != DefaultSimulatedModel || ra.Usage != want {
		t.Errorf("Complete = %+v, want provider simulated, model %s, usage %+v", ra, DefaultSimulatedModel, want)
	}
	if other, _ := s.Complete(context.Background(), Request{Messages: []Message{{Role: "user", Content: "hi"}}}, nil); other.Text == ra.Text {
		t.Errorf("different requests both got %q, want replies derived from the request", ra.Text)
	}
}

func TestSimulatedReplyShape(t *testing.T) {
	long := strings.Repeat("word ", 1000)
	for _, tc := range []struct {
		name, model string
		msgs        []Message
		want        string
	}{
		{"no messages", "", nil, "You sent no user message."},
		{"long message is cut", "", []Message{{Role: "user", Content: long}}, "You wrote 1000 words: \"" + strings.TrimSpace(strings.Repeat("word ", echoWords)) + " ...\"."},
		{"requested model", "my-model", []Message{{Role: "user", Content: "x"}}, "reply from my-model;"},
	} {
		resp, err := NewSimulated(SimulatedConfig{Model: "cfg-model"}).Complete(context.Background(), Request{Model: tc.model, Messages: tc.msgs}, nil)
		if err != nil || !strings.Contains(resp.Text, tc.want) {
			t.Errorf("%s: Complete = %q, %v, want text containing %q", tc.name, resp.Text, err, tc.want)
		}
		if len(resp.Text) > 512 {
			t.Errorf("%s: len(Text) = %d, want a bounded reply", tc.name, len(resp.Text))
		}
	}
}

func TestSimulatedLatencySpread(t *testing.T) {
	const latency = 200 * time.Millisecond
	var at []time.Duration
	start := time.Now()
	resp, err := NewSimulated(SimulatedConfig{Latency: latency}).Complete(context.Background(), testReq, func(string) error {
		at = append(at, time.Since(start))
		return nil
	})
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	if el := time.Since(start); el < latency {
		t.Errorf("Complete took %s, want >= Latency %s", el, latency)
	}
	// Evenly spread: the first delta waits a share of the latency, not all of it or none.
	if n := resp.Usage.CompletionTokens; len(at) != n || at[0] < latency/time.Duration(n) {
		t.Errorf("first of %d deltas at %s, want >= %s", len(at), at[0], latency/time.Duration(n))
	}
}

func TestSimulatedZeroLatencyImmediate(t *testing.T) {
	var got collector
	start := time.Now()
	resp, err := NewSimulated(SimulatedConfig{}).Complete(context.Background(), testReq, got.add)
	if err != nil || joinDeltas(got.deltas) != resp.Text || len(got.deltas) < 2 {
		t.Fatalf("Complete = %q, %v, deltas %q, want word deltas concatenating to Text", resp.Text, err, got.deltas)
	}
	if el := time.Since(start); el > time.Second {
		t.Errorf("Complete with Latency 0 took %s, want immediate", el)
	}
}

func TestSimulatedCancel(t *testing.T) {
	checkGoroutines(t)
	const latency = time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := NewSimulated(SimulatedConfig{Latency: latency})
	done := make(chan error, 1)
	go func() {
		_, err := s.Complete(ctx, testReq, nil)
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Complete error = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Complete still running 5s after cancel, want prompt return")
	}

	if _, err := s.Complete(ctx, testReq, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Complete on a cancelled ctx error = %v, want context.Canceled", err)
	}
	expired, cancel2 := context.WithTimeout(context.Background(), 0)
	defer cancel2()
	if _, err := s.Complete(expired, testReq, nil); !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Complete on an expired ctx error = %v, want ErrTimeout and DeadlineExceeded", err)
	}
}

func TestSimulatedOnDeltaErrorAbandons(t *testing.T) {
	errStop := errors.New("stop")
	n := 0
	_, err := NewSimulated(SimulatedConfig{}).Complete(context.Background(), testReq, func(string) error {
		n++
		return errStop
	})
	if !errors.Is(err, errStop) || n != 1 {
		t.Errorf("Complete error = %v after %d deltas, want errStop after 1", err, n)
	}
}

func TestNextDeltaConcatenates(t *testing.T) {
	for _, s := range []string{"", "a", " a", "a ", "a  b\tc\n", "héllo wörld", "\u00a0x\u2003y"} {
		var parts []string
		for rest := s; rest != ""; {
			var d string
			d, rest = nextDelta(rest)
			parts = append(parts, d)
		}
		want := countWords(s)
		if want == 0 && s != "" {
			want = 1 // all whitespace: one delta
		}
		if joinDeltas(parts) != s || len(parts) != want {
			t.Errorf("nextDelta(%q) parts %q, want %d parts concatenating to the input", s, parts, want)
		}
	}
}

// TestSimulatedMemoryPerCall measures what one in-flight simulated call
// costs, goroutine included, with 10,000 concurrent calls. Set
// LLM_MEMTEST_CALLS and LLM_MEMTEST_LATENCY to change the load.
func TestSimulatedMemoryPerCall(t *testing.T) {
	if raceEnabled || testing.Short() {
		t.Skip("needs 10,000 goroutines without the race detector")
	}
	calls, latency := 10000, 2*time.Second
	if v, err := strconv.Atoi(os.Getenv("LLM_MEMTEST_CALLS")); err == nil && v > 0 {
		calls = v
	}
	if v, err := time.ParseDuration(os.Getenv("LLM_MEMTEST_LATENCY")); err == nil && v > 0 {
		latency = v
	}
	s := NewSimulated(SimulatedConfig{Latency: latency})
	req := Request{Messages: []Message{{Role: "system", Content: "You are an agent."}, {Role: "user", Content: "Summarise the quarterly report for me, please."}}}

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	rssBefore := rss(t)

	var started atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, calls)
	for range calls {
		wg.Go(func() {
			first := true
			_, err := s.Complete(context.Background(), req, func(string) error {
				if first {
					first = false
					started.Add(1)
				}
				return nil
			})
			if err != nil {
				errs <- err
			}
		})
	}
	// Measure once every call has delivered a delta and is waiting on its timer.
	waitFor(t, latency/2, func() error {
		if n := started.Load(); int(n) < calls {
			return errors.New(strconv.Itoa(int(n)) + " calls started streaming, want all")
		}
		return nil
	})
	runtime.GC()
	var during runtime.MemStats
	runtime.ReadMemStats(&during)
	rssDuring := rss(t)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Complete: %v", err)
	}

	heap := int64(during.HeapInuse) - int64(before.HeapInuse)
	stack := int64(during.StackInuse) - int64(before.StackInuse)
	perCall := (heap + stack) / int64(calls)
	t.Logf("%d concurrent calls, latency %s: heap %d B/call, stacks %d B/call, total %d B/call; RSS growth %d B/call",
		calls, latency, heap/int64(calls), stack/int64(calls), perCall, (rssDuring-rssBefore)/int64(calls))
	if perCall > 40<<10 {
		t.Errorf("memory per in-flight call = %d B, want well under 40 KiB", perCall)
	}
}

// rss returns the resident set size from /proc, or 0 where there is none.
func rss(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}
