package sqltext

import "testing"

// Verdicts per dialect: P is PostgreSQL, M is MySQL; Unknown must be the
// AND of both.
type verdict struct{ p, m bool }

var readCases = []struct {
	q    string
	read verdict
}{
	{"SELECT 1", verdict{true, true}},
	{"  select n from t where id = $1", verdict{true, true}},
	{"/* c */ SELECT n FROM t", verdict{true, true}},
	{"-- c\nSELECT n FROM t", verdict{true, true}},
	{"(SELECT 1) UNION (SELECT 2)", verdict{true, true}},
	{"WITH x AS (SELECT 1) SELECT * FROM x", verdict{true, true}},
	{"SHOW TABLES", verdict{true, true}},
	{"EXPLAIN SELECT 1", verdict{true, true}},
	{"VALUES (1)", verdict{true, true}},
	{"TABLE t", verdict{true, true}},
	{"SELECT 'INSERT INTO t' AS s", verdict{true, true}},
	{`SELECT "update" FROM t`, verdict{true, true}},
	{"SELECT 1;", verdict{true, true}},
	{"SELECT 1; -- done\n", verdict{true, true}},
	{"SELECT replace(a, 'x', 'y') FROM t", verdict{true, true}},
	{"SELECT * FROM t OFFSET 1 ROWS FETCH NEXT 2 ROWS ONLY", verdict{true, true}},

	// PostgreSQL: # is an operator, not a comment (issue 9 item 2).
	{"SELECT '{\"n\":1}'::jsonb #>> '{n}'\nWITH d AS (DELETE FROM t RETURNING 1) SELECT 1", verdict{false, false}},
	{"WITH x AS (SELECT '{\"a\":1}'::jsonb #>> '{a}' AS v), d AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT * FROM x", verdict{false, false}},
	{"SELECT 1 # 2\n; DELETE FROM t", verdict{false, false}},
	{"SELECT 1 #- '{a}'", verdict{true, true}}, // MySQL: "#" comments out the rest
	{"SELECT '{\"a\":1}'::jsonb ?| array['a']", verdict{true, true}},
	// MySQL: "--" without white space after it is two minuses.
	{"SELECT 1 --1\n, 2", verdict{true, true}},
	{"SELECT 1 --x\n; DELETE FROM t", verdict{false, false}},
	{"SELECT 1 --\tx\n", verdict{true, true}},
	// Backslashes: standard-conforming strings have none; E'' strings do.
	{`SELECT 'a\'; DELETE FROM t; --'`, verdict{false, false}},
	{`SELECT E'a\'; DELETE FROM t; --'`, verdict{true, false}},
	{`SELECT 'a\\'`, verdict{true, true}},
	{`SELECT "a\"; DELETE FROM t; --"`, verdict{false, false}},
	// Nested block comments (PostgreSQL) and executable ones (MySQL).
	{"SELECT 1 /* a /* b */ ; DELETE FROM t; */", verdict{true, false}},
	{"SELECT 1 /*!50000 FOR UPDATE */", verdict{true, false}},
	{"SELECT 1 /*M!100000 , GET_LOCK('a', 1) */", verdict{true, false}},
	{"SELECT 1 /*!; DELETE FROM t */", verdict{true, false}},
	{"SELECT /*+ MAX_EXECUTION_TIME(1) */ 1", verdict{true, true}},
	// Dollar quoting.
	{"SELECT $$DELETE$$", verdict{true, true}}, // MySQL: one name
	{"SELECT $a$ ; DELETE $a$", verdict{true, false}},
	{"SELECT $a$ x $b$ ; $a$ FROM t", verdict{true, false}},
	{"SELECT $1, $2", verdict{true, true}},
	{"SELECT $a$ unterminated", verdict{false, true}},
	// Numbers end where a name begins: 1.5into is 1.5 INTO.
	{"SELECT 1into t2", verdict{false, false}},
	{"SELECT 1.5into @x", verdict{false, false}},
	{"SELECT 1e5into @x", verdict{false, false}},
	{"SELECT $1into t2", verdict{false, true}}, // MySQL: one name
	{"SELECT 1e5, .5, 1.5e-3", verdict{true, true}},
	// Several statements.
	{"SELECT 1; SELECT 2", verdict{false, false}},
	{"SELECT 1; DELETE FROM t", verdict{false, false}},
	// Writes and locking reads.
	{"INSERT INTO t VALUES (1)", verdict{false, false}},
	{"UPDATE t SET n = 1", verdict{false, false}},
	{"REPLACE INTO t VALUES (1)", verdict{false, false}},
	{"WITH c AS (SELECT 1) REPLACE t SELECT * FROM c", verdict{false, false}},
	{"WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", verdict{false, false}},
	{"WITH m AS (MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE RETURNING 1) SELECT 1", verdict{false, false}},
	{"SELECT * INTO t2 FROM t", verdict{false, false}},
	{"SELECT a INTO @x FROM t", verdict{false, false}},
	{"SELECT a FROM t INTO OUTFILE '/tmp/x'", verdict{false, false}},
	{"SELECT n FROM t FOR UPDATE", verdict{false, false}},
	{"SELECT n FROM t FOR NO KEY UPDATE", verdict{false, false}},
	{"SELECT n FROM t FOR SHARE", verdict{false, false}},
	{"SELECT n FROM t FOR KEY SHARE SKIP LOCKED", verdict{false, false}},
	{"SELECT n FROM t LOCK IN SHARE MODE", verdict{false, false}},
	{"EXPLAIN ANALYZE DELETE FROM t", verdict{false, false}},
	{"EXPLAIN (ANALYZE, BUFFERS) SELECT 1", verdict{false, false}},
	{`EXPLAIN ("analyze") DELETE FROM t`, verdict{false, false}},
	{"EXPLAIN DELETE FROM t", verdict{false, false}},
	{"DESCRIBE DELETE FROM t", verdict{false, false}},
	{"ANALYZE SELECT 1", verdict{false, false}},
	{"CALL proc()", verdict{false, false}},
	{"DO $$ BEGIN PERFORM 1; END $$", verdict{false, false}},
	// Functions with side effects.
	{"SELECT nextval('s')", verdict{false, false}},
	{"SELECT pg_catalog.nextval('s')", verdict{false, false}},
	{`SELECT "nextval"('s')`, verdict{false, false}},
	{`SELECT U&"nextv\0061l"('s')`, verdict{false, true}},
	{"SELECT setval('s', 5)", verdict{false, false}},
	{"SELECT pg_advisory_lock(1)", verdict{false, false}},
	{"SELECT pg_try_advisory_xact_lock(1)", verdict{false, false}},
	{"SELECT pg_notify('c', 'x')", verdict{false, false}},
	{"SELECT * FROM dblink('x', 'DELETE FROM t') AS r(n int)", verdict{false, false}},
	{"SELECT dblink_exec('x', 'DELETE FROM t')", verdict{false, false}},
	{"SELECT lo_unlink(1)", verdict{false, false}},
	{"SELECT set_config('a.b', 'c', false)", verdict{false, false}},
	{"SELECT pg_terminate_backend(1)", verdict{false, false}},
	{"SELECT txid_current()", verdict{false, false}},
	{"SELECT GET_LOCK('x', 1)", verdict{false, false}},
	{"SELECT `GET_LOCK`('x', 1)", verdict{false, false}},
	{"SELECT RELEASE_LOCK('x')", verdict{false, false}},
	{"SELECT NEXT VALUE FOR s", verdict{false, false}},
	{"SELECT query_to_xml('DELETE FROM t RETURNING 1', true, true, '')", verdict{false, false}},
	// Not terminated, or bytes the server rejects.
	{"SELECT 'unterminated", verdict{false, false}},
	{"/* unterminated SELECT 1", verdict{false, false}},
	{"SELECT 1 /* a /* b */", verdict{false, true}},
	{"SELECT (1", verdict{false, false}},
	{"SELECT 1)", verdict{false, false}},
	{"SELECT (1 # )\n)", verdict{false, true}},
	{"SELECT 1\x00; DELETE FROM t", verdict{false, false}},
	{"SELECT \\N", verdict{false, false}},
	{"SELECT 1 /*\x00*/", verdict{false, true}},
	{"", verdict{false, false}},
	{";", verdict{false, false}},
	{"BEGIN", verdict{false, false}},
	{"SET x = 1", verdict{false, false}},
}

