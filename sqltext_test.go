package sqlretry

import "testing"

func TestIsReadQuery(t *testing.T) {
	for q, want := range map[string]bool{
		"SELECT 1":                             true,
		"  select n from t where id = $1":      true,
		"/* c */ SELECT n FROM t":              true,
		"-- c\nSELECT n FROM t":                true,
		"(SELECT 1) UNION (SELECT 2)":          true,
		"WITH x AS (SELECT 1) SELECT * FROM x": true,
		"SHOW TABLES":                          true,
		"EXPLAIN SELECT 1":                     true,
		"VALUES (1)":                           true,
		"SELECT 'INSERT INTO t' AS s":          true,
		`SELECT "update" FROM t`:               true,
		"SELECT $$DELETE$$":                    true,
		"SELECT $1, $2":                        true,
		"INSERT INTO t VALUES (1)":             false,
		"UPDATE t SET n = 1":                   false,
		"WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d": false,
		"SELECT * INTO t2 FROM t":                               false,
		"SELECT a INTO @x FROM t":                               false,
		"SELECT nextval('s')":                                   false,
		"SELECT n FROM t FOR UPDATE":                            false,
		"EXPLAIN ANALYZE DELETE FROM t":                         false,
		"SELECT pg_advisory_lock(1)":                            false,
		"SELECT GET_LOCK('x', 1)":                               false,
		"SELECT 'unterminated":                                  false,
		"/* unterminated SELECT 1":                              false,
		"CALL proc()":                                           false,
		"":                                                      false,
	} {
		if got := isReadQuery(DialectUnknown, q); got != want {
			t.Errorf("isReadQuery(%q) = %v, want %v", q, got, want)
		}
	}
}

func TestTxControl(t *testing.T) {
	for q, want := range map[string]int{
		"BEGIN":                              1,
		"begin isolation level serializable": 1,
		"START TRANSACTION":                  1,
		"SET autocommit = 0":                 2,
		"set session autocommit=off":         2,
		"XA START 'x'":                       2,
		"COMMIT":                             -1,
		"END":                                -1,
		"ROLLBACK":                           -1,
		"ROLLBACK TO SAVEPOINT a":            0,
		"rollback work to a":                 0,
		"SET search_path = x":                0,
		"SELECT 1":                           0,
		"INSERT INTO b VALUES (1)":           0,
	} {
		if got := txControl(DialectUnknown, q); got != want {
			t.Errorf("txControl(%q) = %d, want %d", q, got, want)
		}
	}
}

func FuzzSQLText(f *testing.F) {
	for _, s := range []string{"SELECT 1", "WITH x AS (DELETE FROM t) SELECT 1", "SELECT $a$ x $a$", "/*", "'", "ROLLBACK TO s", "--\n#\n/**/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, q string) {
		_ = isReadQuery(DialectUnknown, q)
		_ = txControl(DialectUnknown, q)
		_ = isRollbackToSavepoint(q)
		_ = firstKeyword(q)
	})
}
