package sqlretry

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"
)

func TestOpenRejectsBadInput(t *testing.T) {
	for name, fn := range map[string]func() error{
		"unknown driver": func() error { _, err := Open("no-such-driver", ""); return err },
		"bad option":     func() error { _, err := Open("pgx", "postgres://x/y", WithMaxAttempts(0)); return err },
		"nil option":     func() error { _, err := Open("pgx", "postgres://x/y", nil); return err },
		"bad mysql dsn":  func() error { _, err := Open("mysql", "root@tcp(127.0.0.1:3306/x"); return err },
		"bad backoff":    func() error { _, err := Open("pgx", "", WithBackoff(Backoff{Multiplier: 0.5})); return err },
		"bad breaker":    func() error { _, err := Open("pgx", "", WithBreaker(Breaker{FailureRatio: 2})); return err },
		"bad budget":     func() error { _, err := Open("pgx", "", WithBudget(Budget{Ratio: -1})); return err },
		"bad timeout":    func() error { _, err := Open("pgx", "", WithAttemptTimeout(-time.Second)); return err },
		"bad marker":     func() error { _, err := Open("mysql", "", WithMySQLCommitMarker("x; DROP TABLE y")); return err },
		"nil observer":   func() error { _, err := Open("pgx", "", WithObserver(nil)); return err },
		"typed nil observer": func() error {
			var o *nilObserver // a constructor's result left nil after its error, say
			_, err := Open("pgx", "", WithObserver(o))
			return err
		},
		"nil driver":     func() error { return Register("sqlretry-nil", nil) },
		"nil *driver":    func() error { return Register("sqlretry-nilptr", (*stdlib.Driver)(nil)) },
		"empty name":     func() error { return Register("", stdlib.GetDefaultDriver()) },
		"duplicate name": func() error { return Register("pgx", stdlib.GetDefaultDriver()) },
		"nil connector":  func() error { _, err := WrapConnector(nil); return err },
		"nil db": func() error {
			return RunInTx(context.Background(), nil, nil, func(context.Context, *sql.Tx) error { return nil })
		},
	} {
		err := fn()
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		if !strings.Contains(err.Error(), "sqlretry") && name != "bad mysql dsn" {
			t.Errorf("%s: %v does not say it comes from sqlretry", name, err)
		}
	}
}

func TestOpenDBWithBadInputFailsEveryCall(t *testing.T) {
	db := OpenDB(nil)
	defer db.Close()
	if err := db.Ping(); err == nil || !strings.Contains(err.Error(), "connector is nil") {
		t.Errorf("Ping = %v", err)
	}
	db2 := OpenDB(&fakeConnector{srv: newFakeServer()}, WithMaxAttempts(-1))
	defer db2.Close()
	if _, err := db2.Exec("SELECT 1"); err == nil || !strings.Contains(err.Error(), "WithMaxAttempts") {
		t.Errorf("Exec = %v", err)
	}
}

// registerRuns names each run's registration apart: database/sql keeps
// drivers for the process's life, so -count=2 would find the name taken.
var registerRuns atomic.Int32

func TestRegisterAndDialectDetection(t *testing.T) {
	name := fmt.Sprintf("pgx+sqlretry-test-%d", registerRuns.Add(1))
	if err := Register(name, stdlib.GetDefaultDriver(), WithMaxAttempts(3)); err != nil {
		t.Fatal(err)
	}
	if err := Register(name, stdlib.GetDefaultDriver()); err == nil {
		t.Fatal("second registration under one name succeeded")
	}
	db, err := sql.Open(name, "postgres://127.0.0.1:1/x")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	r := retrierOf(db)
	if r == nil || r.dialect != DialectPostgres || r.cfg.backoff.MaxAttempts != 3 {
		t.Fatalf("retrier = %+v", r)
	}
	// Open on a name registered through sqlretry does not wrap twice.
	db2, err := Open(name, "postgres://127.0.0.1:1/x")
	if err != nil {
		t.Fatal(err)
	}
	defer db2.Close()
	if _, twice := retrierOf(db2).inner.Driver().(*wrappedDriver); twice {
		t.Error("wrapped twice")
	}
	db3, _ := Open("mysql", "root@tcp(127.0.0.1:1)/x")
	defer db3.Close()
	if d := retrierOf(db3).dialect; d != DialectMySQL {
		t.Errorf("mysql dialect = %v", d)
	}
	db4, _ := Open("mysql", "root@tcp(127.0.0.1:1)/x?autocommit=0")
	defer db4.Close()
	if !retrierOf(db4).implicitTx {
		t.Error("autocommit=0 in the DSN must turn statement retries off")
	}
	plainDB, _ := sql.Open("pgx", "postgres://127.0.0.1:1/x")
	defer plainDB.Close()
	if _, ok := StatsOf(plainDB); ok {
		t.Error("StatsOf on a plain db")
	}
	// pgx parses its DSN only when it connects: the error comes then, once.
	db5, err := Open("pgx", "postgres://x:notaport/db")
	if err != nil {
		t.Fatal(err)
	}
	defer db5.Close()
	if err := db5.Ping(); err == nil {
		t.Error("Ping with a bad DSN succeeded")
	}
	if s, _ := StatsOf(db5); s.DialFailures != 1 {
		t.Errorf("a bad DSN was dialled %d times, want 1", s.DialFailures)
	}
}

