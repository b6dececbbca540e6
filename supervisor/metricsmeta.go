package supervisor

import (
	"bytes"
	"strings"
)

// family is the metadata of one metric family: its # TYPE and # HELP.
type family struct{ typ, help string }

// ownFamilies are the families the supervisor writes itself, and the Go
// runtime and process families of VictoriaMetrics/metrics that every
// process (master and workers) writes. A worker describes its own
// application families with # HELP and # TYPE lines in its text; these
// fill in what the library leaves out (it writes no help text, and types
// the process_io_* counters as gauges).
var ownFamilies = map[string]family{
	"corral_build_info":                {"gauge", "Always 1; labels name the server's version and the Go version that built it."},
	"corral_supervisor_uptime_seconds": {"gauge", "Seconds since the master started."},
	"corral_workers":                   {"gauge", "Worker processes by state."},
	"corral_worker_restarts_total":     {"counter", "Workers restarted or replaced, by reason."},

	"go_cgo_calls_total":                  {"counter", "Calls from Go to C."},
	"go_cpus":                             {"gauge", "Logical CPUs usable by the process."},
	"go_gc_cpu_seconds_total":             {"counter", "CPU time spent in the garbage collector."},
	"go_gc_duration_seconds":              {"summary", "Stop-the-world pauses of the garbage collector."},
	"go_gc_forced_total":                  {"counter", "Garbage collections forced by the application."},
	"go_gc_mark_assist_cpu_seconds_total": {"counter", "CPU time goroutines spent helping the garbage collector mark."},
	"go_gc_pauses_seconds":                {"histogram", "Stop-the-world pauses of the garbage collector."},
	"go_gomaxprocs":                       {"gauge", "GOMAXPROCS: OS threads that may run Go code at once."},
	"go_goroutines":                       {"gauge", "Goroutines that exist."},
	"go_info":                             {"gauge", "Always 1; the version label names the Go version."},
	"go_info_ext":                         {"gauge", "Always 1; labels name the compiler, GOARCH and GOOS."},
	"go_memlimit_bytes":                   {"gauge", "The Go runtime's soft memory limit (GOMEMLIMIT)."},
	"go_memstats_alloc_bytes":             {"gauge", "Bytes of allocated heap objects."},
	"go_memstats_alloc_bytes_total":       {"counter", "Bytes allocated for heap objects, freed or not."},
	"go_memstats_buck_hash_sys_bytes":     {"gauge", "Bytes of memory in profiling bucket hash tables."},
	"go_memstats_frees_total":             {"counter", "Heap objects freed."},
	"go_memstats_gc_cpu_fraction":         {"gauge", "Fraction of the CPU time used by the garbage collector since the process started."},
	"go_memstats_gc_sys_bytes":            {"gauge", "Bytes of memory in garbage collection metadata."},
	"go_memstats_heap_alloc_bytes":        {"gauge", "Bytes of allocated heap objects."},
	"go_memstats_heap_idle_bytes":         {"gauge", "Bytes in idle heap spans."},
	"go_memstats_heap_inuse_bytes":        {"gauge", "Bytes in in-use heap spans."},
	"go_memstats_heap_objects":            {"gauge", "Allocated heap objects."},
	"go_memstats_heap_released_bytes":     {"gauge", "Bytes of heap memory returned to the operating system."},
	"go_memstats_heap_sys_bytes":          {"gauge", "Bytes of heap memory obtained from the operating system."},
	"go_memstats_last_gc_time_seconds":    {"gauge", "Time of the last garbage collection, in seconds since the Unix epoch."},
	"go_memstats_lookups_total":           {"counter", "Pointer lookups performed by the runtime."},
	"go_memstats_mallocs_total":           {"counter", "Heap objects allocated."},
	"go_memstats_mcache_inuse_bytes":      {"gauge", "Bytes of allocated mcache structures."},
	"go_memstats_mcache_sys_bytes":        {"gauge", "Bytes of memory obtained from the operating system for mcache structures."},
	"go_memstats_mspan_inuse_bytes":       {"gauge", "Bytes of allocated mspan structures."},
	"go_memstats_mspan_sys_bytes":         {"gauge", "Bytes of memory obtained from the operating system for mspan structures."},
	"go_memstats_next_gc_bytes":           {"gauge", "Heap size at which the next garbage collection starts."},
	"go_memstats_other_sys_bytes":         {"gauge", "Bytes of memory in other runtime allocations."},
	"go_memstats_stack_inuse_bytes":       {"gauge", "Bytes in stack spans."},
	"go_memstats_stack_sys_bytes":         {"gauge", "Bytes of stack memory obtained from the operating system."},
	"go_memstats_sys_bytes":               {"gauge", "Bytes of memory obtained from the operating system."},
	"go_mutex_wait_seconds_total":         {"counter", "Time goroutines spent blocked on a mutex."},
	"go_scavenge_cpu_seconds_total":       {"counter", "CPU time spent returning memory to the operating system."},
	"go_sched_latencies_seconds":          {"histogram", "Time goroutines waited to run after becoming runnable."},
	"go_threads":                          {"gauge", "OS threads created by the runtime."},

	"process_cgroup_cpu_throttled_seconds_total":    {"counter", "Time the process's cgroup was throttled by its CPU limit."},
	"process_cpu_seconds_system_total":              {"counter", "CPU time spent in the kernel."},
	"process_cpu_seconds_total":                     {"counter", "CPU time spent, user and kernel."},
	"process_cpu_seconds_user_total":                {"counter", "CPU time spent in user space."},
	"process_io_read_bytes_total":                   {"counter", "Bytes read, from storage or not."},
	"process_io_read_syscalls_total":                {"counter", "Read system calls."},
	"process_io_storage_read_bytes_total":           {"counter", "Bytes read from storage."},
	"process_io_storage_written_bytes_total":        {"counter", "Bytes written to storage."},
	"process_io_write_syscalls_total":               {"counter", "Write system calls."},
	"process_io_written_bytes_total":                {"counter", "Bytes written, to storage or not."},
	"process_major_pagefaults_total":                {"counter", "Page faults that needed a read from storage."},
	"process_max_fds":                               {"gauge", "Most open file descriptors allowed."},
	"process_minor_pagefaults_total":                {"counter", "Page faults served from memory."},
	"process_num_threads":                           {"gauge", "OS threads of the process."},
	"process_open_fds":                              {"gauge", "Open file descriptors."},
	"process_pressure_cpu_stalled_seconds_total":    {"counter", "Time all tasks of the cgroup were stalled on CPU (PSI)."},
	"process_pressure_cpu_waiting_seconds_total":    {"counter", "Time some task of the cgroup waited for CPU (PSI)."},
	"process_pressure_io_stalled_seconds_total":     {"counter", "Time all tasks of the cgroup were stalled on I/O (PSI)."},
	"process_pressure_io_waiting_seconds_total":     {"counter", "Time some task of the cgroup waited for I/O (PSI)."},
	"process_pressure_memory_stalled_seconds_total": {"counter", "Time all tasks of the cgroup were stalled on memory (PSI)."},
	"process_pressure_memory_waiting_seconds_total": {"counter", "Time some task of the cgroup waited for memory (PSI)."},
	"process_resident_memory_anon_bytes":            {"gauge", "Resident anonymous memory."},
	"process_resident_memory_bytes":                 {"gauge", "Resident memory (RSS)."},
	"process_resident_memory_file_bytes":            {"gauge", "Resident memory backed by files."},
	"process_resident_memory_peak_bytes":            {"gauge", "Highest resident memory so far."},
	"process_resident_memory_shared_bytes":          {"gauge", "Resident shared memory."},
	"process_start_time_seconds":                    {"gauge", "Start time of the process, in seconds since the Unix epoch."},
	"process_virtual_memory_bytes":                  {"gauge", "Virtual memory size."},
	"process_virtual_memory_peak_bytes":             {"gauge", "Highest virtual memory size so far."},
}

