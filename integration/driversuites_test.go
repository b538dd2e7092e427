package integration

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// The drivers' own test suites, run raw and through sqlretry (issue 9: the
// decorator must not change what the driver does for its own tests). Each
// driver module is copied from the module cache into a temporary directory
// (no driver source lives in this repository), files are added that route
// the suite's databases through sqlretry when the test binary is linked
// with -X flags, and every top-level test runs in a process of its own, raw and
// wrapped, against a private server. A test that passes raw must pass
// wrapped; the only exceptions are written down here with their reason:
//
//   - skip: not run at all (what the test needs is not available here);
//   - a test that reaches the driver's own connection with
//     conn.Raw(func(dc any) error { dc.(*stdlib.Conn) ... }) panics through
//     any decorator, which hands Raw its own connection. Such a test is run
//     a third time with that assertion rewritten to go through
//     sqlretry.UnwrapConn, as README tells users to, and must pass there.

// driverSuite is one driver's own test suite.
type driverSuite struct {
	module string            // module path, at the version the integration module requires
	pkg    string            // the package whose tests run, relative to the module root
	server string            // "mysql" or "pgx", for ownServer
	wrap   string            // -ldflags that route the suite through sqlretry
	add    map[string]string // files added to the copy (path in the module: content)
	patch  []textPatch       // edits to the copy's non-test files
	// rawAccess finds the tests' type assertions on the connection that
	// conn.Raw hands them: rewritten to sqlretryUnwrapConn(x).(T) for the
	// third run, rawAccessCount times.
	rawAccess      *regexp.Regexp
	rawAccessCount int
	env            func(dsn string) ([]string, error) // the suite's configuration
	beforeEach     func(dsn string) error             // run before every test process
	skip           map[string]string                  // top-level tests not run: why
}

// textPatch replaces old by new in file, exactly once.
type textPatch struct{ file, old, new string }

// rawAssertionPanic is how a test that asserts the type of conn.Raw's
// argument fails through sqlretry.
var rawAssertionPanic = regexp.MustCompile(`panic: interface conversion: (interface \{\} is )?\*sqlretry\.conn`)

