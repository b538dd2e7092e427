package sqlretry

import (
	"context"
	"errors"
	"testing"
)

// The reader's own table tests and fuzzing live in internal/sqltext and
// sqlparsecheck (against the servers' parsers); these check the wrappers
// and the decisions built on them.

func TestIsReadQuery(t *testing.T) {
	for _, tc := range []struct {
		q    string
		d    Dialect
		want bool
	}{
		{"SELECT 1", DialectUnknown, true},
		{"  select n from t where id = $1", DialectPostgres, true},
		{"/* c */ SELECT n FROM t", DialectMySQL, true},
		{"(SELECT 1) UNION (SELECT 2)", DialectUnknown, true},
		{"SELECT 'INSERT INTO t' AS s", DialectUnknown, true},
		{"SELECT $$DELETE$$", DialectPostgres, true},
		// issue 9 item 2: "#" is an operator in PostgreSQL.
		{"SELECT '{\"n\":1}'::jsonb #>> '{n}'\n; WITH d AS (DELETE FROM t RETURNING 1) SELECT 1", DialectPostgres, false},
		{"SELECT 1 #- '{a}'\n; INSERT INTO t VALUES (1)", DialectUnknown, false},
		{"SELECT 1 --x\n; DELETE FROM t", DialectMySQL, false},
		{`SELECT 'a\'; DELETE FROM t; --'`, DialectMySQL, false},
		{"SELECT 1 /*!50000 FOR UPDATE */", DialectMySQL, false},
		{"SELECT n FROM t FOR KEY SHARE", DialectPostgres, false},
		{"SELECT n FROM t LOCK IN SHARE MODE", DialectMySQL, false},
		{"SELECT pg_notify('c', 'x')", DialectPostgres, false},
		{"SELECT RELEASE_LOCK('x')", DialectMySQL, false},
		{"SELECT 1; SELECT 2", DialectUnknown, false},
		{"INSERT INTO t VALUES (1)", DialectUnknown, false},
		{"", DialectUnknown, false},
	} {
		if got := isReadQuery(tc.d, tc.q); got != tc.want {
			t.Errorf("isReadQuery(%v, %q) = %v, want %v", tc.d, tc.q, got, tc.want)
		}
	}
}

func TestTxControl(t *testing.T) {
	for _, tc := range []struct {
		q    string
		d    Dialect
		want int
	}{
		{"BEGIN", DialectUnknown, txOpens},
		{"START TRANSACTION", DialectMySQL, txOpens},
		{"INSERT INTO t VALUES (1); BEGIN", DialectMySQL, txOpens},
		{"COMMIT AND CHAIN", DialectMySQL, txOpens},
		{"ROLLBACK AND CHAIN", DialectPostgres, txOpens},
		{"COMMIT", DialectUnknown, txEnds},
		{"COMMIT RELEASE", DialectMySQL, txEnds},
		{"ABORT", DialectPostgres, txEnds},
		{"END", DialectPostgres, txEnds},
		{"PREPARE TRANSACTION 'x'", DialectPostgres, txEnds},
		{"ROLLBACK TO SAVEPOINT a", DialectUnknown, 0},
		{"SET autocommit = 0", DialectMySQL, txForGood},
		{"SET completion_type = 1", DialectMySQL, txForGood},
		{"XA START 'x'", DialectMySQL, txForGood},
		// attack9: spellings MariaDB runs as BEGIN / START TRANSACTION.
		{"SET STATEMENT sql_mode='' FOR BEGIN", DialectMySQL, txOpens},
		{"SET STATEMENT sql_mode='' FOR START TRANSACTION", DialectMySQL, txOpens},
		{"SET STATEMENT sql_mode='' FOR COMMIT", DialectMySQL, txEnds},
		{"REPEAT START TRANSACTION; UNTIL 1 END REPEAT", DialectMySQL, txForGood},
		{"IF 1 = 1 THEN START TRANSACTION; END IF", DialectMySQL, txForGood},
		{"REPEAT START TRANSACTION; UNTIL 1 END REPEAT", DialectUnknown, txForGood},
		{"SELECT 'BEGIN'", DialectUnknown, 0},
		{"SELECT 1", DialectUnknown, 0},
	} {
		if got := txControl(tc.d, tc.q); got != tc.want {
			t.Errorf("txControl(%v, %q) = %d, want %d", tc.d, tc.q, got, tc.want)
		}
	}
}

