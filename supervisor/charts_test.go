package supervisor

import (
	"math"
	"testing"
	"time"
)

func TestQuantile(t *testing.T) {
	for _, tc := range []struct {
		buckets map[float64]float64
		want    float64
		ok      bool
	}{
		{map[float64]float64{0.1: 0, math.Inf(1): 0}, 0, false},
		{map[float64]float64{0.01: 100, 0.1: 100, math.Inf(1): 100}, 0.0099, true},
		{map[float64]float64{0.01: 0, 0.1: 100, math.Inf(1): 100}, 0.0991, true},
		{map[float64]float64{0.01: 50, 0.1: 50, math.Inf(1): 100}, 0.1, true},
	} {
		got, ok := quantile(tc.buckets, 0.99)
		if ok != tc.ok || math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("quantile(%v, 0.99) = %v, %v; want %v, %v", tc.buckets, got, ok, tc.want, tc.ok)
		}
	}
}

// TestChartsFromWorkerMetrics: rates and percentiles come from the
// increase since the last sample, per worker; a replaced worker counts
// from zero; gauges add up.
func TestChartsFromWorkerMetrics(t *testing.T) {
	c := newCharts([]Chart{
		{Title: "rate", Metric: "req_total", Kind: ChartRate},
		{Title: "p99", Metric: "dur_seconds", Kind: ChartP99},
		{Title: "sum", Metric: "chats", Kind: ChartSum},
	})
	text := func(req, fast, slow, chats string) []byte {
		return []byte("req_total{route=\"a\"} " + req + "\n" +
			"dur_seconds_bucket{route=\"a\",le=\"0.01\"} " + fast + "\n" +
			"dur_seconds_bucket{route=\"a\",le=\"1\"} " + slow + "\n" +
			"dur_seconds_bucket{route=\"a\",le=\"+Inf\"} " + slow + "\n" +
			"chats " + chats + "\n")
	}
	snap := func(pids [2]int, a, b []byte) snapshot {
		return snapshot{
			status:  &Status{Workers: []WorkerStatus{{Slot: 1, PID: pids[0], State: "ready"}, {Slot: 2, PID: pids[1], State: "ready"}}},
			workers: map[int][]byte{1: a, 2: b},
		}
	}
	t0 := time.Unix(1000, 0)
	c.add(t0, snap([2]int{10, 20}, text("100", "100", "100", "1"), text("50", "50", "50", "2")))
	// 5 s later: worker 1 served 50 more (all fast); slot 2's worker was
	// replaced by pid 21, which served 25, one of them slow.
	c.add(t0.Add(5*time.Second), snap([2]int{10, 21}, text("150", "150", "150", "0"), text("25", "24", "25", "3")))
	if len(c.times) != 2 {
		t.Fatalf("%d points, want 2", len(c.times))
	}
	first, second := c.values[0], c.values[1]
	if first[0] != nil || first[1] != nil || first[2] == nil || *first[2] != 3 {
		t.Errorf("first sample = rate %v, p99 %v, sum %v; want none, none, 3", first[0], first[1], first[2])
	}
	if second[0] == nil || *second[0] != 15 {
		t.Errorf("rate = %v, want (50+25)/5 = 15", second[0])
	}
	// 75 requests, 74 under 10 ms, 1 up to 1 s: the 99th percentile is
	// in the slow bucket.
	if second[1] == nil || *second[1] <= 10 || *second[1] > 1000 {
		t.Errorf("p99 = %v ms, want between 10 and 1000", second[1])
	}
	if second[2] == nil || *second[2] != 3 {
		t.Errorf("sum = %v, want 3", second[2])
	}
}
