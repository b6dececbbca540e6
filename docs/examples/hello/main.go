// Command hello is the smallest program that runs under Corral's process
// model: a plain net/http handler, served by supervised worker processes.
//
//	go build ./docs/examples/hello
//	WORKERS=3 ./hello          # a master and 3 workers on port 8000
//	curl localhost:8000/       # hello from pid 4242
//	kill -HUP <master pid>     # rolling restart, no request fails
//	RELOAD=true ./hello        # rebuilt and swapped on every save
//
// Every setting of the process model is there, with uvicorn's names
// (./hello --help): --workers, --port, --reload, --timeout-graceful-shutdown
// and the rest, each also read from its environment variable.
package main

import (
	"fmt"
	"net/http"
	"os"

	"github.com/corralhq/corral/supervisor/prefork"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from pid %d\n", os.Getpid())
	})
	os.Exit(prefork.Main(prefork.App{Name: "hello", Handler: mux}))
}