var driverSuites = []driverSuite{
	{
		module: "github.com/go-sql-driver/mysql",
		pkg:    ".",
		server: "mysql",
		// The driver's own switches: driverName is the name its init
		// registers it under, driverNameTest the name most of the suite
		// opens (the rest opens "mysql").
		wrap: "-X=github.com/go-sql-driver/mysql.driverName=mysql-raw -X=github.com/go-sql-driver/mysql.driverNameTest=mysql " +
			"-X=github.com/go-sql-driver/mysql.sqlretryWrap=1",
		add: map[string]string{"zz_sqlretry_test.go": `package mysql

import (
	"database/sql/driver"

	"github.com/sqlretry/sqlretry"
)

// Added by sqlretry's TestDriverSuites. With -X ...sqlretryWrap=1 (and the
// driver registering itself under another name) "mysql" is the driver
// through sqlretry.
var sqlretryWrap string

func init() {
	if sqlretryWrap == "" {
		return
	}
	if err := sqlretry.Register("mysql", &MySQLDriver{}); err != nil {
		panic(err)
	}
}

func sqlretryUnwrapConn(dc any) driver.Conn { return sqlretry.UnwrapConn(dc) }
`},
		rawAccess:      regexp.MustCompile(`\bconn\.\((\*mysqlConn|driver\.Execer|driver\.Queryer)\)`),
		rawAccessCount: 4,
		env: func(dsn string) ([]string, error) {
			cfg, err := mysql.ParseDSN(dsn)
			if err != nil {
				return nil, err
			}
			return []string{"MYSQL_TEST_USER=" + cfg.User, "MYSQL_TEST_PASS=" + cfg.Passwd,
				"MYSQL_TEST_PROT=" + cfg.Net, "MYSQL_TEST_ADDR=" + cfg.Addr, "MYSQL_TEST_DBNAME=" + cfg.DBName,
				"MYSQL_TEST_CONCURRENT=1"}, nil // up to max_connections at once: the server is private
		},
		// The suite's tests share one table name, "test", and a test that
		// stops half-way leaves it behind for the next one: every test
		// starts with an empty database.
		beforeEach: recreateMySQLDatabase,
		skip: map[string]string{
			"TestConnectorReturnsTimeout": "dials 1.1.1.1:1234 and expects a dial timeout: no test leaves 127.0.0.0/8 " +
				"(where a sandbox accepts that connection, the driver panics on a nil logger after 10 s)",
		},
	},
	{
		module: "github.com/jackc/pgx/v5",
		pkg:    "stdlib",
		server: "pgx",
		wrap:   "-X=github.com/jackc/pgx/v5/stdlib.sqlretryWrap=1",
		add: map[string]string{
			"stdlib/zz_sqlretry_test.go": `package stdlib

import (
	"database/sql/driver"

	"github.com/sqlretry/sqlretry"
)

// Added by sqlretry's TestDriverSuites. With -X ...stdlib.sqlretryWrap=1
// every database the suite opens (stdlib.OpenDB, OpenDBFromPool, and
// sql.Open("pgx") or "pgx/v5") goes through sqlretry.
var sqlretryWrap string

// Package variables are set before sql.go's init registers the driver.
var _ = installSQLRetry()

func installSQLRetry() bool {
	if sqlretryWrap == "" {
		return false
	}
	wrapDriver = func(d driver.Driver) driver.Driver {
		w, err := sqlretry.Wrap(d)
		if err != nil {
			panic(err)
		}
		return w
	}
	wrapConnector = func(c driver.Connector) driver.Connector {
		w, err := sqlretry.WrapConnector(c)
		if err != nil {
			panic(err)
		}
		return w
	}
	return true
}
`,
			"stdlib/zz_sqlretry_ext_test.go": `package stdlib_test

import (
	"database/sql/driver"

	"github.com/sqlretry/sqlretry"
)

func sqlretryUnwrapConn(dc any) driver.Conn { return sqlretry.UnwrapConn(dc) }
`,
			"stdlib/zz_sqlretry_hooks.go": `package stdlib

import "database/sql/driver"

// Added by sqlretry's TestDriverSuites: what sql.go registers and opens;
// zz_sqlretry_test.go replaces them.
var (
	wrapDriver    = func(d driver.Driver) driver.Driver { return d }
	wrapConnector = func(c driver.Connector) driver.Connector { return c }
)
`,
		},
		patch: []textPatch{
			{"stdlib/sql.go", `sql.Register("pgx", pgxDriver)`, `sql.Register("pgx", wrapDriver(pgxDriver))`},
			{"stdlib/sql.go", `sql.Register("pgx/v5", pgxDriver)`, `sql.Register("pgx/v5", wrapDriver(pgxDriver))`},
			{"stdlib/sql.go", "c := GetConnector(config, opts...)\n\treturn sql.OpenDB(c)", "c := GetConnector(config, opts...)\n\treturn sql.OpenDB(wrapConnector(c))"},
			{"stdlib/sql.go", "db := sql.OpenDB(c)", "db := sql.OpenDB(wrapConnector(c))"},
		},
		rawAccess:      regexp.MustCompile(`\bdriverConn\.\((\*stdlib\.Conn)\)`),
		rawAccessCount: 5,
		env:            func(dsn string) ([]string, error) { return []string{"PGX_TEST_DATABASE=" + dsn}, nil },
	},
}

// recreateMySQLDatabase drops and creates the DSN's database.
func recreateMySQLDatabase(dsn string) error {
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		return err
	}
	name := cfg.DBName
	cfg.DBName = ""
	db, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		return err
	}
	defer db.Close()
	for _, q := range []string{"DROP DATABASE IF EXISTS `" + name + "`", "CREATE DATABASE `" + name + "`"} {
		if _, err := db.Exec(q); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
	}
	return nil
}

func TestDriverSuites(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two drivers' test suites (about 2 minutes)")
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range driverSuites {
		t.Run(s.server, func(t *testing.T) { s.run(t, root) })
	}
}

