package sqlretry

import "strings"

// The helpers here read just enough SQL to make two safety decisions: is a
// statement a plain read (safe to re-run after a lost connection), and does
// it open or close a transaction by hand (no statement retries then). When in
// doubt they answer "not a read" and "in a transaction".

// skipSpace returns the offset of the first byte after white space and
// comments, or -1 when a comment is not terminated.
func skipSpace(q string, i int) int {
	for i < len(q) {
		switch c := q[i]; {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '(':
			i++
		case c == '-' && i+1 < len(q) && q[i+1] == '-', c == '#':
			for i < len(q) && q[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(q) && q[i+1] == '*':
			end := strings.Index(q[i+2:], "*/")
			if end < 0 {
				return -1
			}
			i += end + 4
		default:
			return i
		}
	}
	return i
}

func isWordByte(c byte) bool {
	return c == '_' || c == '$' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80
}

// firstKeyword returns the first word of a statement.
func firstKeyword(q string) string {
	i := skipSpace(q, 0)
	if i < 0 {
		return ""
	}
	j := i
	for j < len(q) && isWordByte(q[j]) {
		j++
	}
	return q[i:j]
}

// writingWords are words that make a statement that starts like a read
// change something: SELECT ... INTO, data-modifying CTEs, EXPLAIN ANALYZE,
// sequence functions, and locking clauses (SELECT ... FOR UPDATE takes
// locks; it is not retried after a lost connection).
var writingWords = []string{
	"INTO", "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "ANALYZE", "CALL",
	"NEXTVAL", "SETVAL", "LOCK", "COPY", "CREATE", "DROP", "ALTER", "TRUNCATE", "GRANT",
	"SET_CONFIG", "PG_ADVISORY_LOCK", "PG_ADVISORY_XACT_LOCK", "GET_LOCK", "SLEEP", "PG_SLEEP",
}

// isReadQuery reports whether q is a plain read: it starts with SELECT,
// VALUES, TABLE, SHOW, DESCRIBE or EXPLAIN (or WITH) and names none of the
// writing words outside literals and quoted names. A SELECT that calls a
// function with side effects cannot be told apart; callers mark such calls
// with NotIdempotent.
func isReadQuery(d Dialect, q string) bool {
	switch kw := firstKeyword(q); {
	case strings.EqualFold(kw, "SELECT"), strings.EqualFold(kw, "VALUES"), strings.EqualFold(kw, "TABLE"),
		strings.EqualFold(kw, "SHOW"), strings.EqualFold(kw, "DESCRIBE"), strings.EqualFold(kw, "DESC"),
		strings.EqualFold(kw, "EXPLAIN"), strings.EqualFold(kw, "WITH"):
	default:
		return false
	}
	ok := true
	scanWords(q, func(w string) bool {
		for _, bad := range writingWords {
			if strings.EqualFold(w, bad) {
				ok = false
				return false
			}
		}
		return true
	})
	return ok
}

// scanWords calls f for each word outside string literals, quoted
// identifiers and comments, until f returns false. An unterminated literal
// or comment counts as the word "INTO", so that callers treat it as unsafe.
func scanWords(q string, f func(string) bool) {
	for i := 0; i < len(q); {
		c := q[i]
		switch {
		case c == '\'' || c == '"' || c == '`':
			end := closeQuote(q, i+1, c)
			if end < 0 {
				f("INTO")
				return
			}
			i = end
		case c == '$' && (i == 0 || !isWordByte(q[i-1])):
			// PostgreSQL dollar quoting: $tag$ ... $tag$ (or a $1 parameter).
			j := i + 1
			for j < len(q) && isWordByte(q[j]) && q[j] != '$' {
				j++
			}
			if j < len(q) && q[j] == '$' {
				tag := q[i : j+1]
				end := strings.Index(q[j+1:], tag)
				if end < 0 {
					f("INTO")
					return
				}
				i = j + 1 + end + len(tag)
				continue
			}
			i = j
		case c == '-' && i+1 < len(q) && q[i+1] == '-', c == '#', c == '/' && i+1 < len(q) && q[i+1] == '*':
			n := skipSpace(q, i)
			if n < 0 {
				f("INTO")
				return
			}
			if n == i {
				n++
			}
			i = n
		case isWordByte(c):
			j := i
			for j < len(q) && isWordByte(q[j]) {
				j++
			}
			if !f(q[i:j]) {
				return
			}
			i = j
		default:
			i++
		}
	}
}

// closeQuote returns the offset after the quote that closes one opened
// before start, or -1. Doubled quotes and backslash escapes stay inside.
func closeQuote(q string, start int, quote byte) int {
	for i := start; i < len(q); i++ {
		switch q[i] {
		case '\\':
			if quote == '\'' {
				i++
			}
		case quote:
			if i+1 < len(q) && q[i+1] == quote {
				i++
				continue
			}
			return i + 1
		}
	}
	return -1
}

// isAtomicStatement reports whether q is provably one statement that the
// server runs atomically: when the server rolls it back (a lock-wait
// timeout, a serialization failure) nothing of it remains, so running it
// again is safe. Several statements, procedure calls and anonymous blocks
// are not (they may commit or keep part of their work).
func isAtomicStatement(d Dialect, q string) bool {
	switch kw := firstKeyword(q); {
	case strings.EqualFold(kw, "CALL"), strings.EqualFold(kw, "DO"), strings.EqualFold(kw, "EXEC"),
		strings.EqualFold(kw, "EXECUTE"), strings.EqualFold(kw, "BEGIN"), strings.EqualFold(kw, "DECLARE"):
		return false
	}
	return !strings.Contains(strings.TrimRight(strings.TrimSpace(q), ";"), ";")
}

// txControl tells whether a statement run outside database/sql's BeginTx
// opens a transaction by hand (+1), ends one (-1) or neither (0). "SET
// autocommit" and XA make the connection manual for good (+2).
func txControl(d Dialect, q string) int {
	i := skipSpace(q, 0)
	if i < 0 || i >= len(q) {
		return 0
	}
	switch q[i] | 0x20 { // cheap filter on the first letter, lower-cased
	case 'b', 's', 'x', 'c', 'r', 'e':
	default:
		return 0
	}
	kw := firstKeyword(q)
	switch {
	case strings.EqualFold(kw, "BEGIN"), strings.EqualFold(kw, "START"):
		return 1
	case strings.EqualFold(kw, "XA"):
		return 2
	case strings.EqualFold(kw, "SET"):
		upper := strings.ToUpper(q)
		if strings.Contains(upper, "AUTOCOMMIT") {
			return 2
		}
		return 0
	case strings.EqualFold(kw, "COMMIT"), strings.EqualFold(kw, "END"):
		return -1
	case strings.EqualFold(kw, "ROLLBACK"):
		if isRollbackToSavepoint(q) {
			return 0
		}
		return -1
	}
	return 0
}

// isRollbackToSavepoint reports ROLLBACK [WORK|TRANSACTION] TO [SAVEPOINT] x.
func isRollbackToSavepoint(q string) bool {
	n := 0
	found := false
	scanWords(q, func(w string) bool {
		n++
		switch {
		case n == 1:
			return strings.EqualFold(w, "ROLLBACK")
		case strings.EqualFold(w, "WORK"), strings.EqualFold(w, "TRANSACTION"):
			return n == 2
		case strings.EqualFold(w, "TO"):
			found = true
		}
		return false
	})
	return found
}