// issue 9 item 1: a statement-level retry needs the server to have rolled
// back everything the call did. The fake server's script makes the first
// part of each text take effect (ran) and the call fail with an error the
// server rolls a single statement back for.
func TestRolledBackPartOfACallIsNotRerun(t *testing.T) {
	lockTimeoutPG := error(&pgError{"55P03", "canceling statement due to lock timeout"})
	for _, tc := range []struct {
		name string
		d    Dialect
		q    string
		err  error
	}{
		{"mysql multi-statement", DialectMySQL, "INSERT INTO t VALUES (1); UPDATE t SET n = 2 WHERE id = 7", errLockWaitMy},
		{"mysql multi-statement deadlock", DialectMySQL, "INSERT INTO t VALUES (1);\nDELETE FROM t WHERE id = 7", errDeadlockMy},
		{"mysql call", DialectMySQL, "CALL transfer(1, 2)", errLockWaitMy},
		{"mysql compound", DialectMySQL, "BEGIN NOT ATOMIC INSERT INTO t VALUES (1); UPDATE t SET n = 2; END", errLockWaitMy},
		{"pg call", DialectPostgres, "CALL transfer(1, 2)", lockTimeoutPG},
		{"pg do", DialectPostgres, "DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; UPDATE t SET n = 2; END $$", lockTimeoutPG},
		{"pg multi-statement", DialectPostgres, "INSERT INTO t VALUES (1); COMMIT; UPDATE t SET n = 2", errSerialization},
		{"pg dblink", DialectPostgres, "UPDATE t SET n = (SELECT n FROM dblink('remote', 'UPDATE u SET n = n + 1 RETURNING n') AS r(n int))", errDeadlockPG},
		{"unknown dialect", DialectUnknown, "INSERT INTO t VALUES (1) # \n; UPDATE t SET n = 2", errSerialization},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(tc.q[:6], step{err: tc.err, ran: true})
			db, _ := testDB(t, srv, WithDialect(tc.d))
			_, err := db.Exec(tc.q)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v at once", err, tc.err)
			}
			if n := srv.ranCount(tc.q[:6]); n != 1 {
				t.Errorf("the call ran %d times, want 1", n)
			}
			if s := stats(t, db); s.RetriesStatement != 0 {
				t.Errorf("RetriesStatement = %d, want 0", s.RetriesStatement)
			}
		})
	}
	t.Run("idempotent call is retried", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("CALL", step{err: errDeadlockPG})
		db, _ := testDB(t, srv, WithDialect(DialectPostgres))
		if _, err := db.ExecContext(Idempotent(context.Background()), "CALL refresh_totals()"); err != nil {
			t.Fatalf("Exec: %v", err)
		}
	})
	t.Run("mysql call leaves the connection manual", func(t *testing.T) {
		// A MySQL procedure may START TRANSACTION or SET autocommit = 0
		// and return with it so: later statements on that connection are
		// not retried one by one.
		srv := newFakeServer()
		db, _ := testDB(t, srv, WithDialect(DialectMySQL))
		db.SetMaxOpenConns(1)
		if _, err := db.Exec("CALL open_work()"); err != nil {
			t.Fatal(err)
		}
		srv.script("UPDATE", step{err: errDeadlockMy})
		if _, err := db.Exec("UPDATE t SET n = 1"); !errors.Is(err, errDeadlockMy) {
			t.Fatalf("err = %v, want the deadlock returned", err)
		}
	})
	t.Run("one statement is still retried", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("UPDATE", step{err: errLockWaitMy})
		db, _ := testDB(t, srv, WithDialect(DialectMySQL))
		if _, err := db.Exec("UPDATE t SET n = ';' WHERE id = 7;"); err != nil {
			t.Fatalf("Exec: %v", err)
		}
	})
}

