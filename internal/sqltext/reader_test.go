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
	// Functions that run an SQL text they are given, or that write or
	// change the server's state.
	{"SELECT word FROM ts_stat('SELECT to_tsvector(lo_from_bytea(0, ''x'')::text)')", verdict{false, false}},
	{"SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery')", verdict{false, false}},
	{"SELECT * FROM pg_catalog.ts_stat('SELECT v FROM t', 'ab')", verdict{false, false}},
	{"SELECT query_to_xml_and_xmlschema('SELECT 1', true, true, '')", verdict{false, false}},
	{"SELECT cursor_to_xmlschema('c', true, true, '')", verdict{false, false}},
	{"SELECT * FROM crosstab('SELECT 1, 2, 3') AS c(a int, b int)", verdict{false, false}},
	{"SELECT * FROM crosstab3('SELECT 1, 2, 3')", verdict{false, false}},
	{"SELECT * FROM connectby('t', 'id', 'parent', '1', 0) AS c(id int, p int, l int)", verdict{false, false}},
	{"SELECT * FROM xpath_table('id', 'x', 't', '/a', 'true') AS x(id int, a text)", verdict{false, false}},
	{"SELECT pg_stat_statements_reset()", verdict{false, false}},
	{"SELECT pg_stat_reset_shared('bgwriter')", verdict{false, false}},
	{"SELECT brin_summarize_new_values('i')", verdict{false, false}},
	{"SELECT brin_summarize_range('i', 0)", verdict{false, false}},
	{"SELECT brin_desummarize_range('i', 0)", verdict{false, false}},
	{"SELECT gin_clean_pending_list('i')", verdict{false, false}},
	{"SELECT pg_clear_relation_stats('public', 't')", verdict{false, false}},
	{"SELECT pg_restore_relation_stats('relation', 't'::regclass)", verdict{false, false}},
	{"SELECT pg_clear_attribute_stats('public', 't', 'a', false)", verdict{false, false}},
	{"SELECT pg_restore_attribute_stats('relation', 't'::regclass)", verdict{false, false}},
	{"SELECT pg_sync_replication_slots()", verdict{false, false}},
	{"SELECT pg_switch_xlog()", verdict{false, false}},
	{"SELECT pg_switch_wal()", verdict{false, false}},
	{"SELECT pg_xlog_replay_pause()", verdict{false, false}},
	{"SELECT pg_create_restore_point('x')", verdict{false, false}},
	{"SELECT pg_create_physical_replication_slot('s')", verdict{false, false}},
	{"SELECT pg_drop_replication_slot('s')", verdict{false, false}},
	{"SELECT pg_replication_slot_advance('s', '0/0')", verdict{false, false}},
	{"SELECT pg_logical_emit_message(true, 'p', 'x')", verdict{false, false}},
	{"SELECT pg_reload_conf()", verdict{false, false}},
	{"SELECT pg_rotate_logfile()", verdict{false, false}},
	{"SELECT pg_promote()", verdict{false, false}},
	{"SELECT pg_cancel_backend(1)", verdict{false, false}},
	{"SELECT pg_log_backend_memory_contexts(1)", verdict{false, false}},
	{"SELECT pg_log_standby_snapshot()", verdict{false, false}},
	{"SELECT pg_import_system_collations('pg_catalog')", verdict{false, false}},
	{"SELECT pg_file_write('f', 'x', false)", verdict{false, false}},
	{"SELECT pg_file_sync('f')", verdict{false, false}},
	{"SELECT dblink_send_query('c', 'DELETE FROM t')", verdict{false, false}},
	{"SELECT lowrite(0, 'x')", verdict{false, false}},
	{"SELECT loread(0, 10)", verdict{false, false}},
	{"SELECT pg_truncate_visibility_map('t')", verdict{false, false}},
	{"SELECT heap_force_kill('t', ARRAY['(0,1)']::tid[])", verdict{false, false}},
	{"SELECT pg_buffercache_evict(1)", verdict{false, false}},
	{"SELECT autoprewarm_dump_now()", verdict{false, false}},
	{"SELECT set_limit(0.5)", verdict{false, false}},
	{"SELECT pg_nextoid('t', 'oid', 't_oid_index')", verdict{false, false}},
	{"SELECT table_to_xml('t', true, true, '')", verdict{true, true}},
	{"SELECT xpath('/a', '<a/>'::xml)", verdict{true, true}},
	// MySQL user variables: an assignment changes session state.
	{"SELECT @r := @r + 1 AS rank, name FROM t", verdict{true, false}},
	{"SELECT @r:=@r+1", verdict{true, false}},
	{"SELECT a FROM t WHERE (@x := a) > 0", verdict{true, false}},
	{"SELECT @@session.sql_mode := 'ANSI'", verdict{true, false}},
	{"SELECT a FROM t INTO @x", verdict{false, false}},
	{"SELECT f(a := 1)", verdict{true, false}}, // PostgreSQL: a named argument
	{"SELECT @r, @@sql_mode", verdict{true, true}},
	{"SELECT ':=' AS s, `:=`", verdict{true, true}},
	{"SELECT 1 /* @r := 0 */", verdict{true, true}},
	{"SELECT 1 -- @r := 0\n", verdict{true, true}},
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
		// MySQL user variables are not rolled back with the statement.
		{"UPDATE t SET r = (@r := @r + 1)", verdict{true, false}},
		{"UPDATE t SET r = (@r:=@r+1) ORDER BY s", verdict{true, false}},
		{"INSERT INTO u SELECT @i := @i + 1, id FROM t", verdict{true, false}},
		{"INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = (@o := a) + 1", verdict{true, false}},
		{"DELETE FROM t WHERE (@n := @n + 1) > 3", verdict{true, false}},
		{"SELECT a INTO @x FROM t FOR UPDATE", verdict{true, false}},
		{"SELECT a FROM t FOR UPDATE INTO @x, @y", verdict{true, false}},
		{"SELECT a FROM t INTO OUTFILE '/tmp/f'", verdict{true, false}},
		{"SELECT a FROM t FOR UPDATE INTO DUMPFILE '/tmp/f'", verdict{true, false}},
		{"SELECT a INTO outfile '/tmp/f' FROM t", verdict{true, false}},
		{"INSERT INTO t SELECT a FROM u", verdict{true, true}},
		{"SET @r := 0", verdict{false, false}},
		{"SET @@session.x := 1", verdict{false, false}},
		{"UPDATE t SET r = @r + 1 WHERE id = @id", verdict{true, true}},
		{"UPDATE t SET s = ':=', r = 1 /* @r := 1 */", verdict{true, true}},
		{"UPDATE t SET r = f(a := 1)", verdict{true, false}}, // PostgreSQL: a named argument
		// Functions whose effects a rollback does not undo.
		{"SELECT word FROM ts_stat('SELECT 1')", verdict{false, false}},
		{"UPDATE t SET n = (SELECT count(*) FROM ts_stat('SELECT v FROM u'))", verdict{false, false}},
		{"SELECT brin_summarize_new_values('i')", verdict{false, false}},
		{"SELECT gin_clean_pending_list('i')", verdict{false, false}},
		{"SELECT pg_stat_statements_reset()", verdict{false, false}},
		{"SELECT * FROM crosstab('SELECT 1, 2, 3') AS c(a int, b int)", verdict{false, false}},
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
		// MariaDB's SET STATEMENT var=value[, ...] FOR <statement>: the
		// statement after FOR is read as if alone (attack9).
		{"SET STATEMENT sql_mode='' FOR COMMIT", TxNone, TxEnds},
		{"SET STATEMENT sql_mode='' FOR ROLLBACK", TxNone, TxEnds},
		{"SET STATEMENT sql_mode='' FOR BEGIN", TxNone, TxOpens},
		{"set statement sql_mode='' for start transaction", TxNone, TxOpens},
		{"SET STATEMENT sql_mode='' FOR COMMIT AND CHAIN", TxNone, TxOpens},
		{"SET STATEMENT sql_mode='' FOR CALL p()", TxNone, TxForGood},
		{"SET STATEMENT sql_mode='' FOR BEGIN NOT ATOMIC SELECT 1; END", TxEnds, TxForGood},
		{"SET STATEMENT sql_mode='' FOR SET autocommit = 0", TxForGood, TxForGood},
		{"SET STATEMENT max_statement_time=10, sql_mode='a FOR b' FOR COMMIT", TxNone, TxEnds},
		{"SET STATEMENT sql_mode=(SELECT 'x' FOR UPDATE) FOR COMMIT", TxNone, TxEnds},
		{"SET STATEMENT a = NEXT VALUE FOR s FOR BEGIN", TxNone, TxOpens},
		{"SET STATEMENT a = PREVIOUS VALUE FOR s FOR BEGIN", TxNone, TxOpens},
		{"SET STATEMENT /* FOR COMMIT */ sql_mode='' FOR START TRANSACTION", TxNone, TxOpens},
		{"SET STATEMENT sql_mode='' FOR ROLLBACK TO SAVEPOINT a", TxNone, TxNone},
		{"SET STATEMENT sql_mode='' FOR INSERT INTO t VALUES (1)", TxNone, TxNone},
		{"SET STATEMENT sql_mode='' FOR SELECT * FROM t FOR UPDATE", TxNone, TxNone},
		{"SET STATEMENT sql_mode='' FOR INSERT INTO t VALUES (1); BEGIN", TxOpens, TxOpens},
		{"SET STATEMENT sql_mode='BEGIN' FOR SELECT 1", TxNone, TxNone},
		// MariaDB compound statements outside stored programs run what is
		// in them in an order the reader does not follow (a loop, a
		// branch): "cannot tell", like BEGIN NOT ATOMIC. PostgreSQL reads
		// "END IF" as END.
		{"REPEAT COMMIT; UNTIL 1 END REPEAT", TxNone, TxForGood},
		{"REPEAT START TRANSACTION; UNTIL 1 END REPEAT", TxNone, TxForGood},
		{"repeat set autocommit = 0; until 1 end repeat", TxNone, TxForGood},
		{"REPEAT INSERT INTO t VALUES (1); UNTIL 1 END REPEAT", TxNone, TxForGood},
		{"IF 1 = 1 THEN START TRANSACTION; END IF", TxEnds, TxForGood},
		{"CASE WHEN 1 = 1 THEN START TRANSACTION; END CASE", TxEnds, TxForGood},
		{"WHILE @a IS NULL DO SET @a = 1; START TRANSACTION; END WHILE", TxEnds, TxForGood},
		{"LOOP START TRANSACTION; LEAVE; END LOOP", TxEnds, TxForGood},
		{"FOR i IN 1..1 DO START TRANSACTION; END FOR", TxEnds, TxForGood},
		{"SET STATEMENT sql_mode='' FOR REPEAT COMMIT; UNTIL 1 END REPEAT", TxNone, TxForGood},
		// sql_mode=ORACLE blocks and labels.
		{"DECLARE v INT; BEGIN START TRANSACTION; END", TxEnds, TxForGood},
		{"<<l>> LOOP START TRANSACTION; EXIT l; END LOOP l", TxEnds, TxForGood},
		{"DECLARE c CURSOR FOR SELECT 1", TxNone, TxForGood},
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

