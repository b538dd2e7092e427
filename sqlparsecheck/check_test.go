package sqlparsecheck

import (
	"fmt"
	"strings"
	"testing"

	"github.com/sqlretry/sqlretry/internal/sqltext"
)

// rank orders transaction-control effects by caution: an effect that
// keeps statement retries off ranks higher.
func rank(tx int) int {
	if tx == sqltext.TxEnds {
		return -1
	}
	return tx
}

// check returns every way the reader's verdicts on q contradict the
// parsers. The rules (issue 9 item 2):
//   - a text the parser sees as a write, a locking read, INTO, EXPLAIN
//     ANALYZE, a call of a known side-effect function, or more than one
//     statement is never a read;
//   - more than one statement, CALL, DO, EXECUTE or transaction control is
//     never atomic;
//   - a text the parser rejects: the reader is a lexer, not a grammar, so
//     it calls a read what the grammar may reject (TiDB lacks VALUES (1),
//     OFFSET ... FETCH, PostgreSQL's :: casts; PostgreSQL lacks `names`).
//     That is safe as long as nothing of the text runs: PostgreSQL parses
//     the whole text before it runs any of it, so only a lexical error
//     (unterminated literal or comment, bad escape) must not be a read.
//     MySQL runs the statements before the one that fails: the server
//     must not see a statement separator where the reader sees none
//     (separatorsAgree);
//   - transaction control: PostgreSQL's effect exactly (at least as
//     cautious when a backslash makes the reader read the text both with
//     and without standard_conforming_strings); for MySQL at least as
//     cautious as every sql_mode's reading;
//   - ROLLBACK TO SAVEPOINT only when the parsers say exactly that.
func check(q string) []string {
	var bad []string
	fail := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }

	read, atomic, tx := sqltext.IsRead(sqltext.Postgres, q), sqltext.IsAtomic(sqltext.Postgres, q), sqltext.TxControl(sqltext.Postgres, q)
	rbTo := sqltext.IsRollbackToSavepoint(q)
	pg := parsePG(q)
	switch {
	case !pg.ok:
		if read && !pgGrammarError(pg.err) {
			fail("postgres: the parser rejects it (%s), the reader says read", pg.err)
		}
	default:
		if read && (pg.write || pg.stmts != 1) {
			fail("postgres: the parser sees %d statement(s), write=%v; the reader says read", pg.stmts, pg.write)
		}
		if atomic && (pg.notAtomic || pg.stmts != 1) {
			fail("postgres: the parser sees %d statement(s), notAtomic=%v; the reader says atomic", pg.stmts, pg.notAtomic)
		}
		if rank(tx) < rank(pg.tx) || tx != pg.tx && !strings.Contains(q, `\`) {
			fail("postgres: transaction control %d, the parser says %d", tx, pg.tx)
		}
		if rbTo && !pg.rollbackTo {
			fail("postgres: the reader says ROLLBACK TO SAVEPOINT, the parser does not")
		}
	}

	read, atomic, tx = sqltext.IsRead(sqltext.MySQL, q), sqltext.IsAtomic(sqltext.MySQL, q), sqltext.TxControl(sqltext.MySQL, q)
	for mode := range myModes {
		my := parseMy(q, mode)
		switch {
		case my.unknown:
		case !my.ok:
			if read && !separatorsAgree(q, mode) {
				fail("mysql %v: the parser rejects it (%s) and splits it where the reader does not; the reader says read", myModes[mode], my.err)
			}
		default:
			if read && (my.write || my.stmts != 1) {
				fail("mysql %v: the parser sees %d statement(s), write=%v; the reader says read", myModes[mode], my.stmts, my.write)
			}
			if atomic && (my.notAtomic || my.stmts != 1) {
				fail("mysql %v: the parser sees %d statement(s), notAtomic=%v; the reader says atomic", myModes[mode], my.stmts, my.notAtomic)
			}
			if rank(tx) < rank(my.tx) {
				fail("mysql %v: transaction control %d, the parser says %d", myModes[mode], tx, my.tx)
			}
			if rbTo && !my.rollbackTo {
				fail("mysql %v: the reader says ROLLBACK TO SAVEPOINT, the parser does not", myModes[mode])
			}
		}
	}
	// DialectUnknown: a read only when both dialects say so.
	if sqltext.IsRead(sqltext.Unknown, q) && !(sqltext.IsRead(sqltext.Postgres, q) && read) {
		fail("unknown dialect: read, but not in both dialects")
	}
	if sqltext.IsAtomic(sqltext.Unknown, q) && !(sqltext.IsAtomic(sqltext.Postgres, q) && atomic) {
		fail("unknown dialect: atomic, but not in both dialects")
	}
	return bad
}

// pgGrammarError: PostgreSQL rejected a text whose tokens the reader and
// the server agree on: a grammar error, or a bad value inside a literal
// whose ends are certain (E'\0', an invalid Unicode escape), an operator
// longer than NAMEDATALEN (an operator either way), a UESCAPE clause
// without its literal.
func pgGrammarError(err string) bool {
	for _, p := range []string{"syntax error at ", "invalid byte sequence for encoding", "invalid Unicode ", "operator too long", "UESCAPE must be followed by"} {
		if strings.HasPrefix(err, p) {
			return true
		}
	}
	return false
}

// separatorsAgree checks, for a text the reader takes for one statement,
// that the MySQL parser sees no statement separator with more text after
// it: at each ";" byte, the text cut there and followed by another
// statement parses as two statements only if the ";" is a separator, and
// then what follows the ";" must be nothing but white space and comments.
func separatorsAgree(q string, mode int) bool {
	for i := strings.IndexByte(q, ';'); i >= 0; {
		probe := parseMy(q[:i]+";SELECT 1", mode)
		if probe.ok && probe.stmts >= 2 {
			if rest := parseMy(q[i+1:], mode); !rest.ok || rest.stmts != 0 {
				return false
			}
		}
		j := strings.IndexByte(q[i+1:], ';')
		if j < 0 {
			break
		}
		i += 1 + j
	}
	return true
}

func TestReaderAgainstParsers(t *testing.T) {
	texts := corpus()
	if len(texts) < 3000 {
		t.Fatalf("corpus has %d texts, want at least 3000", len(texts))
	}
	failed := 0
	for _, q := range texts {
		if bad := check(q); len(bad) > 0 {
			failed++
			if failed <= 50 {
				t.Errorf("%q:\n\t%v", q, bad)
			}
		}
	}
	if failed > 50 {
		t.Errorf("... %d texts in all", failed)
	}
}

// The corpus must exercise both sides of every verdict, or the checks
// above prove nothing.
func TestCorpusCoversEveryVerdict(t *testing.T) {
	var reads, writes, multi, rejected, atomic, txs [2]int
	for _, q := range corpus() {
		for i, d := range []sqltext.Dialect{sqltext.Postgres, sqltext.MySQL} {
			var p parsed
			if d == sqltext.Postgres {
				p = parsePG(q)
			} else {
				p = parseMy(q, 0)
			}
			switch {
			case !p.ok:
				rejected[i]++
			case p.stmts > 1:
				multi[i]++
			case p.write:
				writes[i]++
			}
			if sqltext.IsRead(d, q) {
				reads[i]++
			}
			if sqltext.IsAtomic(d, q) {
				atomic[i]++
			}
			if sqltext.TxControl(d, q) != sqltext.TxNone {
				txs[i]++
			}
		}
	}
	t.Logf("postgres/mysql: reader reads %v, atomic %v, tx control %v; parser writes %v, multi %v, rejected %v", reads, atomic, txs, writes, multi, rejected)
	for i := range 2 {
		if reads[i] < 500 || writes[i] < 500 || multi[i] < 200 || rejected[i] < 100 || atomic[i] < 500 || txs[i] < 50 {
			t.Errorf("dialect %d: the corpus is lopsided", i)
		}
	}
}

func FuzzReaderAgainstParsers(f *testing.F) {
	for _, q := range corpus() {
		f.Add(q)
	}
	f.Fuzz(func(t *testing.T, q string) {
		if bad := check(q); len(bad) > 0 {
			t.Errorf("%q:\n\t%v", q, bad)
		}
	})
}
