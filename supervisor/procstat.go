package supervisor

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"
)

// procUsage is what /proc says of a worker process.
type procUsage struct {
	RSS     uint64        // resident memory, bytes
	CPU     time.Duration // user + system time since start
	FDs     int           // open file descriptors
	Threads int
}

// clockTick is the kernel's USER_HZ, the unit of CPU times in /proc; 100
// on every Linux architecture Go supports.
const clockTick = 100

// readUsage reads pid's usage from /proc; zero fields when it cannot.
func readUsage(pid int) procUsage {
	var u procUsage
	dir := "/proc/" + strconv.Itoa(pid)
	if b, err := os.ReadFile(dir + "/stat"); err == nil {
		if i := bytes.LastIndexByte(b, ')'); i >= 0 {
			f := strings.Fields(string(b[i+1:]))
			// Fields from 3 (state): utime is 14, stime 15, num_threads 20, rss 24.
			if len(f) > 22 {
				ut, _ := strconv.ParseUint(f[11], 10, 64)
				st, _ := strconv.ParseUint(f[12], 10, 64)
				u.CPU = time.Duration(ut+st) * time.Second / clockTick
				u.Threads, _ = strconv.Atoi(f[17])
				pages, _ := strconv.ParseUint(f[21], 10, 64)
				u.RSS = pages * uint64(os.Getpagesize())
			}
		}
	}
	if ents, err := os.ReadDir(dir + "/fd"); err == nil {
		u.FDs = len(ents)
	}
	return u
}

// readRSS reads only the resident memory of pid, in bytes.
func readRSS(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseUint(f[1], 10, 64)
	return pages * uint64(os.Getpagesize())
}