// TxTouched: any reading with transaction control. A COMMIT or ROLLBACK
// in an executed comment runs on the server unless its version gate says
// otherwise: TxControl's cautious answer for a text run outside a
// transaction is "none" (the reading that skips it), but inside one it
// escapes (attack9).
func TestTxTouched(t *testing.T) {
	for _, c := range []struct {
		q    string
		p, m bool
	}{
		{"/*!COMMIT*/", false, true},
		{"/*!50000 COMMIT */", false, true},
		{"/*M! COMMIT */", false, true},
		{"/*M!100000 COMMIT */", false, true},
		{"/*M!100000 COMMIT WORK */", false, true},
		{"/*!ROLLBACK*/", false, true},
		{"/*!50000 ROLLBACK */", false, true},
		{"/*M! ROLLBACK */", false, true},
		{"/*M!100000 ROLLBACK */", false, true},
		{"/*M!100000 ROLLBACK WORK */", false, true},
		{"SELECT 1 /*!; COMMIT */", false, true},
		{"/*!SET STATEMENT sql_mode='' FOR COMMIT*/", false, true},
		{"SELECT 1 # ; COMMIT\n", true, false},
		{"SET STATEMENT sql_mode='' FOR ROLLBACK", false, true},
		{"REPEAT ROLLBACK; UNTIL 1 END REPEAT", false, true},
		{"COMMIT", true, true},
		{"BEGIN", true, true},
		{"CALL p()", false, true},
		{"/*!ROLLBACK TO SAVEPOINT a*/", false, false},
		{"/*!SELECT 1*/", false, false},
		{"/*!INSERT INTO t VALUES (1)*/", false, false},
		{"SELECT 'COMMIT'", false, false},
		{"SELECT 1", false, false},
		{"SAVEPOINT a", false, false},
		{"", false, false},
	} {
		if got := TxTouched(Postgres, c.q); got != c.p {
			t.Errorf("TxTouched(Postgres, %q) = %v, want %v", c.q, got, c.p)
		}
		if got := TxTouched(MySQL, c.q); got != c.m {
			t.Errorf("TxTouched(MySQL, %q) = %v, want %v", c.q, got, c.m)
		}
		if got := TxTouched(Unknown, c.q); got != (c.p || c.m) {
			t.Errorf("TxTouched(Unknown, %q) = %v, want %v", c.q, got, c.p || c.m)
		}
		// Whatever TxControl says of the text, TxTouched says at least as much.
		for _, d := range []Dialect{Unknown, Postgres, MySQL} {
			if TxControl(d, c.q) != TxNone && !TxTouched(d, c.q) {
				t.Errorf("%d %q: TxControl %d, TxTouched false", d, c.q, TxControl(d, c.q))
			}
		}
	}
}