// Wrapping changes nothing observable: the optional interfaces are
// forwarded, and fall back as database/sql does when absent.
func TestTransparency(t *testing.T) {
	t.Run("full driver", func(t *testing.T) {
		srv := newFakeServer()
		db, _ := testDB(t, srv)
		// ErrSkip passes through by identity: database/sql then prepares.
		if _, err := db.Exec("ERRSKIP"); err != nil {
			t.Fatalf("ErrSkip fallback: %v", err)
		}
		// The driver's NamedValueChecker still sees the arguments.
		stmt, err := db.Prepare("SELECT n FROM t WHERE d = $1")
		if err != nil {
			t.Fatal(err)
		}
		defer stmt.Close()
		if _, err := stmt.Query(time.Second); err != nil {
			t.Fatalf("checked arg: %v", err)
		}
		// sql.Conn.Raw reaches the driver's connection.
		conn, err := db.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		err = conn.Raw(func(dc any) error {
			if _, ok := dc.(Unwrapper); !ok {
				return errors.New("no Unwrap method")
			}
			if _, ok := UnwrapConn(dc).(*fakeConn); !ok {
				return errors.New("UnwrapConn did not reach *fakeConn")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.PingContext(context.Background()); err != nil {
			t.Fatal(err)
		}
		// Rows in a transaction keep the column and result-set methods.
		tx, _ := db.Begin()
		rows, err := tx.Query("SELECT n FROM t")
		if err != nil {
			t.Fatal(err)
		}
		types, err := rows.ColumnTypes()
		if err != nil || len(types) != 1 || types[0].ScanType() == nil {
			t.Fatalf("column types: %v %v", types, err)
		}
		n := 0
		for rows.Next() {
			n++
		}
		if n != 2 || rows.NextResultSet() {
			t.Fatalf("rows: %d", n)
		}
		rows.Close()
		tx.Rollback()
	})
	t.Run("driver without optional interfaces", func(t *testing.T) {
		srv := newFakeServer()
		db := OpenDB(&fakeConnector{srv: srv, minimal: true}, WithClock(newFakeClock()))
		defer db.Close()
		if _, err := db.Exec("INSERT INTO t VALUES (1)"); err != nil {
			t.Fatalf("Exec: %v", err)
		}
		var n int
		if err := db.QueryRow("SELECT n FROM t").Scan(&n); err != nil || n != 1 {
			t.Fatalf("Query: %v %d", err, n)
		}
		if _, err := db.BeginTx(context.Background(), &sql.TxOptions{Isolation: sql.LevelSerializable}); err == nil ||
			!strings.Contains(err.Error(), "non-default isolation level") {
			t.Fatalf("BeginTx with isolation: %v, want database/sql's own error", err)
		}
		tx, err := db.Begin()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec("INSERT INTO t VALUES (2)"); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		if srv.ranCount("INSERT") != 2 {
			t.Errorf("ran = %v", srv.ran)
		}
		if _, err := db.Exec("INSERT INTO t VALUES ($1)", sql.Named("n", 1)); err == nil {
			t.Error("named args on a driver without support must fail as in database/sql")
		}
	})
}

func TestSlogObserver(t *testing.T) {
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv := newFakeServer()
	srv.script("UPDATE", step{err: errSerialization})
	db, _ := testDB(t, srv, WithObserver(SlogObserver(logger)))
	if _, err := db.Exec("UPDATE t SET n = 1"); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"sqlretry retry", "op=exec", "class=retry-statement", "40001", "delay="} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestErrorMessages(t *testing.T) {
	e := &Error{Op: "tx", Attempts: 3, Class: RetryTransaction, Err: errDeadlockPG}
	if got := e.Error(); !strings.Contains(got, "gave up after 3 attempts") || !strings.Contains(got, "deadlock") {
		t.Errorf("Error() = %q", got)
	}
	var pe *pgError
	if !errors.As(e, &pe) {
		t.Error("errors.As does not reach the driver's error")
	}
	e2 := &Error{Op: "dial", Reason: ErrCircuitOpen}
	if !errors.Is(e2, ErrCircuitOpen) || !strings.Contains(e2.Error(), "circuit breaker is open") {
		t.Errorf("%q", e2.Error())
	}
	h := handOff(errLost)
	if !errors.Is(h, driver.ErrBadConn) || !errors.Is(h, errLost) {
		t.Error("hand-off error must match ErrBadConn and its cause")
	}
	if errors.Is(withoutBadConn(h), driver.ErrBadConn) || errors.Is(withoutBadConn(driver.ErrBadConn), driver.ErrBadConn) {
		t.Error("withoutBadConn")
	}
}

// nilObserver is an Observer whose methods need a non-nil receiver.
type nilObserver struct{ n int }

func (o *nilObserver) Observe(context.Context, Event) { o.n++ }