func TestIsRead(t *testing.T) {
	for _, c := range readCases {
		if got := IsRead(Postgres, c.q); got != c.read.p {
			t.Errorf("IsRead(Postgres, %q) = %v, want %v", c.q, got, c.read.p)
		}
		if got := IsRead(MySQL, c.q); got != c.read.m {
			t.Errorf("IsRead(MySQL, %q) = %v, want %v", c.q, got, c.read.m)
		}
		if got, want := IsRead(Unknown, c.q), c.read.p && c.read.m; got != want {
			t.Errorf("IsRead(Unknown, %q) = %v, want %v", c.q, got, want)
		}
	}
}

func TestIsAtomic(t *testing.T) {
	for _, c := range []struct {
		q      string
		atomic verdict
	}{
		{"SELECT 1", verdict{true, true}},
		{"UPDATE t SET n = n + 1 WHERE id = 1", verdict{true, true}},
		{"INSERT INTO t VALUES (nextval('s'))", verdict{true, true}},
		{"INSERT INTO t VALUES (1);", verdict{true, true}},
		{"WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d", verdict{true, true}},
		{"DELETE FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", verdict{true, true}},
		{"INSERT INTO t VALUES (1); UPDATE t SET n = 2", verdict{false, false}},
		{"INSERT INTO t VALUES (';'); UPDATE t SET n = 2", verdict{false, false}},
		{"INSERT INTO t VALUES ('a\\'); UPDATE t SET n = 2; -- ')", verdict{false, false}},
		{"INSERT INTO t VALUES (1) /*!; UPDATE t SET n = 2 */", verdict{true, false}},
		{"CALL p()", verdict{false, false}},
		{"call p()", verdict{false, false}},
		{"DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$", verdict{false, false}},
		{"EXECUTE s", verdict{false, false}},
		{"BEGIN NOT ATOMIC INSERT INTO t VALUES (1); END", verdict{false, false}},
		{"BEGIN", verdict{false, false}},
		{"COMMIT", verdict{false, false}},
		{"START TRANSACTION", verdict{false, false}},
		{"SELECT dblink_exec('x', 'INSERT INTO t VALUES (1)')", verdict{false, false}},
		{"UPDATE t SET n = GET_LOCK('x', 1)", verdict{false, false}},
		{"SELECT pg_advisory_lock(1)", verdict{false, false}},
		{"SELECT pg_advisory_xact_lock(1)", verdict{true, true}},
		{"LOCK TABLES t WRITE", verdict{false, false}},
		{"CREATE INDEX CONCURRENTLY i ON t (n)", verdict{false, false}},
		{"", verdict{false, false}},
		{"UPDATE t SET s = 'unterminated", verdict{false, false}},
	} {
		if got := IsAtomic(Postgres, c.q); got != c.atomic.p {
			t.Errorf("IsAtomic(Postgres, %q) = %v, want %v", c.q, got, c.atomic.p)
		}
		if got := IsAtomic(MySQL, c.q); got != c.atomic.m {
			t.Errorf("IsAtomic(MySQL, %q) = %v, want %v", c.q, got, c.atomic.m)
		}
		if got, want := IsAtomic(Unknown, c.q), c.atomic.p && c.atomic.m; got != want {
			t.Errorf("IsAtomic(Unknown, %q) = %v, want %v", c.q, got, want)
		}
	}
}

