package sqlretry

import (
	"strings"

	"github.com/sqlretry/sqlretry/internal/sqltext"
)

// escapesTx reports a statement that, run inside a transaction, ends or
// starts a transaction by itself: COMMIT, ROLLBACK, BEGIN and the like in
// any statement of the text, in any reading of it (txTouched: a COMMIT in
// an executed comment /*!50000 ... */ escapes, though the reading where
// the server skips it does not), and on MySQL a statement that commits
// implicitly (DDL, LOCK TABLES, GRANT...). After one, part of the work of
// the transaction sqlretry began may already be committed. SAVEPOINT,
// ROLLBACK TO SAVEPOINT and RELEASE SAVEPOINT are not escapes.
//
// It is called on every statement inside a transaction: txTouched's fast
// path and implicitCommit's first-word check allocate nothing.
func escapesTx(d Dialect, q string) bool {
	if plainDML(q) {
		return false
	}
	if txTouched(d, q) {
		return true
	}
	return d != DialectPostgres && implicitCommit(q)
}

// plainDML is escapesTx's fast path for the common statement: a text
// without ";" that starts (after white space) with SELECT, INSERT, UPDATE
// or DELETE followed by white space or "(". It is one statement that
// neither controls the transaction nor commits implicitly, in every
// dialect and reading (txControl's own fast path says TxNone for it too).
func plainDML(q string) bool {
	i := 0
	for i < len(q) && (q[i] == ' ' || q[i] == '\t' || q[i] == '\n' || q[i] == '\r') {
		i++
	}
	if len(q)-i < 7 {
		return false
	}
	switch q[i+6] {
	case ' ', '\t', '\n', '\r', '(':
	default:
		return false
	}
	w := q[i : i+6]
	switch w[0] | 0x20 {
	case 's':
		if !eqFold(w, "SELECT") {
			return false
		}
	case 'i':
		if !eqFold(w, "INSERT") {
			return false
		}
	case 'u':
		if !eqFold(w, "UPDATE") {
			return false
		}
	case 'd':
		if !eqFold(w, "DELETE") {
			return false
		}
	default:
		return false
	}
	return strings.IndexByte(q[i+6:], ';') < 0
}

// implicitCommit reports a text with a statement that MySQL (MariaDB)
// commits the open transaction for, before it runs and whether or not it
// succeeds: CREATE, ALTER, DROP (except of TEMPORARY tables), RENAME,
// TRUNCATE, LOCK and UNLOCK TABLES, GRANT, REVOKE, SET PASSWORD, FLUSH,
// RESET, the table maintenance statements, replication and plugin
// statements. The check is by first word and errs on the side of "commits":
// every statement of a text with ";" is looked at (a ";" inside a literal
// may start a false one), the code in a version comment (/*! */) is read
// as code, and the statement under MariaDB's SET STATEMENT ... FOR is
// read as if alone.
func implicitCommit(q string) bool {
	for {
		if implicitCommitFirst(q) {
			return true
		}
		i := strings.IndexByte(q, ';')
		if i < 0 {
			return false
		}
		q = q[i+1:]
	}
}

