# The two commands a new user needs: `make demo` and `make test`.
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
STATICCHECK_VERSION ?= v0.8.2

.PHONY: test demo lint bench databases fuzz

# Unit tests (fake driver, fake clock), then the integration and fault
# suite (its own module, so that its dependencies stay out of users'
# builds) against the local PostgreSQL and MariaDB and private throwaway
# servers, with the race detector.
test: databases
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 5m ./...
	cd integration && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 10m ./...

# The main job: a concurrent transfer workload under conflicts, through the
# plain driver and through sqlretry, with a table of what each lost.
demo: databases
	$(GO) run ./cmd/demo

# Starts (or installs) the local databases when they are not up.
databases:
	@bash scripts/ensure-databases.sh

lint:
	@test -z "$$(gofmt -l .)" || (echo "gofmt would change:"; gofmt -l .; exit 1)
	$(GO) vet ./...
	@test -x $(GOBIN)/staticcheck || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GOBIN)/staticcheck ./...
	cd integration && $(GO) vet ./... && $(GOBIN)/staticcheck ./...

# Happy-path overhead: raw driver vs sqlretry, side by side with benchstat.
bench:
	@test -x $(GOBIN)/benchstat || $(GO) install golang.org/x/perf/cmd/benchstat@latest
	$(GO) test -run '^$$' -bench . -benchmem -count 6 -timeout 20m ./... | tee bench.out
	cd integration && $(GO) test -run '^$$' -bench . -benchmem -count 6 -timeout 20m ./... | tee ../bench-real.out
	$(GOBIN)/benchstat -col /wrap bench.out
	$(GOBIN)/benchstat -col /wrap bench-real.out

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzClassify -fuzztime 20s .
	$(GO) test -run '^$$' -fuzz FuzzSQLText -fuzztime 20s .
