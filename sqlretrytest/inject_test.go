package sqlretrytest_test

import (
	"context"
	"database/sql"
	"errors"
	"reflect"
	"testing"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/sqlretrytest"
)

func rowsOf(t *testing.T, db *sql.DB, table string) []string {
	t.Helper()
	rows, err := db.Query("SELECT msg FROM " + table + " ORDER BY msg")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

func twoInserts(attempts *int) func(context.Context, *sql.Tx) error {
	return func(ctx context.Context, tx *sql.Tx) error {
		*attempts++
		if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (?)", "a"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (?)", "b")
		return err
	}
}

// TestInjectorFaultsInTx: every fault at every place of a transaction is
// met as the real one would be: RunInTx replays, the writes land once; a
// lost connection closes the driver's connection; at COMMIT a lost
// connection leaves the transaction uncommitted and a lost reply commits
// it, and without a way to resolve either (an unknown engine) RunInTx
// says ErrAmbiguousCommit.
func TestInjectorFaultsInTx(t *testing.T) {
	for _, f := range []sqlretrytest.Fault{sqlretrytest.SerializationFailure, sqlretrytest.Deadlock, sqlretrytest.ConnectionLost, sqlretrytest.CommitReplyLost} {
		for pos := 1; pos <= 3; pos++ {
			mem := newMemDB()
			inj := sqlretrytest.NewInjector(mem.connector(), sqlretrytest.FailInTx(1, pos, f))
			db := sqlretry.OpenDB(inj)
			attempts := 0
			err := sqlretry.RunInTx(context.Background(), db, nil, twoInserts(&attempts))
			got := rowsOf(t, db, "t")
			inj2 := inj.Injected()
			db.Close()
			if len(inj2) != 1 || inj2[0].Statement.InTx != pos || inj2[0].Statement.Tx != 1 || inj2[0].Statement.Commit != (pos == 3) {
				t.Errorf("%v at %d: injected %+v", f, pos, inj2)
				continue
			}
			want := []string{"a", "b"}
			lostCommit := pos == 3 && (f == sqlretrytest.CommitReplyLost || f == sqlretrytest.ConnectionLost)
			if lostCommit {
				if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || attempts != 1 {
					t.Errorf("%v at COMMIT: %v after %d attempts, want ErrAmbiguousCommit after 1", f, err, attempts)
				}
				if f == sqlretrytest.ConnectionLost {
					want = nil // the COMMIT never reached the server
				}
			} else if err != nil || attempts != 2 {
				t.Errorf("%v at %d: %v after %d attempts, want a replay", f, pos, err, attempts)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%v at %d: rows %v, want %v", f, pos, got, want)
			}
			lost := f == sqlretrytest.ConnectionLost || f == sqlretrytest.CommitReplyLost
			mem.mu.Lock()
			closed := mem.closed
			mem.mu.Unlock()
			if lost && closed == 0 {
				t.Errorf("%v at %d: the driver's connection was not closed", f, pos)
			}
		}
	}
}

// TestInjectorAutocommit: the nth statement counts autocommit statements
// and COMMITs alike; a lost connection after an autocommit write leaves
// the write done (the reply was lost, not the request).
func TestInjectorAutocommit(t *testing.T) {
	mem := newMemDB()
	inj := sqlretrytest.NewInjector(mem.connector(), sqlretrytest.FailNth(2, sqlretrytest.ConnectionLost))
	db := sqlretry.OpenDB(inj)
	defer db.Close()
	if _, err := db.Exec("INSERT INTO t VALUES (?)", "1"); err != nil {
		t.Fatal(err)
	}
	_, err := db.Exec("INSERT INTO t VALUES (?)", "2")
	if err == nil {
		t.Fatal("the second statement did not fail")
	}
	var e *sqlretry.Error
	if errors.As(err, &e) && e.Class != sqlretry.ConnectionLost {
		t.Errorf("class %v, want connection-lost", e.Class)
	}
	if got := rowsOf(t, db, "t"); !reflect.DeepEqual(got, []string{"1", "2"}) {
		t.Errorf("rows %v: the lost reply's write must be there", got)
	}
	if n := inj.Statements(); n != 3 {
		t.Errorf("%d statements counted, want 3", n)
	}
}

