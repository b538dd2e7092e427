package sqltext

import "strings"

// Transaction-control effects of a text, as TxControl reports them.
const (
	TxEnds    = -1 // COMMIT, ROLLBACK, END, ABORT, PREPARE TRANSACTION, COMMIT RELEASE
	TxNone    = 0
	TxOpens   = 1 // BEGIN, START TRANSACTION, COMMIT AND CHAIN, ROLLBACK AND CHAIN
	TxForGood = 2 // SET autocommit, SET completion_type, XA; MySQL CALL, EXECUTE, compound statements
)

// tx statement kinds, from the statement's first word.
const (
	txsNone uint8 = iota
	txsBegin
	txsStart
	txsEnd // COMMIT, ROLLBACK, END, ABORT
	txsSet
	txsPrepare
)

// startTx notes a statement that may open or close a transaction.
func (s *stmt) startTx(d Dialect, w string) {
	if isCompoundWord(w) {
		if d == MySQL {
			// A MariaDB compound statement outside a stored program (IF,
			// CASE, WHILE, LOOP, REPEAT, FOR; with sql_mode=ORACLE also
			// DECLARE ... BEGIN ... END) runs the statements in it in an
			// order the reader does not follow, some maybe not at all:
			// like BEGIN NOT ATOMIC, sqlretry cannot tell.
			s.tx = TxForGood
		}
		return
	}
	if eqUpper(w, "CALL") || eqUpper(w, "EXECUTE") {
		if d == MySQL {
			// A MySQL procedure or prepared statement may START TRANSACTION
			// or SET autocommit and leave it so: sqlretry cannot see it.
			s.tx = TxForGood
		}
		return
	}
	switch w[0] | 0x20 {
	case 'b':
		s.txs, s.tx = txsBegin, TxOpens
	case 's':
		if len(w) == 3 {
			s.txs = txsSet
		} else {
			s.txs = txsStart
		}
	case 'c', 'r', 'e', 'a': // COMMIT, ROLLBACK, END, ABORT
		s.txs, s.tx = txsEnd, TxEnds
	case 'x':
		s.tx = TxForGood
	case 'p':
		s.txs = txsPrepare
	}
}

// followTx reads the words after a transaction-control keyword.
func (s *stmt) followTx(d Dialect, t token) {
	if t.k != kWord && t.k != kQuoted {
		if s.txs == txsEnd {
			s.and, s.no = false, false
		}
		return
	}
	w := t.s
	switch s.txs {
	case txsBegin:
		// MariaDB's anonymous block BEGIN NOT ATOMIC ... END.
		if d == MySQL && s.n == 2 && strings.EqualFold(w, "NOT") {
			s.tx = TxForGood
		}
	case txsStart:
		if s.n == 2 && strings.EqualFold(w, "TRANSACTION") {
			s.tx = TxOpens
		}
	case txsSet:
		if d == MySQL && s.n == 2 && t.k == kWord && eqUpper(w, "STATEMENT") {
			// MariaDB's SET STATEMENT var=value[, ...] FOR <statement>:
			// look for the FOR (stmt.add).
			s.setFor = true
		}
		if strings.EqualFold(w, "AUTOCOMMIT") || strings.EqualFold(w, "COMPLETION_TYPE") {
			// completion_type=CHAIN makes every COMMIT a COMMIT AND CHAIN.
			s.tx = TxForGood
		}
	case txsPrepare:
		if s.n == 2 && strings.EqualFold(w, "TRANSACTION") {
			s.tx = TxEnds // PostgreSQL: the transaction leaves the session
		}
	case txsEnd:
		switch {
		case strings.EqualFold(w, "AND"):
			s.and, s.no = true, false
			return
		case strings.EqualFold(w, "NO"):
			s.no = true
			return
		case strings.EqualFold(w, "CHAIN"):
			if s.and && !s.no {
				s.tx = TxOpens // the next transaction starts at once
			}
		case strings.EqualFold(w, "TO"):
			s.to, s.tx = true, TxNone // ROLLBACK TO SAVEPOINT
		case strings.EqualFold(w, "PREPARED"):
			s.tx = TxNone // COMMIT PREPARED 'x' acts on a prepared transaction, not the session's
		}
		s.and, s.no = false, false
	}
}

