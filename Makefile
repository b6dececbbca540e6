# Corral: the Makefile is the contract. `make help` lists the targets.

VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
GO          ?= go
PKGS        := ./...
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
CONTAINER   ?= podman
IMAGE       ?= corral:$(VERSION)
CA_CERTS    ?= /etc/ssl/certs/ca-certificates.crt

.PHONY: help build install image image-test run dev test fmt-check vet staticcheck deps-check gotest bench chaos fuzz clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build ./server (version stamped)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o server ./cmd/server

install: build ## install server into $(BINDIR) (PREFIX=/usr/local); a new file, so a running server keeps its own
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 server $(DESTDIR)$(BINDIR)/server

image: ## container image FROM scratch around a static ./server: $(IMAGE), built with $(CONTAINER)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o server ./cmd/server
	rm -rf .image && mkdir -p .image/rootfs/usr/local/bin .image/rootfs/etc/ssl/certs .image/rootfs/tmp .image/state
	chmod 1777 .image/rootfs/tmp
	cp server .image/rootfs/usr/local/bin/server
	cp $(CA_CERTS) .image/rootfs/etc/ssl/certs/ca-certificates.crt
	$(CONTAINER) build -f Dockerfile -t $(IMAGE) .image

image-test: ## build the image and check it with podman (RUNTIME=runc where crun cannot run)
	./.ci/image-test

run: build ## build and run the server with the embedded defaults
	./server

dev: build ## development mode, same as ./run.sh
	./run.sh

test: fmt-check vet staticcheck deps-check gotest ## every check CI runs

fmt-check: ## fail when gofmt would change a file
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet: ## go vet
	$(GO) vet $(PKGS)

staticcheck: ## staticcheck, pinned
	$(GO) run $(STATICCHECK) $(PKGS)

deps-check: ## enforce the import rules of docs/architecture.md
	@./.ci/deps-check

# One package at a time. Within a package, the tests marked t.Parallel
# (process tests that mostly wait on servers) run 4 at once, after the
# load-sensitive ones (chaos, hostile input, bursts, reload builds), which
# run alone.
gotest: ## go test -race
	@./.ci/test-tools
	$(GO) test -race -count=1 -p 1 -parallel 4 -timeout 15m $(PKGS)

bench: build ## benchmarks; figures go to docs/benchmarks.md
	./bench/run.sh

chaos: ## the 60 s chaos run; writes its table to bench/out/chaos.md
	mkdir -p bench/out
	CORRAL_CHAOS_DURATION=60s CORRAL_CHAOS_REPORT=$(CURDIR)/bench/out/chaos.md \
		$(GO) test -race -count=1 -run '^TestChaos$$' -v -timeout 10m ./cmd/server/

fuzz: ## every fuzz target for FUZZTIME each (default 20s)
	./bench/fuzz.sh

clean: ## remove build output
	rm -rf server .image