// issue 9 item 2: a write that the old reader took for a read was re-run
// after a lost connection. Each text reaches the server as a query; its
// reply is lost after it ran.
func TestLostWriteThatLooksLikeAReadIsNotRerun(t *testing.T) {
	for _, tc := range []struct {
		d Dialect
		q string
	}{
		{DialectPostgres, "SELECT '{\"n\":1}'::jsonb #>> '{n}' AS n, (WITH d AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT 1)"},
		{DialectPostgres, "WITH s AS (SELECT '{}'::jsonb #- '{a}' AS j), i AS (INSERT INTO t SELECT 1 RETURNING 1) SELECT * FROM s"},
		{DialectPostgres, "SELECT 1 #>> 2\n; DELETE FROM t RETURNING 1"},
		{DialectPostgres, "SELECT 'a\\'; DELETE FROM t RETURNING 1; --'"},
		{DialectPostgres, "SELECT n FROM t FOR NO KEY UPDATE"},
		{DialectPostgres, "SELECT pg_advisory_lock(1)"},
		{DialectMySQL, "SELECT 1 --x\n; DELETE FROM t"},
		{DialectMySQL, "SELECT 'a\\'; DELETE FROM t; -- '"},
		{DialectMySQL, "SELECT n FROM t /*!50000 FOR UPDATE */"},
		{DialectMySQL, "SELECT n FROM t LOCK IN SHARE MODE"},
		{DialectMySQL, "SELECT NEXT VALUE FOR s"},
		{DialectUnknown, "SELECT 1 # x\n; DELETE FROM t"},
	} {
		t.Run(tc.q, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(tc.q[:6], step{err: errLost, ran: true})
			db, _ := testDB(t, srv, WithDialect(tc.d))
			_, err := db.Query(tc.q)
			if !errors.Is(err, ErrAmbiguousCommit) {
				t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
			}
			if n := srv.ranCount(tc.q[:6]); n != 1 {
				t.Errorf("ran %d times, want 1", n)
			}
		})
	}
}

// issue 9 item 3: COMMIT AND CHAIN (and ROLLBACK AND CHAIN) leaves a
// transaction open; statements in it are not retried one by one (MySQL
// rolled the whole chained transaction back at the deadlock).
func TestChainedTransactionIsNotRetried(t *testing.T) {
	for _, tc := range []struct {
		d         Dialect
		begin, ch string
	}{
		{DialectMySQL, "BEGIN", "COMMIT AND CHAIN"},
		{DialectMySQL, "START TRANSACTION", "commit work and chain"},
		{DialectMySQL, "BEGIN", "ROLLBACK AND CHAIN"},
		{DialectPostgres, "BEGIN", "COMMIT AND CHAIN"},
		{DialectPostgres, "START TRANSACTION", "END AND CHAIN"},
		{DialectUnknown, "BEGIN", "COMMIT /* c */ AND CHAIN"},
		{DialectMySQL, "SELECT 1; BEGIN", "COMMIT AND CHAIN"},
	} {
		t.Run(tc.begin+"/"+tc.ch, func(t *testing.T) {
			srv := newFakeServer()
			db, _ := testDB(t, srv, WithDialect(tc.d))
			db.SetMaxOpenConns(1)
			for _, q := range []string{tc.begin, "INSERT INTO t VALUES (1)", tc.ch} {
				if _, err := db.Exec(q); err != nil {
					t.Fatal(err)
				}
			}
			srv.script("UPDATE", step{err: errDeadlockMy})
			if _, err := db.Exec("UPDATE t SET n = 1"); !errors.Is(err, errDeadlockMy) {
				t.Fatalf("err = %v, want the deadlock returned", err)
			}
			if n := srv.ranCount("UPDATE"); n != 0 {
				t.Errorf("UPDATE ran %d times after a deadlock in the chained transaction", n)
			}
			// The chained transaction ends with a plain COMMIT; then the
			// connection is in autocommit again.
			db.Exec("ROLLBACK")
			srv.script("UPDATE", step{err: errDeadlockMy})
			if _, err := db.Exec("UPDATE t SET n = 1"); err != nil {
				t.Fatalf("after ROLLBACK, autocommit retries apply again: %v", err)
			}
		})
	}
}