// TxControl tells how a text run outside database/sql's BeginTx changes
// the session's transaction state, following every statement in it: the
// last effect wins (TxOpens, TxEnds), and TxForGood (the session is no
// longer in plain autocommit, or sqlretry cannot tell) beats everything.
// Where readings disagree, the answer that keeps retries off wins.
func TxControl(d Dialect, q string) int {
	tx, _ := txControl(d, q)
	return tx
}

// TxTouched reports whether some reading of q, in some dialect d stands
// for, has transaction control: TxControl's effect other than TxNone. Run
// inside a transaction, such a text ends or starts one: where readings
// disagree (a COMMIT in an executed comment /*!50000 ... */, which the
// server skips only below its version), the one that escapes wins, where
// TxControl's caution for a text outside a transaction picks TxNone.
func TxTouched(d Dialect, q string) bool {
	_, touched := txControl(d, q)
	return touched
}

// txControl is TxControl and TxTouched.
func txControl(d Dialect, q string) (tx int, touched bool) {
	if plainFirstWord(q) {
		return TxNone, false
	}
	if tx, touched, ok := wordsOnlyTx(d, q); ok {
		return tx, touched
	}
	return txControlRead(d, q)
}

// wordsOnlyTx is txControl's fast path for "BEGIN", "COMMIT AND CHAIN":
// a text of ASCII letters and white space has the same words in every
// reading, so they go straight to the statement's rules.
func wordsOnlyTx(d Dialect, q string) (tx int, touched, ok bool) {
	for i := 0; i < len(q); i++ {
		if c := q[i]; !isSpace(c) && (c|0x20 < 'a' || c|0x20 > 'z') && c != '_' {
			return 0, false, false
		}
	}
	best := TxEnds - 1
	ds, nd := dialects(d)
	for _, dd := range ds[:nd] {
		var r result
		var s stmt
		for i := 0; i < len(q); {
			for i < len(q) && isSpace(q[i]) {
				i++
			}
			j := i
			for j < len(q) && !isSpace(q[j]) {
				j++
			}
			if j > i {
				s.add(dd, token{k: kWord, s: q[i:j]}, needTx)
			}
			i = j
		}
		r.finish(&s)
		if best == TxEnds-1 || rank(r.tx) > rank(best) {
			best = r.tx
		}
		touched = touched || r.tx != TxNone
	}
	return best, touched, true
}

// txControlRead is txControl without the fast paths: every reading is
// lexed.
func txControlRead(d Dialect, q string) (tx int, touched bool) {
	best := TxEnds - 1
	ds, nd := dialects(d)
	for _, dd := range ds[:nd] {
		fs, nf := readings(dd, q)
		for _, f := range fs[:nf] {
			tx := analyze(dd, q, f, needTx).tx
			// Order of caution: TxForGood > TxOpens > TxNone > TxEnds.
			if best == TxEnds-1 || rank(tx) > rank(best) {
				best = tx
			}
			touched = touched || tx != TxNone
		}
	}
	return best, touched
}

// SetStatementBodies returns where the statement under MariaDB's SET
// STATEMENT var=value[, ...] FOR <statement> starts in q, a text whose
// first statement may be one: the byte after the FOR, in each reading of
// q by MySQL's rules that finds one (at[:n]; n is 0 when none does). The
// caller reads the text from there as a statement of its own.
func SetStatementBodies(q string) (at [8]int, n int) {
	fs, nf := readings(MySQL, q)
	for _, f := range fs[:nf] {
		l := lexer{q: q, flags: f}
		var s stmt
		for {
			t := l.nextMy()
			if t.k == kEOF || t.k == kSemi {
				break
			}
			if t.k == kBad {
				s.n++
				continue
			}
			looking := s.setFor
			s.add(MySQL, t, needTx)
			if looking && !s.setFor {
				at[n] = l.i
				n++
				break
			}
			if !s.setFor && s.n >= 2 {
				break // not SET STATEMENT
			}
		}
	}
	return at, n
}

