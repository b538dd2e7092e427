# The two commands a new user needs: `make demo` and `make test`.
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
STATICCHECK_VERSION ?= v0.8.2

.PHONY: test demo chaos lint bench databases fuzz oldest-go

# Unit tests (fake driver, fake clock), then the integration and fault
# suite (its own module, so that its dependencies stay out of users'
# builds) against the local PostgreSQL and MariaDB and private throwaway
# servers, with the race detector (the restart scenario among them: it
# checks that write service comes back within 0.5 s of the restarted server
# taking writes). The tests on private servers and clusters (crash tests,
# failovers, Galera, Patroni) run in the parallel phase, three at a time:
# much of their time is waiting for servers. The drivers' own test suites raw and
# through sqlretry (TestDriverSuites); the SQL reader against PostgreSQL's
# and TiDB's parsers (sqlparsecheck, its own module: cgo, parsers).
test: databases
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 5m ./...
	cd integration && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 28m -parallel 3 -skip '^TestDriverSuites$$' ./...
	cd integration && $(GO) test -count=1 -timeout 10m -run '^TestDriverSuites$$' .
	cd sqlparsecheck && $(GO) vet ./... && $(GO) test -count=1 -timeout 10m .
	cd cmd && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 5m ./...
	cd promsqlretry && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 2m ./...
	cd otelsqlretry && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 2m ./...

# The main job: a private PostgreSQL server, a concurrent transfer workload
# under conflicts, killed connections and a crash, through the plain driver
# and through sqlretry, with a table of what each lost. `cmd/` is its own
# module, so the programs' dependencies stay out of users' builds. It does
# not depend on `databases`: it starts its own throwaway server in a temp
# directory and installs, configures and starts nothing else. It is built
# first, in a step of its own (the first build takes about half a minute),
# into a temp directory that is removed afterwards.
demo:
	@d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && \
	echo "building the demo (the first build takes about half a minute)..." && \
	(cd cmd && $(GO) build -o "$$d/demo" ./demo) && \
	echo "running the demo" && \
	"$$d/demo" $(ARGS)

# The chaos benchmark: four strategies under six fault scenarios (failover:
# PostgreSQL on a Patroni cluster only) on both engines (about 13 minutes);
# writes docs/chaos/{chaos.json,chaos.md,*.svg}.
chaos: databases
	cd cmd && $(GO) run ./chaos -out ../docs/chaos $(ARGS)

# Sets up the shared test servers when they are not up: PostgreSQL on
# 127.0.0.1:5432 with trust authentication and MariaDB on 127.0.0.1:3306
# with a root user without password, installing them (and PgBouncer,
# Patroni, etcd, Galera) from Debian's packages when absent. Changes the
# machine: only `make test`, `make chaos` and CI run it.
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
	cd promsqlretry && $(GO) vet ./... && $(GOBIN)/staticcheck ./...
	cd otelsqlretry && $(GO) vet ./... && $(GOBIN)/staticcheck ./...

# The root module on the oldest Go it supports (its go.mod's go line, set
# by pgx v5.12's own): the toolchain comes from the Go module proxy once.
OLDEST_GO ?= go1.25.0
oldest-go:
	GOTOOLCHAIN=$(OLDEST_GO) $(GO) version
	GOTOOLCHAIN=$(OLDEST_GO) $(GO) vet ./...
	GOTOOLCHAIN=$(OLDEST_GO) $(GO) test -count=1 -timeout 10m ./...

# Happy-path overhead: raw driver vs sqlretry, side by side with benchstat;
# then the OpenTelemetry observer (otelsqlretry) beside XSAM/otelsql.
bench:
	@test -x $(GOBIN)/benchstat || $(GO) install golang.org/x/perf/cmd/benchstat@latest
	cd integration && $(GO) test -run '^$$' -bench . -benchmem -count 6 -timeout 30m . | tee ../bench.out
	cd otelsqlretry && $(GO) test -run '^$$' -bench . -benchmem -count 6 -timeout 10m . | tee -a ../bench.out
	$(GOBIN)/benchstat -col /wrap bench.out

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzClassify -fuzztime 20s .
	$(GO) test -run '^$$' -fuzz FuzzSQLText -fuzztime 20s .
	cd sqlparsecheck && $(GO) test -run '^$$' -fuzz FuzzReaderAgainstParsers -fuzztime 60s .