// SetStatementBodies finds where the statement under SET STATEMENT ... FOR
// starts, in every MySQL reading.
func TestSetStatementBodies(t *testing.T) {
	for _, c := range []struct {
		q    string
		want []string // the text from each body on, in the readings' order, deduplicated
	}{
		{"SET STATEMENT sql_mode='' FOR CREATE TABLE t (a int)", []string{" CREATE TABLE t (a int)"}},
		{"set statement a=1, b='FOR x' for DROP TABLE t", []string{" DROP TABLE t"}},
		{"SET STATEMENT a = NEXT VALUE FOR s FOR GRANT SELECT ON *.* TO u", []string{" GRANT SELECT ON *.* TO u"}},
		{"SET STATEMENT a=(SELECT 1 FOR UPDATE) FOR TRUNCATE t", []string{" TRUNCATE t"}},
		{"SET STATEMENT a='x\\' FOR DROP TABLE t; -- ' FOR CREATE TABLE u (a int)", []string{" CREATE TABLE u (a int)", " DROP TABLE t; -- ' FOR CREATE TABLE u (a int)"}},
		{"/*!SET STATEMENT sql_mode='' FOR CREATE TABLE t (a int) */", []string{" CREATE TABLE t (a int) */"}},
		{"SET STATEMENT sql_mode=''", nil},
		{"SET sql_mode='' FOR CREATE TABLE t (a int)", nil},
		{"SET @a = 1", nil},
	} {
		at, n := SetStatementBodies(c.q)
		var got []string
	next:
		for _, i := range at[:n] {
			for _, g := range got {
				if g == c.q[i:] {
					continue next
				}
			}
			got = append(got, c.q[i:])
		}
		if len(got) != len(c.want) {
			t.Errorf("SetStatementBodies(%q) = %q, want %q", c.q, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("SetStatementBodies(%q) = %q, want %q", c.q, got, c.want)
				break
			}
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
			TxTouched(d, "/*M!100000 COMMIT */")
			TxTouched(d, "SET STATEMENT sql_mode='' FOR REPEAT COMMIT; UNTIL 1 END REPEAT")
			SetStatementBodies("SET STATEMENT sql_mode='' FOR CREATE TABLE t (a int)")
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
		if _, _, ok := wordsOnlyTx(Unknown, q); ok {
			for _, d := range []Dialect{Unknown, Postgres, MySQL} {
				fast, fastTouched, _ := wordsOnlyTx(d, q)
				if slow, slowTouched := txControlRead(d, q); fast != slow || fastTouched != slowTouched {
					t.Errorf("%q: the words-only path says %d %v, the lexer says %d %v", q, fast, fastTouched, slow, slowTouched)
				}
			}
		}
		if plainFirstWord(q) {
			for _, d := range []Dialect{Unknown, Postgres, MySQL} {
				if tx, touched := txControlRead(d, q); tx != TxNone || touched {
					t.Errorf("%q: the fast path says no transaction control, the lexer says %d %v", q, tx, touched)
				}
			}
		}
		for _, d := range []Dialect{Unknown, Postgres, MySQL} {
			if TxControl(d, q) != TxNone && !TxTouched(d, q) {
				t.Errorf("%q: TxControl %d, TxTouched false", q, TxControl(d, q))
			}
		}
		if IsRead(Unknown, q) && !(IsRead(Postgres, q) && IsRead(MySQL, q)) {
			t.Errorf("%q: Unknown says read, a dialect does not", q)
		}
	})
}

