package sqlparsecheck

import (
	"math/rand/v2"
	"strings"
	"sync"
)

// The generated corpus combines fragments: a statement shape with a hole
// for an expression, an expression (literals of every kind and quoting
// rule, operators that look like comments, comments that look like
// operators, side-effect functions), something before it (comments of
// each style, executable comments) and something after it (separators,
// second statements, locking clauses, INTO).

var prefixes = []string{
	"", "/* c */ ", "-- c\n", "--c\n", "# c\n", "/*! */ ", "/*+ hint */ ", "/* a /* b */ c */ ",
	"/*!50000 */", "/*M! */ ", "\n\t ", "-- ; DELETE FROM t\n", "# ; DELETE FROM t\n", "/* ; */",
}

var shapes = []string{
	// reads
	"SELECT {e}",
	"select {e} from t where a = 1",
	"SELECT a FROM t WHERE b = {e} ORDER BY 1 LIMIT 2",
	"WITH x AS (SELECT {e} AS a) SELECT a FROM x",
	"VALUES ({e})",
	"SELECT * FROM (SELECT {e}) AS s",
	"(SELECT {e}) UNION ALL (SELECT 2)",
	"EXPLAIN SELECT {e}",
	"SELECT {e} FROM t OFFSET 1 ROWS FETCH NEXT 2 ROWS ONLY",
	"SELECT count(*) FROM t GROUP BY {e}",
	// writes
	"INSERT INTO t VALUES ({e})",
	"UPDATE t SET a = {e}",
	"DELETE FROM t WHERE a = {e}",
	"REPLACE INTO t VALUES ({e})",
	"WITH d AS (DELETE FROM t WHERE a = {e} RETURNING a) SELECT a FROM d",
	"WITH d AS (INSERT INTO t VALUES ({e}) RETURNING a) SELECT 1",
	"WITH x AS (SELECT {e} AS a) UPDATE t SET a = 1",
	"SELECT {e} INTO t2",
	"SELECT {e} INTO @x",
	"SELECT {e} FROM t INTO OUTFILE '/tmp/f'",
	"EXPLAIN ANALYZE SELECT {e}",
	"EXPLAIN (ANALYZE) SELECT {e}",
	"SELECT a FROM t WHERE b = {e} FOR UPDATE",
	"SELECT a FROM t WHERE b = {e} FOR NO KEY UPDATE",
	"SELECT a FROM t WHERE b = {e} FOR KEY SHARE",
	"SELECT a FROM t WHERE b = {e} LOCK IN SHARE MODE",
	"CALL p({e})",
	"DO {e}",
	"SET @v = {e}",
	"SELECT nextval('s'), {e}",
	"SELECT GET_LOCK('l', 1), {e}",
	"SELECT {e}, pg_advisory_lock(1)",
	// transaction control
	"BEGIN",
	"START TRANSACTION",
	"COMMIT AND CHAIN",
	"ROLLBACK AND CHAIN",
	"COMMIT",
	"ROLLBACK TO SAVEPOINT s",
	"SET autocommit = {e}",
}

var exprs = []string{
	"1", "a", "'a'", "'it''s'", `'a\'b'`, `'a\\'`, `'a\'; DELETE FROM t; -- '`, `E'a\'b'`, `e'a\'; DELETE FROM t; --'`,
	"$$x$$", "$q$ ; DELETE FROM t; $q$", "$q$a$b$q$", "$1", "?", `"c"`, `"c""d"`, `"a\"; DELETE FROM t; --"`,
	"`c`", "`c``d`", "X'0A'", "B'01'", "N'x'", `U&'\0041'`, "_utf8mb4'x'",
	`'{"a":1}'::jsonb #>> '{a}'`, "'{}'::jsonb #- '{a}'", "'{}'::jsonb ?| array['a']", "'{}'::jsonb ? 'a'",
	"1 #- 2", "1 # 2", "a #> '{b}'", "1 --1", "1 -- c\n", "1 # c\n", "1 /* c */", "1 /*! + 1 */",
	"1 /*!50000 + 1 */", "1 /*M! + 1 */", "1 /*!; DELETE FROM t */", "1 /* ; DELETE FROM t */",
	"1 -- ; DELETE FROM t\n", "1 --; DELETE FROM t\n", "1 # ; DELETE FROM t\n", "1 /* a /* b */ ; DELETE FROM t */",
	"nextval('s')", "pg_catalog.nextval('s')", `"nextval"('s')`, "setval('s', 1)", "pg_advisory_lock(1)",
	"pg_try_advisory_xact_lock(1)", "pg_notify('c', 'x')", "set_config('a.b', 'c', false)", "txid_current()",
	"dblink_exec('x', 'DELETE FROM t')", "lo_unlink(1)", "pg_terminate_backend(1)",
	"GET_LOCK('l', 1)", "RELEASE_LOCK('l')", "`GET_LOCK`('l', 1)", "NEXT VALUE FOR s", "SETVAL(s, 5)",
	"@x := 1", "@r:=@r+1", "(@r := @r + 1)", "@@autocommit", "@r", "f(a := 1)", "':='",
	"ts_stat('SELECT 1')", "ts_rewrite('a'::tsquery, 'SELECT 1')", "crosstab('SELECT 1')",
	"pg_stat_statements_reset()", "brin_summarize_new_values('i')", "gin_clean_pending_list('i')",
	"pg_restore_relation_stats('relation', 1)", "'x'::text", "lower('A')", "replace('a', 'b', 'c')", "(SELECT 1)",
	"'a' 'b'", "1e5", ".5", "0x1F", "x$y", "CASE WHEN a THEN 'b' END", "'a' || 'b'", "a->>'$.b'",
	"(1", "1)", "'unterminated", "\"unterminated", "/* unterminated", "$q$ unterminated",
}

