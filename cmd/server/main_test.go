package main

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/supervisor/protocol"
)

// envAsServer makes the test binary run the server instead of the tests, so
// process tests exercise the real main with test-only routes added. Its
// prefix is not CORRAL_, which the supervisor strips from workers' env.
const envAsServer = "CORRALTEST_AS_SERVER"

// envFailBoot makes a worker of the test binary exit 3 before it is ready.
const envFailBoot = "CORRALTEST_FAIL_BOOT"

// envVersionFile names a file whose content is the version of a master of
// the test binary started after it was written: the upgrade tests install
// "another build" by changing it.
const envVersionFile = "CORRALTEST_VERSION_FILE"

// envCrashAfter, a Go duration, makes a worker of generation 2 or later
// exit 1 that long after it started: a slot whose replacements keep
// crashing. The first generation is spared so that the server boots.
const envCrashAfter = "CORRALTEST_CRASH_AFTER"

// envHoldFile names a file: while it exists, a worker of the test binary
// waits (up to a minute) before it starts, so that an upgrade's new master
// stays short of ready for as long as a test needs.
const envHoldFile = "CORRALTEST_HOLD_FILE"

func TestMain(m *testing.M) {
	if os.Getenv(envAsServer) == "1" {
		if f := os.Getenv(envHoldFile); f != "" && os.Getenv(protocol.EnvRole) == protocol.RoleWorker {
			holdWhile(f)
		}
		if os.Getenv(envFailBoot) == "1" && os.Getenv(protocol.EnvRole) == protocol.RoleWorker {
			fmt.Fprintln(os.Stderr, "server: test worker refuses to boot")
			os.Exit(exitBootError)
		}
		if os.Getenv(protocol.EnvRole) == protocol.RoleWorker {
			testWorkerFaults()
		}
		if f := os.Getenv(envVersionFile); f != "" && os.Getenv(protocol.EnvRole) != protocol.RoleWorker {
			// A master reads its version at start, as if stamped at build.
			if b, err := os.ReadFile(f); err == nil {
				version = strings.TrimSpace(string(b))
			}
		}
		extraRoutes = testRoutes
		os.Exit(run(os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// holdWhile returns once path does not exist, or after a minute.
func holdWhile(path string) {
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		if _, err := os.Stat(path); err != nil {
			return
		}
		time.Sleep(10 * time.Millisecond) // the hold itself, polled
	}
}

// testWorkerFaults applies envCrashAfter to a worker of the test binary.
func testWorkerFaults() {
	gen, _ := strconv.Atoi(os.Getenv(protocol.EnvGeneration))
	if d, err := time.ParseDuration(os.Getenv(envCrashAfter)); err == nil && gen > 1 {
		time.AfterFunc(d, func() {
			fmt.Fprintf(os.Stderr, "server: test worker crashes %s after start\n", d)
			os.Exit(1)
		})
	}
}

// held keeps /test/alloc's memory alive.
var held [][]byte

// testRoutes are served only by the test binary.
func testRoutes(ctx *fasthttp.RequestCtx) bool {
	switch string(ctx.Path()) {
	case "/test/slow":
		ms, _ := strconv.Atoi(string(ctx.QueryArgs().Peek("ms")))
		time.Sleep(time.Duration(ms) * time.Millisecond) // the slow work itself
		ctx.SetBodyString("slow done pid=" + strconv.Itoa(os.Getpid()))
	case "/test/alloc":
		// Memory the worker holds and touches, so its RSS grows.
		mb, _ := strconv.Atoi(string(ctx.QueryArgs().Peek("mb")))
		b := make([]byte, mb<<20)
		// One write per page is enough for the pages to count in RSS,
		// and fast under the race detector.
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		held = append(held, b)
		ctx.SetBodyString("held " + strconv.Itoa(mb) + " MiB")
	case "/test/goroutines":
		// "N M": runtime.NumGoroutine and how many of those no request
		// owns: fasthttp pool workers parked idle, which fasthttp keeps
		// for up to 10 s after a burst, and the job queue's, which River
		// starts at its own pace once this worker wins its leader
		// election. Leak checks compare N-M.
		buf := make([]byte, 1<<20)
		for {
			n := runtime.Stack(buf, true)
			if n < len(buf) {
				buf = buf[:n]
				break
			}
			buf = make([]byte, 2*len(buf))
		}
		idle := 0
		for _, g := range bytes.Split(buf, []byte("\n\n")) {
			parked := bytes.Contains(g, []byte("(*workerPool).workerFunc")) && !bytes.Contains(g, []byte("serveConn"))
			if parked || bytes.Contains(g, []byte("github.com/riverqueue/river")) {
				idle++
			}
		}
		ctx.SetBodyString(strconv.Itoa(runtime.NumGoroutine()) + " " + strconv.Itoa(idle))
	case "/test/panic":
		ctx.SetBodyString("partial")
		panic("test panic")
	default:
		return false
	}
	return true
}

// TestDescribeLLM: the status names the model chats are sent with, the
// provider's default included.
func TestDescribeLLM(t *testing.T) {
	for _, tt := range []struct {
		c    config
		want string
	}{
		{config{LLMProvider: "openai", LLMBaseURL: "https://api.openai.com/v1"}, "openai at api.openai.com (model gpt-4o-mini)"},
		{config{LLMProvider: "openai", LLMBaseURL: "http://127.0.0.1:11434/v1", LLMModel: "llama3"}, "openai at 127.0.0.1:11434 (model llama3)"},
		{config{SimulatedLatency: 5 * time.Second}, "simulated (5s per reply)"},
	} {
		if got := describeLLM(tt.c); got != tt.want {
			t.Errorf("describeLLM(%+v) = %q, want %q", tt.c, got, tt.want)
		}
	}
}
