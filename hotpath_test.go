package sqlretry

import (
	"strings"
	"testing"
)

// The per-connection memo of the SQL reader's answers (queryFacts) must
// answer exactly what the reader does, whatever order the texts come in:
// the same constant again, an equal text built anew, another text.
func TestQueryFactsAnswerAsTheReader(t *testing.T) {
	texts := []string{
		"SELECT n FROM t WHERE id = 1",
		"BEGIN",
		"UPDATE t SET n = n + 1",
		"COMMIT",
		"SET autocommit = 0",
		"CREATE TABLE x (a int)",
		"COMMIT AND CHAIN",
		"",
		"INSERT INTO t VALUES (1); COMMIT",
		"INSERT INTO t VALUES " + strings.Repeat("(1), ", 1000) + "(1)", // longer than factsMaxLen
		"BEGIN; " + strings.Repeat("SELECT 1; ", 500),
	}
	for _, d := range []Dialect{DialectPostgres, DialectMySQL, DialectUnknown} {
		c := &conn{r: &retrier{dialect: d}}
		for round := 0; round < 3; round++ {
			for i := range texts {
				for _, q := range []string{texts[i], strings.Clone(texts[i]), texts[(i+round)%len(texts)]} {
					// In each order: the memo's first fact may be any of the three.
					if got, want := c.isReadQuery(q), isReadQuery(d, q); got != want {
						t.Errorf("%v %q: isReadQuery %v, want %v", d, q, got, want)
					}
					if got, want := c.txControl(q), txControl(d, q); got != want {
						t.Errorf("%v %q: txControl %v, want %v", d, q, got, want)
					}
					if got, want := c.escapesTx(q), escapesTx(d, q); got != want {
						t.Errorf("%v %q: escapesTx %v, want %v", d, q, got, want)
					}
				}
			}
		}
	}
}
