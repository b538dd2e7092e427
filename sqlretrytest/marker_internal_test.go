package sqlretrytest

import "testing"

// The MariaDB block that carries the application's COMMIT, with and
// without the SET STATEMENT sqlretry runs it under; nothing else.
func TestIsMarkerCommit(t *testing.T) {
	for q, want := range map[string]bool{
		"BEGIN NOT ATOMIC INSERT INTO `test`.`m` (token, created_at) VALUES (X'00', SYSDATE(6)); COMMIT; END":                                                                      true,
		"SET STATEMENT max_statement_time=0, character_set_results=binary FOR BEGIN NOT ATOMIC INSERT INTO `test`.`m` (token, created_at) VALUES (X'00', SYSDATE(6)); COMMIT; END": true,
		"SET STATEMENT max_statement_time=0 FOR SELECT 1":                 false,
		"SET STATEMENT max_statement_time=0 FOR INSERT INTO t VALUES (1)": false,
		"BEGIN NOT ATOMIC INSERT INTO t VALUES (1); END":                  false,
		"COMMIT": false,
	} {
		if got := isMarkerCommit(q); got != want {
			t.Errorf("isMarkerCommit(%q) = %v, want %v", q, got, want)
		}
	}
}