var suffixes = []string{
	"", ";", " ;", ";;", "; SELECT 2", "; DELETE FROM t", ";\nINSERT INTO t VALUES (1)", "; -- end", ";\n# end",
	" FOR UPDATE", " FOR SHARE", " LOCK IN SHARE MODE", " FOR NO KEY UPDATE", " FOR UPDATE SKIP LOCKED",
	"\n# x", "\n-- x", " -- x", " --x", " /* x */", " /*! FOR UPDATE */", " /*!50000 FOR UPDATE */",
	" INTO @v", "; BEGIN", "; COMMIT", "; COMMIT AND CHAIN", " # \n; DELETE FROM t", " --x\n; DELETE FROM t",
}

// hand holds texts collected by hand: each one was once misread by a
// keyword scanner, or sits on a rule that differs between the dialects.
var hand = []string{
	// issue 9 item 2, as reported.
	"WITH s AS (SELECT '{\"n\":1}'::jsonb #>> '{n}' AS n), ins AS (INSERT INTO t (n) SELECT n::int FROM s RETURNING n) SELECT n FROM ins",
	"SELECT '{\"n\":1}'::jsonb #>> '{n}' # \n, (WITH d AS (DELETE FROM t RETURNING 1) SELECT 1)",
	"SELECT 1 #>> 2\n; INSERT INTO t VALUES (1)",
	"SELECT 1 --1\n; DELETE FROM t",
	"SELECT 1 -- 1\n; DELETE FROM t",
	"SELECT 1--\n; DELETE FROM t",
	"SELECT 1 --\t\n",
	"SELECT 'a\\'; DELETE FROM t; -- '",
	"SELECT E'a\\'; DELETE FROM t; -- '",
	"SELECT e'\\\\'; DELETE FROM t",
	"SELECT 'a\\\\'; DELETE FROM t",
	"SELECT \"a\\\"; DELETE FROM t; -- \"",
	"SELECT 1 /* a /* b */ ; DELETE FROM t; */",
	"SELECT 1 /* a /* b */ */ ; DELETE FROM t",
	"SELECT 1 /*!50000 FOR UPDATE */",
	"SELECT 1 /*!99999 FOR UPDATE */",
	"SELECT 1 /*M!100000 FOR UPDATE */",
	"SELECT 1 /*!; DELETE FROM t */",
	"SELECT /*+ MAX_EXECUTION_TIME(1) */ 1",
	"SELECT $$ ; DELETE FROM t; $$",
	"SELECT $a$ $b$ ; $a$",
	"SELECT $a$ x $b$ ; $a$; DELETE FROM t",
	"SELECT a$b$ FROM t; DELETE FROM t; SELECT $b$",
	"SELECT 1 AS \"x\"\"; DELETE FROM t; --\"",
	"SELECT `a``; DELETE FROM t; --`",
	"SELECT U&\"nextv\\0061l\"('s')",
	"SELECT U&'\\0041' UESCAPE '!'",
	"SELECT B'0101', X'1F'",
	"SELECT X'\\'; DELETE FROM t; -- '",
	"WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
	"WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT n FROM r",
	"WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.id) SELECT 1",
	"MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET n = s.n",
	"SELECT * INTO TEMP t2 FROM t",
	"SELECT * FROM t FOR UPDATE OF t NOWAIT",
	"SELECT * FROM t FOR SHARE SKIP LOCKED",
	"TABLE t",
	"TABLE t FOR UPDATE",
	"SHOW search_path",
	"SHOW TABLES",
	"SHOW VARIABLES LIKE 'autocommit'",
	"DESCRIBE t",
	"DESC SELECT 1",
	"EXPLAIN FORMAT=JSON SELECT 1",
	"EXPLAIN (FORMAT JSON) SELECT 1",
	"EXPLAIN (ANALYZE false) SELECT 1",
	"EXPLAIN ANALYZE DELETE FROM t",
	"EXPLAIN DELETE FROM t",
	"EXPLAIN (\"analyze\") DELETE FROM t",
	"ANALYZE t",
	"SELECT pg_sleep(1)",
	"SELECT SLEEP(1)",
	"SELECT LAST_INSERT_ID()",
	"SELECT currval('s'), lastval()",
	"SELECT pg_advisory_unlock_all()",
	"SELECT * FROM dblink('dbname=x', 'SELECT 1') AS r(a int)",
	"SELECT query_to_xml('DELETE FROM t RETURNING 1', true, true, '')",
	"SELECT NEXT VALUE FOR s",
	"SELECT PREVIOUS VALUE FOR s",
	"SELECT NEXTVAL(s)",
	"CALL p()",
	"CALL p(1, 'a')",
	"DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$",
	"DO 1",
	"EXECUTE s",
	"EXECUTE s USING @a",
	"PREPARE s FROM 'SELECT 1'",
	"PREPARE s AS SELECT 1",
	"PREPARE TRANSACTION 'x'",
	"COMMIT PREPARED 'x'",
	"ROLLBACK PREPARED 'x'",
	"BEGIN",
	"BEGIN WORK",
	"BEGIN ISOLATION LEVEL SERIALIZABLE",
	"BEGIN NOT ATOMIC SELECT 1; END",
	"START TRANSACTION READ ONLY",
	"START TRANSACTION WITH CONSISTENT SNAPSHOT",
	"COMMIT",
	"COMMIT WORK",
	"COMMIT AND CHAIN",
	"COMMIT AND NO CHAIN",
	"COMMIT RELEASE",
	"COMMIT NO RELEASE",
	"COMMIT AND NO CHAIN NO RELEASE",
	"ROLLBACK",
	"ROLLBACK AND CHAIN",
	"ROLLBACK WORK AND CHAIN",
	"ROLLBACK RELEASE",
	"ROLLBACK TO s",
	"ROLLBACK TO SAVEPOINT s",
	"ROLLBACK WORK TO SAVEPOINT s",
	"ROLLBACK TO s; INSERT INTO t VALUES (1)",
	"ABORT",
	"ABORT AND CHAIN",
	"END",
	"END AND CHAIN",
	"SAVEPOINT s",
	"RELEASE SAVEPOINT s",
	"INSERT INTO t VALUES (1); BEGIN",
	"BEGIN; INSERT INTO t VALUES (1); COMMIT",
	"BEGIN; INSERT INTO t VALUES (1); COMMIT AND CHAIN",
	"SET autocommit = 0",
	"SET autocommit = 1",
	"SET SESSION autocommit = OFF",
	"SET @@session.autocommit = 0",
	"SET completion_type = 1",
	"SET completion_type = 'CHAIN'",
	"SET search_path = x",
	"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
	"XA START 'x'",
	"XA END 'x'",
	"LOCK TABLES t WRITE",
	"LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
	"UNLOCK TABLES",
	"SELECT 1; SELECT 2",
	"SELECT 1;",
	";",
	";;",
	"",
	" ",
	"-- only a comment",
	"SELECT 1\x00; DELETE FROM t",
	"SELECT \\N",
	"SELECT 1\v",
	"SELECT 'a' \n 'b'",
	"SELECT 1 FROM t WHERE a = ? AND b = ?",
	"SELECT * FROM t WHERE a = $1 AND b = $2",
	"SELECT @a := 1",
	// MySQL user variables assigned (probe 2): not rolled back with the statement.
	"UPDATE t SET r = (@r := @r + 1)",
	"UPDATE t SET r = (@r:=@r+1) ORDER BY s DESC",
	"INSERT INTO u SELECT @i := @i + 1, id FROM t",
	"INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = (@o := a) + 1",
	"DELETE FROM t WHERE (@n := @n + 1) > 3",
	"SELECT @r := @r + 1 AS rank, name FROM t ORDER BY score",
	"SELECT a INTO @x FROM t FOR UPDATE",
	"SELECT a FROM t FOR UPDATE INTO @x, @y",
	"SET @r := 0",
	"SET @@session.sql_mode := 'ANSI'",
	"SELECT @r, @@sql_mode",
	"SELECT ':=' AS s, `:=`",
	"SELECT 1 /* @r := 0 */",
	"SELECT f(a := 1)",
	"UPDATE t SET r = @r + 1 WHERE id = @id",
	// Functions that run an SQL text, or write, or change the server (probe 2).
	"SELECT word FROM ts_stat('SELECT to_tsvector(lo_from_bytea(0, ''probe2'')::text)')",
	"SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, (lo_from_bytea(0, ''probe2'')::text)::tsquery')::text",
	"SELECT * FROM pg_catalog.ts_stat('SELECT v FROM t', 'ab')",
	"SELECT * FROM crosstab('SELECT 1, 2, 3') AS c(a int, b int)",
	"SELECT query_to_xml_and_xmlschema('SELECT 1', true, true, '')",
	"SELECT pg_stat_statements_reset()",
	"SELECT brin_summarize_new_values('i')",
	"SELECT brin_summarize_range('i', 0)",
	"SELECT brin_desummarize_range('i', 0)",
	"SELECT gin_clean_pending_list('i')",
	"SELECT pg_clear_relation_stats('public', 't')",
	"SELECT pg_restore_attribute_stats('relation', 't'::regclass)",
	"SELECT pg_sync_replication_slots()",
	"SELECT pg_switch_xlog()",
	"SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
	"SELECT pg_log_standby_snapshot()",
	"SELECT lowrite(0, 'x')",
	"UPDATE t SET n = (SELECT count(*) FROM ts_stat('SELECT v FROM u'))",
	"SELECT table_to_xml('t', true, true, '')",
	"SELECT a->'$.b', a->>'$.c' FROM t",
	"SELECT ARRAY[1, 2][1]",
	"SELECT 1::int, '1'::int",
	"SELECT {fn NOW()}",
	"HANDLER t READ FIRST",
	"LOAD DATA INFILE '/tmp/x' INTO TABLE t",
	"COPY t TO STDOUT",
	"COPY (SELECT 1) TO STDOUT",
	"CREATE TABLE t2 AS SELECT * FROM t",
	"VALUES (1), (2) ORDER BY 1",
	"VALUES ROW(1), ROW(2)",
	"SELECT * FROM t TABLESAMPLE SYSTEM (10)",
	"SELECT INSERT('abc', 1, 1, 'x')",
	"SELECT 1 FROM dual",
	"SELECT 1 -- comment with 'quote\n",
	"SELECT 1 # comment with 'quote\n",
	"SELECT 1 /* comment with 'quote */",
	"SELECT 'it''s' -- ; DELETE FROM t\n",
}