// TestFailRandomRepeats: the same seed makes the same faults.
func TestFailRandomRepeats(t *testing.T) {
	run := func() []sqlretrytest.Fault {
		r := sqlretrytest.FailRandom(0.3, 42)
		var fs []sqlretrytest.Fault
		for i := 1; i <= 200; i++ {
			fs = append(fs, r(sqlretrytest.Statement{Seq: i, Commit: i%5 == 0}))
		}
		return fs
	}
	a, b := run(), run()
	if !reflect.DeepEqual(a, b) {
		t.Fatal("two runs with one seed differ")
	}
	n := 0
	for _, f := range a {
		if f != sqlretrytest.NoFault {
			n++
		}
	}
	if n < 30 || n > 90 {
		t.Errorf("%d of 200 faults at a share of 0.3", n)
	}
	only := sqlretrytest.FailRandom(1, 1, sqlretrytest.Deadlock)
	if f := only(sqlretrytest.Statement{Seq: 1}); f != sqlretrytest.Deadlock {
		t.Errorf("FailRandom(1, _, Deadlock) gave %v", f)
	}
}

// TestSetRuleAndDialect: the rule can be changed and stopped, and the
// engine chosen by hand.
func TestSetRuleAndDialect(t *testing.T) {
	inj := sqlretrytest.NewInjector(newMemDB().connector(), nil)
	if inj.Dialect() != sqlretry.DialectUnknown {
		t.Errorf("memdb detected as %v", inj.Dialect())
	}
	inj.SetDialect(sqlretry.DialectMySQL)
	inj.SetRule(sqlretrytest.FailNth(1, sqlretrytest.Deadlock))
	db := sql.OpenDB(inj)
	defer db.Close()
	_, err := db.Exec("INSERT INTO t VALUES (?)", "x")
	if err == nil || err.Error() != "Error 1213 (40001): Deadlock found when trying to get lock; try restarting transaction" {
		t.Errorf("got %v, want MySQL's deadlock", err)
	}
	inj.SetRule(nil)
	if _, err := db.Exec("INSERT INTO t VALUES (?)", "y"); err != nil {
		t.Error(err)
	}
	own := errors.New("the application's own error type")
	inj.SetErrorFunc(func(sqlretrytest.Fault) error { return own })
	inj.SetRule(sqlretrytest.FailNth(3, sqlretrytest.Deadlock))
	if _, err := db.Exec("INSERT INTO t VALUES (?)", "z"); !errors.Is(err, own) {
		t.Errorf("SetErrorFunc: got %v", err)
	}
}

// TestInjectorSkipsSqlretrysOwnQueries: on PostgreSQL sqlretry asks for the
// transaction id before COMMIT on the same connection; that query is
// neither counted nor failed, so the COMMIT is the third place of a
// transaction of two statements. (Inject recognises sqlretry's queries by
// the functions they run through: this fails if those are renamed.)
func TestInjectorSkipsSqlretrysOwnQueries(t *testing.T) {
	mem := newMemDB()
	inj := sqlretrytest.NewInjector(mem.connector(), sqlretrytest.FailInTx(1, 3, sqlretrytest.Deadlock))
	inj.SetDialect(sqlretry.DialectPostgres)
	db := sqlretry.OpenDB(inj, sqlretry.WithDialect(sqlretry.DialectPostgres))
	defer db.Close()
	attempts := 0
	if err := sqlretry.RunInTx(context.Background(), db, nil, twoInserts(&attempts)); err != nil {
		t.Fatal(err)
	}
	mem.mu.Lock()
	asked := mem.askedXID
	mem.mu.Unlock()
	if asked < 2 {
		t.Fatalf("sqlretry asked for the transaction id %d times, want once per attempt: the test no longer covers it", asked)
	}
	got := inj.Injected()
	if len(got) != 1 || !got[0].Statement.Commit || attempts != 2 {
		t.Errorf("injected %+v after %d attempts, want the deadlock at the first COMMIT", got, attempts)
	}
	if n := inj.Statements(); n != 6 {
		t.Errorf("%d statements counted, want 6 (two attempts of two statements and a COMMIT)", n)
	}
}