func TestPostgresCode(t *testing.T) {
	for _, c := range []struct {
		q    string
		want []string
	}{
		{"SELECT 1", []string{"select 1"}},
		{"CALL p() -- it's\n", []string{"call p ( )"}},
		{"/* it's /* nested */ still */ SELECT 'to do', $x$ call $x$, E'a\\'b' FROM \"Call\"", []string{
			`select '' , '' , '' from "Call"`,
			`select '' , '' , '' from "Call"`}},
		{`INSERT INTO t VALUES ('\', 'saved; end')`, []string{
			"insert into t values ( '' , '' )",          // standard_conforming_strings on
			"insert into t values ( '' saved ; end ?"}}, // off: '\', ' is one literal
		{"DO $$BEGIN NULL; END$$", []string{"do ''"}},
		{"SELECT U&\"a\" FROM t", []string{"select ? from t"}},
		{"SELECT 'unterminated", []string{"select ?"}},
	} {
		got, n := PostgresCode(c.q)
		if n != len(c.want) {
			t.Errorf("PostgresCode(%q): %d readings %q, want %d", c.q, n, got[:n], len(c.want))
			continue
		}
		for i := range n {
			if got[i] != c.want[i] {
				t.Errorf("PostgresCode(%q) reading %d = %q, want %q", c.q, i, got[i], c.want[i])
			}
		}
	}
}