// renamed are the library's names that break Prometheus's conventions (a
// counter without _total, a gauge ending in _count), and the names
// written instead.
var renamed = map[string]string{
	"go_cgo_calls_count": "go_cgo_calls_total",
	"go_gc_forced_count": "go_gc_forced_total",
	"go_cpu_count":       "go_cpus",
}

// exposition collects samples and metadata from several texts and writes
// them grouped by family, each family once with one # HELP and one # TYPE
// line, as the Prometheus text format requires.
type exposition struct {
	meta    map[string]family   // family -> type and help
	samples map[string][][]byte // family -> sample lines, in arrival order
}

func newExposition() *exposition {
	return &exposition{meta: map[string]family{}, samples: map[string][][]byte{}}
}

// add takes one text in the Prometheus format, adding label to each of
// its samples. Its # HELP and # TYPE lines describe families not yet
// described.
func (e *exposition) add(text, label []byte) {
	for _, line := range bytes.Split(text, []byte("\n")) {
		switch {
		case len(line) == 0:
		case bytes.HasPrefix(line, []byte("# HELP ")), bytes.HasPrefix(line, []byte("# TYPE ")):
			name, rest, _ := strings.Cut(string(line[len("# HELP "):]), " ")
			f := e.meta[name]
			if line[2] == 'H' && f.help == "" {
				f.help = rest
			} else if line[2] == 'T' && f.typ == "" {
				f.typ = rest
			}
			e.meta[name] = f
		case line[0] == '#':
		default:
			if label != nil {
				line = withLabel(line, label)
			}
			name := string(metricName(line))
			if to, ok := renamed[name]; ok {
				line = append([]byte(to), line[len(name):]...)
				name = to
			}
			fam := e.familyOf(name)
			e.samples[fam] = append(e.samples[fam], line)
		}
	}
}

// familyOf returns the family of a sample name: the name itself, or for a
// histogram's or summary's _bucket, _sum and _count series the name
// without the suffix.
func (e *exposition) familyOf(name string) string {
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok {
			continue
		}
		typ := e.meta[base].typ
		if typ == "" {
			typ = ownFamilies[base].typ
		}
		if typ == "histogram" || typ == "summary" {
			return base
		}
	}
	return name
}

// write writes every family in name order: # HELP, # TYPE, then its
// samples in the order they were added. The supervisor's table wins over
// what a text said of the families it knows; a family nobody described
// is untyped, with its name as help.
func (e *exposition) write(b *bytes.Buffer) {
	for _, name := range sortedKeys(e.samples) {
		f, known := ownFamilies[name]
		if !known {
			f = e.meta[name]
		}
		if f.typ == "" {
			f.typ = "untyped"
		}
		if f.help == "" {
			f.help = name
		}
		b.WriteString("# HELP " + name + " " + f.help + "\n")
		b.WriteString("# TYPE " + name + " " + f.typ + "\n")
		for _, l := range e.samples[name] {
			b.Write(l)
			b.WriteByte('\n')
		}
	}
}
