package sqlretry

import (
	"errors"
	"testing"
)

// A MySQL statement that assigns a user variable is not run again after
// the server rolled it back: the rollback undoes its rows, not the
// variable, so the second run starts from the first run's values
// (UPDATE t SET r = (@r := @r + 1) ranks 7..16 instead of 1..10).
func TestUserVariableAssignmentIsNotRerunAfterRollback(t *testing.T) {
	for _, tc := range []struct {
		d Dialect
		q string
	}{
		{DialectMySQL, "UPDATE t SET r = (@r := @r + 1)"},
		{DialectMySQL, "UPDATE t SET r = (@r:=@r+1) ORDER BY score DESC"},
		{DialectMySQL, "INSERT INTO ranks SELECT @i := @i + 1, id FROM t ORDER BY score"},
		{DialectMySQL, "DELETE FROM t WHERE (@n := @n + 1) > 3"},
		{DialectMySQL, "INSERT INTO t (a) VALUES (1) ON DUPLICATE KEY UPDATE a = (@old := a) + 1"},
		{DialectMySQL, "SELECT a INTO @x FROM t WHERE id = 7 FOR UPDATE"},
		{DialectMySQL, "SELECT a FROM t WHERE id = 7 FOR UPDATE INTO @x"},
		{DialectUnknown, "UPDATE t SET r = (@r := @r + 1)"},
	} {
		t.Run(tc.q, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(tc.q, step{err: errLockWaitMy, ran: true})
			db, _ := testDB(t, srv, WithDialect(tc.d))
			_, err := db.Exec(tc.q)
			if !errors.Is(err, errLockWaitMy) {
				t.Fatalf("err = %v, want the lock-wait timeout returned at once", err)
			}
			if n := srv.ranCount(tc.q); n != 1 {
				t.Errorf("ran %d times, want 1", n)
			}
			if s := stats(t, db); s.RetriesStatement != 0 {
				t.Errorf("RetriesStatement = %d, want 0", s.RetriesStatement)
			}
		})
	}
	// The same statements without an assignment are still retried; a
	// variable that is only read is not changed by the statement.
	for _, q := range []string{
		"UPDATE t SET r = r + 1",
		"UPDATE t SET r = @r + 1 WHERE id = @id",
		"UPDATE t SET s = ':=' WHERE id = 7",
		"UPDATE t SET s = 1 /* @r := 0 */ WHERE id = 7",
	} {
		t.Run("retried/"+q, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(q, step{err: errLockWaitMy, ran: true})
			db, _ := testDB(t, srv, WithDialect(DialectMySQL))
			if _, err := db.Exec(q); err != nil {
				t.Fatalf("Exec: %v", err)
			}
			if n := srv.ranCount(q); n != 2 {
				t.Errorf("ran %d times, want 2", n)
			}
		})
	}
}

// A text run through a function that executes an SQL string (ts_stat,
// ts_rewrite, crosstab, ...) or a function that writes or changes the
// server's state is not a read: after the connection was lost once the
// server had it, it is ErrAmbiguousCommit, not run again. The same for a
// MySQL SELECT that assigns a user variable (it changes session state).
func TestLostSideEffectSelectIsNotRerun(t *testing.T) {
	for _, tc := range []struct {
		d Dialect
		q string
	}{
		{DialectPostgres, "SELECT word FROM ts_stat('SELECT to_tsvector(lo_from_bytea(0, ''probe2'')::text)')"},
		{DialectPostgres, "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, (lo_from_bytea(0, ''probe2'')::text)::tsquery')::text"},
		{DialectPostgres, "SELECT * FROM crosstab('SELECT a, b, lo_from_bytea(0, ''x'')::text FROM t') AS c(a int, b text)"},
		{DialectPostgres, "SELECT query_to_xml_and_xmlschema('DELETE FROM t RETURNING 1', true, true, '')"},
		{DialectPostgres, "SELECT pg_stat_statements_reset()"},
		{DialectPostgres, "SELECT brin_summarize_new_values('i')"},
		{DialectPostgres, "SELECT brin_summarize_range('i', 0)"},
		{DialectPostgres, "SELECT brin_desummarize_range('i', 0)"},
		{DialectPostgres, "SELECT gin_clean_pending_list('i')"},
		{DialectPostgres, "SELECT pg_restore_relation_stats('relation', 't'::regclass, 'relpages', 1)"},
		{DialectPostgres, "SELECT pg_clear_attribute_stats('public', 't', 'a', false)"},
		{DialectPostgres, "SELECT pg_sync_replication_slots()"},
		{DialectPostgres, "SELECT pg_switch_xlog()"},
		{DialectPostgres, "SELECT pg_create_logical_replication_slot('s', 'pgoutput')"},
		{DialectPostgres, "SELECT lowrite(0, 'x')"},
		{DialectPostgres, "SELECT pg_log_standby_snapshot()"},
		{DialectMySQL, "SELECT @r := @r + 1 AS rank, name FROM t ORDER BY score"},
		{DialectUnknown, "SELECT word FROM ts_stat('SELECT 1')"},
	} {
		t.Run(tc.q, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(tc.q, step{err: errLost, ran: true})
			db, _ := testDB(t, srv, WithDialect(tc.d))
			rows, err := db.Query(tc.q)
			if err == nil {
				rows.Close()
			}
			if !errors.Is(err, ErrAmbiguousCommit) {
				t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
			}
			if n := srv.ranCount(tc.q); n != 1 {
				t.Errorf("ran %d times, want 1", n)
			}
		})
	}
	// A PostgreSQL named argument (f(a := 1)) is not a MySQL assignment.
	t.Run("pg named argument is still a read", func(t *testing.T) {
		q := "SELECT format_it(a := 1)"
		srv := newFakeServer()
		srv.script(q, step{err: errLost, ran: true})
		db, _ := testDB(t, srv, WithDialect(DialectPostgres))
		rows, err := db.Query(q)
		if err != nil {
			t.Fatalf("Query: %v", err)
		}
		rows.Close()
		if n := srv.ranCount(q); n != 2 {
			t.Errorf("ran %d times, want 2", n)
		}
	})
}