// implicitCommitFirst looks at the first statement of q. The switch on the
// first letter keeps the common statements (SELECT, INSERT, UPDATE,
// DELETE, WITH) to one or two comparisons that fail at once.
func implicitCommitFirst(q string) bool {
	w, rest := firstWord(q)
	if len(w) < 3 {
		return false
	}
	switch w[0] | 0x20 {
	case 'a':
		return eqFold(w, "ALTER") || eqFold(w, "ANALYZE") && nextIsTableWord(rest)
	case 'b':
		return eqFold(w, "BACKUP")
	case 'c':
		return eqFold(w, "CREATE") && !nextIs(rest, "TEMPORARY") || eqFold(w, "CHECK") && nextIs(rest, "TABLE") ||
			eqFold(w, "CACHE") || eqFold(w, "CHANGE")
	case 'd':
		return eqFold(w, "DROP") && !nextIs(rest, "TEMPORARY")
	case 'f':
		return eqFold(w, "FLUSH")
	case 'g':
		return eqFold(w, "GRANT")
	case 'i':
		return eqFold(w, "INSTALL")
	case 'l':
		return eqFold(w, "LOCK") && (nextIs(rest, "TABLES") || nextIs(rest, "TABLE")) ||
			eqFold(w, "LOAD") && nextIs(rest, "INDEX")
	case 'o':
		return eqFold(w, "OPTIMIZE") && nextIsTableWord(rest)
	case 'p':
		return eqFold(w, "PURGE")
	case 'r':
		return eqFold(w, "RENAME") || eqFold(w, "REVOKE") || eqFold(w, "RESET") || eqFold(w, "REPAIR")
	case 's':
		// START SLAVE / REPLICA (START TRANSACTION is txControl's), STOP;
		// SET PASSWORD, MariaDB's SET DEFAULT ROLE (the privilege
		// tables), and SET STATEMENT ... FOR a statement that commits.
		return eqFold(w, "SET") && (nextIs(rest, "PASSWORD") || nextIs(rest, "DEFAULT") || nextIs(rest, "STATEMENT") && setStatementCommits(q)) ||
			eqFold(w, "START") || eqFold(w, "STOP")
	case 't':
		return eqFold(w, "TRUNCATE")
	case 'u':
		return eqFold(w, "UNLOCK") || eqFold(w, "UNINSTALL")
	}
	return false
}

// setStatementCommits reports whether the statement under MariaDB's SET
// STATEMENT var=value[, ...] FOR <statement> at the start of q commits
// implicitly, in any reading of q.
func setStatementCommits(q string) bool {
	at, n := sqltext.SetStatementBodies(q)
	for _, i := range at[:n] {
		if implicitCommitFirst(q[i:]) {
			return true
		}
	}
	return false
}

// nextIsTableWord: ANALYZE and OPTIMIZE TABLE (or LOCAL / NO_WRITE_TO_BINLOG
// TABLE) commit; MariaDB's ANALYZE SELECT does not.
func nextIsTableWord(rest string) bool {
	return nextIs(rest, "TABLE") || nextIs(rest, "TABLES") || nextIs(rest, "LOCAL") || nextIs(rest, "NO_WRITE_TO_BINLOG")
}

// nextIs reports whether the next word of rest is k.
func nextIs(rest, k string) bool {
	w, _ := firstWord(rest)
	return eqFold(w, k)
}

// firstWord returns the first word of q after white space, comments and
// the opening of a version comment ("/*!40000 ", "/*M!100100 "), and what
// follows it. A text that starts with anything else has no first word.
func firstWord(q string) (w, rest string) {
	i := 0
	for i < len(q) {
		c := q[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
			continue
		case c == '/' && i+1 < len(q) && q[i+1] == '*':
			j := i + 2
			if j < len(q) && q[j] == 'M' && j+1 < len(q) && q[j+1] == '!' {
				j++
			}
			if j < len(q) && q[j] == '!' {
				// Code the server runs: skip the version and read on.
				j++
				for j < len(q) && q[j] >= '0' && q[j] <= '9' {
					j++
				}
				i = j
				continue
			}
			end := strings.Index(q[j:], "*/")
			if end < 0 {
				return "", ""
			}
			i = j + end + 2
			continue
		case c == '#' || c == '-' && i+2 < len(q) && q[i+1] == '-' && (q[i+2] == ' ' || q[i+2] == '\t' || q[i+2] == '\n'):
			end := strings.IndexByte(q[i:], '\n')
			if end < 0 {
				return "", ""
			}
			i += end + 1
			continue
		case c == '(':
			i++ // "(SELECT ...)": the word inside
			continue
		case c == '*' && i+1 < len(q) && q[i+1] == '/':
			i += 2 // the end of a version comment: "/*!SET STATEMENT x=1 FOR*/ CREATE ..."
			continue
		}
		break
	}
	j := i
	for j < len(q) && (q[j]|0x20 >= 'a' && q[j]|0x20 <= 'z' || q[j] == '_') {
		j++
	}
	return q[i:j], q[j:]
}

// eqFold compares w with an upper-case keyword k, ignoring ASCII case.
func eqFold(w, k string) bool {
	if len(w) != len(k) {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := w[i]
		if c >= 'a' && c <= 'z' {
			c -= 'a' - 'A'
		}
		if c != k[i] {
			return false
		}
	}
	return true
}