func (s driverSuite) run(t *testing.T, root string) {
	dir := s.copyModule(t, root)
	bins := t.TempDir()
	raw, wrapped, unwrapped := filepath.Join(bins, "raw.test"), filepath.Join(bins, "wrapped.test"), filepath.Join(bins, "unwrap.test")
	s.build(t, dir, raw, "")
	s.build(t, dir, wrapped, s.wrap)
	s.rewriteRawAccess(t, dir)
	s.build(t, dir, unwrapped, s.wrap)

	srv := ownServer(t, s.server)
	env, err := s.env(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	run := func(bin string, tests []string) map[string]outcome {
		return runEach(t, bin, filepath.Join(dir, s.pkg), env, tests, func() error {
			if s.beforeEach == nil {
				return nil
			}
			return s.beforeEach(srv.DSN)
		})
	}
	var tests []string
	for _, name := range listTests(t, raw, filepath.Join(dir, s.pkg)) {
		if _, ok := s.skip[name]; !ok {
			tests = append(tests, name)
		}
	}
	rawRes := run(raw, tests)
	wrapRes := run(wrapped, tests)
	var rawAccess []string
	for _, name := range tests {
		if wrapRes[name].status == "FAIL" && rawAssertionPanic.MatchString(wrapRes[name].log) {
			rawAccess = append(rawAccess, name)
		}
	}
	s.compare(t, rawRes, wrapRes, rawAccess, run(unwrapped, rawAccess))
}

// rewriteRawAccess rewrites the tests' type assertions on conn.Raw's
// argument x.(T) to sqlretryUnwrapConn(x).(T), sqlretry.UnwrapConn.
func (s driverSuite) rewriteRawAccess(t *testing.T, dir string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, s.pkg, "*_test.go"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		n += len(s.rawAccess.FindAllIndex(b, -1))
		b = s.rawAccess.ReplaceAllFunc(b, func(m []byte) []byte {
			x, typ, _ := bytes.Cut(m, []byte(".("))
			return []byte(fmt.Sprintf("sqlretryUnwrapConn(%s).(%s", x, typ))
		})
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if n != s.rawAccessCount {
		t.Fatalf("%s: %d type assertions on conn.Raw's argument, want %d: update rawAccess for this version", s.module, n, s.rawAccessCount)
	}
}

// copyModule copies the module from the module cache into a temporary
// directory and makes it build against this sqlretry.
func (s driverSuite) copyModule(t *testing.T, root string) string {
	t.Helper()
	out := goCmd(t, ".", nil, "list", "-m", "-json", s.module)
	var m struct{ Dir, Version string }
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("go list -m %s: %v", s.module, err)
	}
	if m.Dir == "" { // not extracted yet
		out = goCmd(t, ".", nil, "mod", "download", "-json", s.module+"@"+m.Version)
		if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
			t.Fatalf("go mod download %s@%s: %v %s", s.module, m.Version, err, out)
		}
	}
	t.Logf("%s %s", s.module, m.Version)
	dir := filepath.Join(t.TempDir(), "module")
	if err := os.CopyFS(dir, os.DirFS(m.Dir)); err != nil { // writable copies of the read-only cache
		t.Fatal(err)
	}
	for _, p := range s.patch {
		file := filepath.Join(dir, p.file)
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), p.old); n != 1 {
			t.Fatalf("%s %s: %q occurs %d times, want once: the patch needs updating for this version", s.module, p.file, p.old, n)
		}
		if err := os.WriteFile(file, []byte(strings.Replace(string(b), p.old, p.new, 1)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range s.add {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	goCmd(t, dir, nil, "mod", "edit", "-require=github.com/sqlretry/sqlretry@v0.0.0", "-replace=github.com/sqlretry/sqlretry="+root)
	return dir
}

func (s driverSuite) build(t *testing.T, dir, out, ldflags string) {
	t.Helper()
	args := []string{"test", "-c", "-o", out}
	if ldflags != "" {
		args = append(args, "-ldflags="+ldflags)
	}
	goCmd(t, dir, nil, append(args, "./"+s.pkg)...)
}

// goCmd runs the go command with the module cache and the proxy, never a
// workspace; it fails the test on an error.
func goCmd(t *testing.T, dir string, env []string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local")
	cmd.Env = append(cmd.Env, env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go %s (in %s): %v\n%s", strings.Join(args, " "), dir, err, stderr.Bytes())
	}
	return out
}

// listTests lists the binary's top-level tests, fuzz seeds and examples.
func listTests(t *testing.T, bin, dir string) []string {
	t.Helper()
	cmd := exec.Command(bin, "-test.list", ".")
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s -test.list: %v", bin, err)
	}
	var names []string
	for _, n := range strings.Fields(string(out)) {
		if strings.HasPrefix(n, "Test") || strings.HasPrefix(n, "Fuzz") || strings.HasPrefix(n, "Example") {
			names = append(names, n)
		}
	}
	return names
}

// outcome of one test or subtest.
type outcome struct {
	status string // PASS, FAIL, SKIP
	log    string // the top-level test's output, on a failure
}

var resultLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) \(`)

// runEach runs every top-level test in a process of its own, so that a
// test that panics (as the driver-internals tests do wrapped) costs only
// itself.
func runEach(t *testing.T, bin, dir string, env, tests []string, beforeEach func() error) map[string]outcome {
	t.Helper()
	res := map[string]outcome{}
	for _, name := range tests {
		if err := beforeEach(); err != nil {
			t.Fatalf("before %s: %v", name, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		cmd := exec.CommandContext(ctx, bin, "-test.run", "^"+regexp.QuoteMeta(name)+"$", "-test.v", "-test.count=1", "-test.timeout=2m")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		cancel()
		sc := bufio.NewScanner(bytes.NewReader(out))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if m := resultLine.FindStringSubmatch(sc.Text()); m != nil {
				res[m[2]] = outcome{status: m[1]}
			}
		}
		top, ok := res[name]
		if err != nil && (!ok || top.status != "FAIL") {
			top = outcome{status: "FAIL"} // crashed or timed out before reporting
		}
		if top.status == "FAIL" {
			top.log = tail(string(out), 25)
		}
		res[name] = top
	}
	return res
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// compare fails the test for every test that passed raw and did not pass
// wrapped, except a test listed in rawAccess that passes in the run through
// sqlretry.UnwrapConn. A parent fails with its subtests, so a failing
// parent is named only when none of its subtests failed.
func (s driverSuite) compare(t *testing.T, raw, wrapped map[string]outcome, rawAccess []string, unwrapped map[string]outcome) {
	t.Helper()
	if len(rawAccess) == 0 {
		// -X on a variable that does not exist is silently ignored: without
		// this, a renamed variable would compare the raw driver with itself.
		t.Errorf("no test saw sqlretry's connection in conn.Raw: did the wrapped run go through sqlretry (%s)?", s.wrap)
	}
	top := func(name string) string { return strings.SplitN(name, "/", 2)[0] }
	// A subtest that did not run because its test stopped earlier is not
	// named: the subtest or test that stopped it is.
	failed := func(res map[string]outcome, name string) bool { return res[name].status == "FAIL" }
	// Through UnwrapConn for the tests in rawAccess, else as they are.
	wrappedOf := func(name string) (map[string]outcome, string) {
		if slices.Contains(rawAccess, top(name)) {
			return unwrapped, "through sqlretry with conn.Raw's connection unwrapped"
		}
		return wrapped, "through sqlretry"
	}
	names := make([]string, 0, len(raw))
	hasFailingChild := map[string]bool{}
	for n, r := range raw {
		names = append(names, n)
		if res, _ := wrappedOf(n); r.status == "PASS" && failed(res, n) {
			for p := n; strings.Contains(p, "/"); {
				p = p[:strings.LastIndexByte(p, '/')]
				hasFailingChild[p] = true
			}
		}
	}
	sort.Strings(names)
	var rawFails, wrapOnlyPass []string
	for _, n := range names {
		res, how := wrappedOf(n)
		switch r := raw[n]; {
		case r.status == "FAIL":
			rawFails = append(rawFails, n)
			if res[n].status == "PASS" {
				wrapOnlyPass = append(wrapOnlyPass, n)
			}
		case r.status == "PASS" && failed(res, n) && !hasFailingChild[n]:
			t.Errorf("passes raw, fails %s: %s\n%s", how, n, res[top(n)].log)
		}
	}
	t.Logf("%d tests and subtests ran raw; %d failed raw (the server or the sandbox, not sqlretry) %v",
		len(raw), len(rawFails), rawFails)
	for _, n := range rawFails {
		if !strings.Contains(n, "/") {
			t.Logf("raw %s: %s", n, failureLines(raw[n].log))
		}
	}
	for name, why := range s.skip {
		t.Logf("not run: %s: %s", name, why)
	}
	t.Logf("reach the driver's connection by a type assertion on conn.Raw's argument, so they also ran "+
		"with it unwrapped by sqlretry.UnwrapConn: %v", rawAccess)
	if len(wrapOnlyPass) > 0 {
		t.Logf("failed raw but passed wrapped: %v", wrapOnlyPass)
	}
}

var failureLine = regexp.MustCompile(`(?m)^\s*(\w+_test\.go:\d+: .*|panic: .*)$`)

// failureLines is what a failed test said about its failure, in brief.
func failureLines(log string) string {
	m := failureLine.FindAllString(log, 3)
	for i := range m {
		m[i] = strings.TrimSpace(m[i])
	}
	return strings.Join(m, " | ")
}
