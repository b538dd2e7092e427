# The two commands a new user needs: `make demo` and `make test`.
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
STATICCHECK_VERSION ?= v0.8.2

.PHONY: test demo chaos lint bench databases fuzz

# Unit tests (fake driver, fake clock), then the integration and fault
# suite (its own module, so that its dependencies stay out of users'
# builds) against the local PostgreSQL and MariaDB and private throwaway
# servers, with the race detector (the restart scenario among them: it
# checks that write service comes back within 0.5 s of the restarted server
# taking writes). The drivers' own test suites raw and
# through sqlretry (TestDriverSuites); the SQL reader against PostgreSQL's
# and TiDB's parsers (sqlparsecheck, its own module: cgo, parsers).
test: databases
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 5m ./...
	cd integration && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 15m -skip '^TestDriverSuites$$' ./...
	cd integration && $(GO) test -count=1 -timeout 10m -run '^TestDriverSuites$$' .
	cd sqlparsecheck && $(GO) vet ./... && $(GO) test -count=1 -timeout 10m .
	cd cmd && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 5m ./...

# The main job: a private PostgreSQL server, a concurrent transfer workload
# under conflicts, killed connections and a crash, through the plain driver
# and through sqlretry, with a table of what each lost. `cmd/` is its own
# module, so the programs' dependencies stay out of users' builds.
demo: databases
	cd cmd && $(GO) run ./demo $(ARGS)

# The chaos benchmark: four strategies under four fault scenarios on both
# engines (about 5 minutes); writes docs/chaos/{chaos.json,chaos.md,*.svg}.
chaos: databases
	cd cmd && $(GO) run ./chaos -out ../docs/chaos $(ARGS)

# Starts (or installs) the local databases when they are not up.
databases:
	@bash scripts/ensure-databases.sh

lint:
	@test -z "$$(gofmt -l .)" || (echo "gofmt would change:"; gofmt -l .; exit 1)
	$(GO) vet ./...
	@test -x $(GOBIN)/staticcheck || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GOBIN)/staticcheck ./...
	cd integration && $(GO) vet ./... && $(GOBIN)/staticcheck ./...
	cd cmd && $(GO) vet ./... && $(GOBIN)/staticcheck ./...
	cd sqlparsecheck && $(GO) vet ./... && $(GOBIN)/staticcheck ./...

# Happy-path overhead: raw driver vs sqlretry, side by side with benchstat.
bench:
	@test -x $(GOBIN)/benchstat || $(GO) install golang.org/x/perf/cmd/benchstat@latest
	cd integration && $(GO) test -run '^$$' -bench . -benchmem -count 6 -timeout 30m . | tee ../bench.out
	$(GOBIN)/benchstat -col /wrap bench.out

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzClassify -fuzztime 20s .
	$(GO) test -run '^$$' -fuzz FuzzSQLText -fuzztime 20s .
	cd sqlparsecheck && $(GO) test -run '^$$' -fuzz FuzzReaderAgainstParsers -fuzztime 60s .
