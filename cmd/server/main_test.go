package main

import (
	"fmt"
	"os"
	"strconv"
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

func TestMain(m *testing.M) {
	if os.Getenv(envAsServer) == "1" {
		if os.Getenv(envFailBoot) == "1" && os.Getenv(protocol.EnvRole) == protocol.RoleWorker {
			fmt.Fprintln(os.Stderr, "server: test worker refuses to boot")
			os.Exit(exitBootError)
		}
		extraRoutes = testRoutes
		os.Exit(run(os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
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
		for i := range b {
			b[i] = byte(i)
		}
		held = append(held, b)
		ctx.SetBodyString("held " + strconv.Itoa(mb) + " MiB")
	case "/test/panic":
		ctx.SetBodyString("partial")
		panic("test panic")
	default:
		return false
	}
	return true
}