// plainFirstWord is TxControl's fast path for the common statement: a text
// without ";" that starts with a word that is no transaction control and
// is not a label, in every dialect and reading (white space, names, and
// comments that nest nothing, run nothing and hold no carriage return are
// the same in all of them).
func plainFirstWord(q string) bool {
	i := 0
	for i < len(q) {
		switch c := q[i]; {
		case isSpace(c):
			i++
			continue
		case c == '/' && i+2 < len(q) && q[i+1] == '*' && q[i+2] != '!' && q[i+2] != 'M':
			end := strings.Index(q[i+2:], "*/")
			if end < 0 || strings.Contains(q[i+2:i+2+end], "/*") {
				return false
			}
			i += 2 + end + 2
			continue
		case c == '-' && i+2 < len(q) && q[i+1] == '-' && (q[i+2] == ' ' || q[i+2] == '\t'):
			end := strings.IndexByte(q[i:], '\n')
			if end < 0 || strings.IndexByte(q[i:i+end], '\r') >= 0 {
				return false
			}
			i += end + 1
			continue
		}
		break
	}
	if i == len(q) || !isLetter(q[i]) {
		return false
	}
	j := i + 1
	for j < len(q) && (isLetter(q[j]) || isDigit(q[j]) || q[j] == '$') {
		j++
	}
	w := q[i:j]
	for j < len(q) && isSpace(q[j]) {
		j++
	}
	if j < len(q) {
		switch q[j] {
		case ':', '/', '-', '#': // a label, or a comment before one
			return false
		}
	}
	return !isTxWord(w) && strings.IndexByte(q[j:], ';') < 0
}

// isTxWord: the first words that TxControl must look further at.
func isTxWord(w string) bool {
	switch len(w) {
	case 2:
		return eqUpper(w, "XA") || eqUpper(w, "IF")
	case 3:
		return eqUpper(w, "END") || eqUpper(w, "SET") || eqUpper(w, "FOR")
	case 4:
		return eqUpper(w, "CALL") || eqUpper(w, "CASE") || eqUpper(w, "LOOP")
	case 5:
		return eqUpper(w, "BEGIN") || eqUpper(w, "START") || eqUpper(w, "ABORT") || eqUpper(w, "WHILE")
	case 6:
		return eqUpper(w, "COMMIT") || eqUpper(w, "REPEAT")
	case 7:
		return eqUpper(w, "PREPARE") || eqUpper(w, "EXECUTE") || eqUpper(w, "DECLARE")
	case 8:
		return eqUpper(w, "ROLLBACK")
	}
	return false
}

// isCompoundWord: the first words of MariaDB's compound statements other
// than BEGIN (IF, CASE, WHILE, LOOP, REPEAT, FOR, and Oracle mode's
// DECLARE).
func isCompoundWord(w string) bool {
	switch len(w) {
	case 7:
		return eqUpper(w, "DECLARE")
	case 2:
		return eqUpper(w, "IF")
	case 3:
		return eqUpper(w, "FOR")
	case 4:
		return eqUpper(w, "CASE") || eqUpper(w, "LOOP")
	case 5:
		return eqUpper(w, "WHILE")
	case 6:
		return eqUpper(w, "REPEAT")
	}
	return false
}

// eqUpper compares w with an upper-case keyword of letters, ignoring case.
func eqUpper(w, k string) bool {
	if len(w) != len(k) {
		return false
	}
	for i := 0; i < len(k); i++ {
		if w[i]&^0x20 != k[i] {
			return false
		}
	}
	return true
}

func rank(tx int) int {
	if tx == TxEnds {
		return -1
	}
	return tx
}
