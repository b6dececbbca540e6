package supervisor

import (
	"bufio"
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Chart is one small chart of the status page: a series computed from the
// workers' metrics text, sampled every ChartInterval over the last
// ChartWindow. The master keeps the samples, so a page opened now shows the
// last 15 minutes.
type Chart struct {
	// Title is shown above the chart, such as "requests / s".
	Title string `json:"title"`
	// Metric names a metric of the workers' metrics text.
	Metric string `json:"-"`
	// Kind says how samples become points: ChartRate, ChartP99 or
	// ChartSum.
	Kind string `json:"kind"`
}

// Kinds of Chart.
const (
	// ChartRate is a counter's increase per second, summed over workers.
	ChartRate = "rate"
	// ChartP99 is the 99th percentile, in milliseconds, of what a
	// histogram (seconds, Prometheus buckets) observed during the interval,
	// over every worker and label.
	ChartP99 = "p99"
	// ChartSum is a gauge summed over workers.
	ChartSum = "sum"
)

// ChartInterval is the time between two points of a chart, and ChartWindow
// how far back a chart goes.
const (
	ChartInterval = 5 * time.Second
	ChartWindow   = 15 * time.Minute
)

// charts holds the points of Config.Charts. The sampler goroutine writes
// them, the status page's requests read them.
type charts struct {
	defs []Chart

	mu     sync.Mutex
	times  []int64      // unix milliseconds, oldest first
	values [][]*float64 // values[i][c]: chart c at times[i]; nil = no value

	prev map[int]workerSample // by pid, the last sample of each worker
}

// workerSample is what a worker's metrics text said at one sample.
type workerSample struct {
	counters map[string]float64             // by metric name
	buckets  map[string]map[float64]float64 // by histogram name, then le
}

func newCharts(defs []Chart) *charts {
	return &charts{defs: defs, prev: map[int]workerSample{}}
}

// sampleCharts takes a sample every ChartInterval until done closes; the
// first one only sets the baselines of rates and percentiles.
func (s *Supervisor) sampleCharts(done <-chan struct{}) {
	t := time.NewTicker(ChartInterval)
	defer t.Stop()
	for {
		req := make(snapshotReq, 1)
		select {
		case s.snapshots <- req:
		case <-done:
			return
		}
		select {
		case snap := <-req:
			s.charts.add(time.Now(), snap)
		case <-done:
			return
		}
		select {
		case <-t.C:
		case <-done:
			return
		}
	}
}

// add turns one snapshot into one point of every chart.
func (c *charts) add(now time.Time, snap snapshot) {
	pids := map[int]int{} // slot -> pid of its ready worker
	for _, w := range snap.status.Workers {
		if w.State == "ready" {
			if _, ok := pids[w.Slot]; !ok {
				pids[w.Slot] = w.PID
			}
		}
	}
	cur := map[int]workerSample{}
	for slot, text := range snap.workers {
		if pid, ok := pids[slot]; ok {
			cur[pid] = c.parse(text)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	elapsed := ChartInterval.Seconds()
	if n := len(c.times); n > 0 {
		elapsed = float64(now.UnixMilli()-c.times[n-1]) / 1000
	}
	first := len(c.times) == 0
	vals := make([]*float64, len(c.defs))
	for i, d := range c.defs {
		switch d.Kind {
		case ChartSum:
			v := 0.0
			for _, ws := range cur {
				v += ws.counters[d.Metric]
			}
			vals[i] = &v
		case ChartRate:
			if first || elapsed <= 0 {
				continue
			}
			inc := 0.0
			for pid, ws := range cur {
				// A worker new since the last sample counts from zero; a
				// counter that went down was reset.
				before := c.prev[pid].counters[d.Metric]
				if now := ws.counters[d.Metric]; now >= before {
					inc += now - before
				} else {
					inc += now
				}
			}
			v := inc / elapsed
			vals[i] = &v
		case ChartP99:
			if first {
				continue
			}
			delta := map[float64]float64{}
			for pid, ws := range cur {
				before := c.prev[pid].buckets[d.Metric]
				for le, n := range ws.buckets[d.Metric] {
					if b := before[le]; n >= b {
						delta[le] += n - b
					} else {
						delta[le] += n
					}
				}
			}
			if v, ok := quantile(delta, 0.99); ok {
				ms := v * 1000
				vals[i] = &ms
			}
		}
	}
	c.prev = cur
	c.times = append(c.times, now.UnixMilli())
	c.values = append(c.values, vals)
	if keep := int(ChartWindow/ChartInterval) + 1; len(c.times) > keep {
		c.times = slices.Delete(c.times, 0, len(c.times)-keep)
		c.values = slices.Delete(c.values, 0, len(c.values)-keep)
	}
}

// parse reads the values the charts need from one worker's metrics text:
// the sum of every series of each counter or gauge, and each histogram's
// cumulative buckets summed over its series.
func (c *charts) parse(text []byte) workerSample {
	ws := workerSample{counters: map[string]float64{}, buckets: map[string]map[float64]float64{}}
	want := map[string]string{} // metric name in the text -> chart metric
	for _, d := range c.defs {
		if d.Kind == ChartP99 {
			want[d.Metric+"_bucket"] = d.Metric
		} else {
			want[d.Metric] = d.Metric
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(text))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		metric, ok := want[string(metricName(line))]
		if !ok {
			continue
		}
		sp := bytes.LastIndexByte(line, ' ')
		if sp < 0 {
			continue
		}
		v, err := strconv.ParseFloat(string(line[sp+1:]), 64)
		if err != nil {
			continue
		}
		if string(metricName(line)) == metric {
			ws.counters[metric] += v
			continue
		}
		le, ok := labelValue(line[:sp], "le")
		if !ok {
			continue
		}
		bound, err := strconv.ParseFloat(le, 64)
		if err != nil {
			continue
		}
		if ws.buckets[metric] == nil {
			ws.buckets[metric] = map[float64]float64{}
		}
		ws.buckets[metric][bound] += v
	}
	return ws
}

// labelValue returns the value of label name in a metric line's labels.
func labelValue(line []byte, name string) (string, bool) {
	key := []byte(name + `="`)
	for i := bytes.IndexByte(line, '{'); i >= 0 && i < len(line); {
		j := bytes.Index(line[i:], key)
		if j < 0 {
			return "", false
		}
		j += i
		if c := line[j-1]; c == '{' || c == ',' {
			rest := line[j+len(key):]
			if k := bytes.IndexByte(rest, '"'); k >= 0 {
				return string(rest[:k]), true
			}
			return "", false
		}
		i = j + len(key)
	}
	return "", false
}

// quantile estimates the q-quantile from cumulative bucket counts by
// upper bound, interpolating linearly within the bucket it falls in, as
// Prometheus's histogram_quantile does. It reports false when nothing was
// observed.
func quantile(buckets map[float64]float64, q float64) (float64, bool) {
	bounds := make([]float64, 0, len(buckets))
	for b := range buckets {
		bounds = append(bounds, b)
	}
	slices.Sort(bounds)
	if len(bounds) == 0 {
		return 0, false
	}
	total := buckets[bounds[len(bounds)-1]]
	if total <= 0 {
		return 0, false
	}
	target := q * total
	lower, below := 0.0, 0.0
	for _, b := range bounds {
		n := buckets[b]
		if n >= target {
			if math.IsInf(b, 1) {
				return lower, true
			}
			if n == below {
				return b, true
			}
			return lower + (b-lower)*(target-below)/(n-below), true
		}
		lower, below = b, n
	}
	return lower, true
}

// chartsJSON is the body of /charts.json.
type chartsJSON struct {
	IntervalS float64       `json:"interval_s"`
	WindowS   float64       `json:"window_s"`
	Charts    []chartSeries `json:"charts"`
}

type chartSeries struct {
	Chart
	// Points are [unix milliseconds, value or null], oldest first.
	Points [][2]any `json:"points"`
}

func (s *Supervisor) handleChartsJSON(w http.ResponseWriter, _ *http.Request) {
	out := chartsJSON{IntervalS: ChartInterval.Seconds(), WindowS: ChartWindow.Seconds(), Charts: []chartSeries{}}
	if c := s.charts; c != nil {
		c.mu.Lock()
		for i, d := range c.defs {
			cs := chartSeries{Chart: d, Points: make([][2]any, 0, len(c.times))}
			for j, t := range c.times {
				var v any
				if p := c.values[j][i]; p != nil {
					v = math.Round(*p*1000) / 1000
				}
				cs.Points = append(cs.Points, [2]any{t, v})
			}
			out.Charts = append(out.Charts, cs)
		}
		c.mu.Unlock()
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}