// attack9: a transaction opened by hand with a BEGIN MariaDB runs but the
// reader missed (under SET STATEMENT ... FOR, inside a compound statement)
// was invisible: a deadlock victim in it was retried alone in autocommit.
func TestHiddenHandTxIsNotRetried(t *testing.T) {
	for _, begin := range []string{
		"SET STATEMENT sql_mode='' FOR BEGIN",
		"SET STATEMENT max_statement_time=10 FOR START TRANSACTION",
		"REPEAT START TRANSACTION; UNTIL 1 END REPEAT",
		"IF 1 = 1 THEN START TRANSACTION; END IF",
		"DECLARE v INT; BEGIN START TRANSACTION; END",
		"<<l>> LOOP START TRANSACTION; EXIT l; END LOOP l",
		"/*!BEGIN*/",
	} {
		t.Run(begin, func(t *testing.T) {
			srv := newFakeServer()
			db, _ := testDB(t, srv, WithDialect(DialectMySQL))
			db.SetMaxOpenConns(1)
			for _, q := range []string{begin, "UPDATE t SET n = n - 1 WHERE id = 1"} {
				if _, err := db.Exec(q); err != nil {
					t.Fatal(err)
				}
			}
			srv.script("UPDATE t SET n = n + 1", step{err: errDeadlockMy})
			if _, err := db.Exec("UPDATE t SET n = n + 1 WHERE id = 2"); !errors.Is(err, errDeadlockMy) {
				t.Fatalf("err = %v, want the deadlock returned", err)
			}
			if n := srv.ranCount("UPDATE t SET n = n + 1"); n != 0 {
				t.Errorf("the deadlock victim ran %d times after the hand-opened transaction was rolled back", n)
			}
		})
	}
}

// A connection made manual for good (SET autocommit = 0) stays so through
// BEGIN ... COMMIT: COMMIT does not turn autocommit back on.
func TestManualForGoodSurvivesCommit(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	db.SetMaxOpenConns(1)
	for _, q := range []string{"SET autocommit = 0", "BEGIN", "COMMIT"} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	srv.script("UPDATE", step{err: errDeadlockMy})
	if _, err := db.Exec("UPDATE t SET n = 1"); !errors.Is(err, errDeadlockMy) {
		t.Fatalf("err = %v, want the deadlock returned", err)
	}
}

func FuzzSQLText(f *testing.F) {
	for _, s := range []string{"SELECT 1", "WITH x AS (DELETE FROM t) SELECT 1", "SELECT $a$ x $a$", "/*", "'", "ROLLBACK TO s", "--\n#\n/**/", "COMMIT AND CHAIN"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, q string) {
		for _, d := range []Dialect{DialectUnknown, DialectPostgres, DialectMySQL} {
			if isReadQuery(d, q) && !isAtomicStatement(d, q) {
				t.Errorf("%v %q: a read that is not one atomic statement", d, q)
			}
			_ = txControl(d, q)
		}
		_ = isRollbackToSavepoint(q)
	})
}

// The reader runs on every autocommit statement (txControl) and on every
// query in a transaction (isReadQuery).
var benchQueries = []string{
	"SELECT id, name, balance FROM accounts WHERE id = $1",
	"UPDATE accounts SET balance = balance + $1 WHERE id = $2",
	"INSERT INTO ledger (account_id, amount, note) VALUES ($1, $2, 'transfer: it''s done')",
	"/* app=api */ SELECT o.id, o.total FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.email = $1 ORDER BY o.created_at DESC LIMIT 20",
	"BEGIN",
	"COMMIT",
}

func BenchmarkTxControl(b *testing.B) {
	for _, d := range []Dialect{DialectPostgres, DialectMySQL} {
		b.Run(d.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				for _, q := range benchQueries {
					txControl(d, q)
				}
			}
		})
	}
}

func BenchmarkIsReadQuery(b *testing.B) {
	for _, d := range []Dialect{DialectPostgres, DialectMySQL} {
		b.Run(d.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				for _, q := range benchQueries {
					isReadQuery(d, q)
				}
			}
		})
	}
}