func TestTxControl(t *testing.T) {
	for _, c := range []struct {
		q    string
		p, m int
	}{
		{"BEGIN", TxOpens, TxOpens},
		{"begin isolation level serializable", TxOpens, TxOpens},
		{"BEGIN WORK", TxOpens, TxOpens},
		{"START TRANSACTION", TxOpens, TxOpens},
		{"START TRANSACTION READ ONLY", TxOpens, TxOpens},
		{"/* x */ BEGIN", TxOpens, TxOpens},
		{"INSERT INTO t VALUES (1); BEGIN", TxOpens, TxOpens},
		{"BEGIN; INSERT INTO t VALUES (1)", TxOpens, TxOpens},
		{"BEGIN; INSERT INTO t VALUES (1); COMMIT", TxEnds, TxEnds},
		{"COMMIT", TxEnds, TxEnds},
		{"COMMIT WORK", TxEnds, TxEnds},
		{"COMMIT AND CHAIN", TxOpens, TxOpens},
		{"commit work and chain", TxOpens, TxOpens},
		{"COMMIT AND NO CHAIN", TxEnds, TxEnds},
		{"COMMIT RELEASE", TxEnds, TxEnds},
		{"COMMIT AND NO CHAIN NO RELEASE", TxEnds, TxEnds},
		{"ROLLBACK", TxEnds, TxEnds},
		{"ROLLBACK AND CHAIN", TxOpens, TxOpens},
		{"ROLLBACK TO SAVEPOINT a", TxNone, TxNone},
		{"rollback work to a", TxNone, TxNone},
		{"ROLLBACK PREPARED 'x'", TxNone, TxNone},
		{"COMMIT PREPARED 'x'", TxNone, TxNone},
		{"END", TxEnds, TxEnds},
		{"END AND CHAIN", TxOpens, TxOpens},
		{"ABORT", TxEnds, TxEnds},
		{"PREPARE TRANSACTION 'x'", TxEnds, TxEnds},
		{"PREPARE s FROM 'SELECT 1'", TxNone, TxNone},
		{"SET autocommit = 0", TxForGood, TxForGood},
		{"set session autocommit=off", TxForGood, TxForGood},
		{"SET @@session.autocommit = 0", TxForGood, TxForGood},
		{"SET completion_type = CHAIN", TxForGood, TxForGood},
		{"INSERT INTO t VALUES (1); SET autocommit = 0; COMMIT", TxForGood, TxForGood},
		{"XA START 'x'", TxForGood, TxForGood},
		{"CALL p()", TxNone, TxForGood},
		{"EXECUTE s", TxNone, TxForGood},
		{"BEGIN NOT ATOMIC START TRANSACTION; END", TxEnds, TxForGood},
		{"l1: BEGIN NOT ATOMIC END l1", TxNone, TxForGood},
		{"DO $$ BEGIN COMMIT; END $$", TxNone, TxEnds},
		{"SELECT 'COMMIT'", TxNone, TxNone},
		{"SELECT 1 -- ; COMMIT", TxNone, TxNone},
		{"SELECT 1 # ; COMMIT\n", TxEnds, TxNone},
		{"SET search_path = x", TxNone, TxNone},
		{"SELECT 1", TxNone, TxNone},
		{"INSERT INTO b VALUES (1)", TxNone, TxNone},
		{"START SLAVE", TxNone, TxNone},
		{"\vCALL p()", TxNone, TxForGood},
		{"COMMIT\x00PREPARED 'x'", TxEnds, TxNone}, // PostgreSQL sees "COMMIT"
	} {
		if got := TxControl(Postgres, c.q); got != c.p {
			t.Errorf("TxControl(Postgres, %q) = %d, want %d", c.q, got, c.p)
		}
		if got := TxControl(MySQL, c.q); got != c.m {
			t.Errorf("TxControl(MySQL, %q) = %d, want %d", c.q, got, c.m)
		}
		want := c.p
		if rank(c.m) > rank(want) {
			want = c.m
		}
		if got := TxControl(Unknown, c.q); got != want {
			t.Errorf("TxControl(Unknown, %q) = %d, want %d", c.q, got, want)
		}
	}
}