var (
	corpusOnce sync.Once
	corpusAll  []string
)

// corpus returns the hand-collected texts and the generated ones, the
// same every run.
func corpus() []string {
	corpusOnce.Do(func() {
		seen := map[string]bool{}
		add := func(q string) {
			if !seen[q] {
				seen[q] = true
				corpusAll = append(corpusAll, q)
			}
		}
		for _, q := range hand {
			add(q)
		}
		fill := func(shape, e string) string { return strings.ReplaceAll(shape, "{e}", e) }
		// Every shape with every expression, bare.
		for _, s := range shapes {
			for _, e := range exprs {
				add(fill(s, e))
			}
		}
		// Every shape with every prefix and every suffix, the simplest expression.
		for _, s := range shapes {
			for _, p := range prefixes {
				add(p + fill(s, "1"))
			}
			for _, x := range suffixes {
				add(fill(s, "1") + x)
			}
		}
		// Every expression with every suffix, in a plain SELECT.
		for _, e := range exprs {
			for _, x := range suffixes {
				add("SELECT " + e + x)
			}
		}
		// A deterministic sample of all four at once.
		r := rand.New(rand.NewPCG(9, 2))
		for range 3000 {
			p := prefixes[r.IntN(len(prefixes))]
			s := shapes[r.IntN(len(shapes))]
			e := exprs[r.IntN(len(exprs))]
			x := suffixes[r.IntN(len(suffixes))]
			add(p + fill(s, e) + x)
		}
	})
	return corpusAll
}