func TestIsRollbackToSavepoint(t *testing.T) {
	for q, want := range map[string]bool{
		"ROLLBACK TO SAVEPOINT a":                        true,
		"rollback work to a":                             true,
		"ROLLBACK TRANSACTION TO SAVEPOINT a;":           true,
		"ROLLBACK":                                       false,
		"ROLLBACK TO a; INSERT INTO t VALUES (1)":        false,
		"ROLLBACK TO a /*!; INSERT INTO t VALUES (1) */": false,
		"SELECT 'ROLLBACK TO a'":                         false,
	} {
		if got := IsRollbackToSavepoint(q); got != want {
			t.Errorf("IsRollbackToSavepoint(%q) = %v, want %v", q, got, want)
		}
	}
}

// The reader is on every statement's path: it must not allocate.
func TestReaderDoesNotAllocate(t *testing.T) {
	q := "WITH x AS (SELECT id, \"name\" FROM accounts WHERE id = $1) SELECT * FROM x JOIN t USING (id) -- c\n"
	for _, d := range []Dialect{Unknown, Postgres, MySQL} {
		if n := testing.AllocsPerRun(100, func() {
			IsRead(d, q)
			IsAtomic(d, q)
			TxControl(d, q)
			TxControl(d, "COMMIT AND CHAIN; SELECT 1")
			IsRollbackToSavepoint("ROLLBACK TO a")
		}); n != 0 {
			t.Errorf("dialect %d: %v allocations", d, n)
		}
	}
}

func FuzzReader(f *testing.F) {
	for _, c := range readCases {
		f.Add(c.q)
	}
	for _, q := range []string{"/* a */ SELECT 1", "-- a\nBEGIN", "lbl: BEGIN NOT ATOMIC END", "select 1 /* ; */", "CALL p()", "x /* c */ : BEGIN", "COMMIT AND CHAIN", "rollback work and no chain release", "BEGIN NOT ATOMIC", "START TRANSACTION", "SET autocommit"} {
		f.Add(q)
	}
	f.Fuzz(func(t *testing.T, q string) {
		for _, d := range []Dialect{Unknown, Postgres, MySQL} {
			read, atomic := IsRead(d, q), IsAtomic(d, q)
			if read && TxControl(d, q) != TxNone {
				t.Errorf("%q: a read with transaction control", q)
			}
			if atomic && TxControl(d, q) != TxNone {
				t.Errorf("%q: atomic with transaction control", q)
			}
		}
		if _, ok := wordsOnlyTx(Unknown, q); ok {
			for _, d := range []Dialect{Unknown, Postgres, MySQL} {
				fast, _ := wordsOnlyTx(d, q)
				if slow := txControlRead(d, q); fast != slow {
					t.Errorf("%q: the words-only path says %d, the lexer says %d", q, fast, slow)
				}
			}
		}
		if plainFirstWord(q) {
			for _, d := range []Dialect{Unknown, Postgres, MySQL} {
				if tx := txControlRead(d, q); tx != TxNone {
					t.Errorf("%q: the fast path says no transaction control, the lexer says %d", q, tx)
				}
			}
		}
		if IsRead(Unknown, q) && !(IsRead(Postgres, q) && IsRead(MySQL, q)) {
			t.Errorf("%q: Unknown says read, a dialect does not", q)
		}
	})
}
