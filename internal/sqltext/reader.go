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

// result is what one reading of a text found.
type result struct {
	stmts      int  // statements with at least one token
	bad        bool // unterminated literal or comment, or a byte the server rejects
	notRead    bool // some statement is not a plain read
	notAtomic  bool // some statement is not one atomic statement
	tx         int  // the text's transaction-control effect
	rollbackTo bool // the last statement is ROLLBACK ... TO
}

// stmt is the state of the statement being read.
type stmt struct {
	n         int    // tokens so far
	depth     int    // open parentheses
	first     string // its first word ("" if it starts with anything else)
	firstBits uint8
	txs       uint8 // tx statement kind
	tx        int   // its effect
	pending   uint8 // the previous word needs the next token to decide
	and, no   bool  // COMMIT/ROLLBACK: saw AND, NO just before
	to        bool
	notRead   bool
	notAtomic bool
}

const (
	pendReplace = 1 + iota // REPLACE: a function only when "(" follows
	pendNext               // NEXT VALUE FOR: MariaDB's sequence increment
)

// need selects how much of the text analyze looks at.
const (
	needTx   = 1 << iota // transaction control only
	needRead             // reads and atomicity too
)

// analyze reads the text once, in one dialect (Postgres or MySQL) and one
// reading (flags).
func analyze(d Dialect, q string, flags uint8, need uint8) result {
	var r result
	if i := strings.IndexByte(q, 0); i >= 0 && d == Postgres {
		// PostgreSQL takes the text as a C string: a NUL byte, even inside
		// a comment, cuts what the server sees. Never a read.
		q, r.bad = q[:i], true
	}
	l := lexer{q: q, flags: flags}
	var s stmt
	// Transaction control of a text without a ";" is settled by its first
	// two tokens unless it starts with a transaction-control word: the
	// common statement is not read to its end.
	short := need == needTx && strings.IndexByte(q, ';') < 0
	for {
		if short && s.n == 2 && s.txs == txsNone {
			r.stmts, r.tx = 1, s.tx
			return r
		}
		var t token
		if d == Postgres {
			t = l.nextPG()
		} else {
			t = l.nextMy()
		}
		switch t.k {
		case kBad:
			// Not a read, not atomic; read on to the end all the same, so
			// that transaction control after it is seen.
			r.bad = true
			s.n++
			continue
		case kEOF:
			r.finish(&s)
			return r
		case kSemi:
			r.finish(&s)
			s = stmt{}
			continue
		}
		s.add(d, t, need)
		if s.depth < 0 {
			// Parentheses balance in every statement of both grammars; a
			// text where they do not was cut by a comment or literal rule
			// this reading does not share with the server's.
			r.bad = true
		}
	}
}

func (r *result) finish(s *stmt) {
	if s.n == 0 {
		return
	}
	r.stmts++
	if s.depth != 0 {
		r.bad = true
	}
	if s.pending == pendReplace {
		s.notRead = true // REPLACE at the very end
	}
	if s.firstBits&wReadStart == 0 || s.tx != TxNone {
		s.notRead = true
	}
	if s.firstBits&wAtomicStart == 0 || s.tx != TxNone {
		s.notAtomic = true
	}
	r.notRead = r.notRead || s.notRead
	r.notAtomic = r.notAtomic || s.notAtomic
	switch {
	case s.tx == TxForGood || r.tx == TxForGood:
		r.tx = TxForGood
	case s.tx != TxNone:
		r.tx = s.tx
	}
	r.rollbackTo = s.to
}

func (s *stmt) add(d Dialect, t token, need uint8) {
	s.n++
	switch {
	case t.k == kLParen:
		s.depth++
	case t.k == kOther && t.s == ")":
		s.depth--
	}
	if s.n == 1 {
		if t.k == kLParen {
			s.n = 0 // "(SELECT 1) UNION ..." starts with its first word
			return
		}
		if t.k != kWord {
			return
		}
		s.first = t.s
		if need&needRead != 0 {
			s.firstBits = lookup(t.s)
		}
		if isTxWord(t.s) {
			s.startTx(d, t.s)
		}
		return
	}
	if s.pending != 0 {
		switch s.pending {
		case pendReplace:
			if t.k != kLParen {
				s.notRead = true
			}
		case pendNext:
			if t.k == kWord && strings.EqualFold(t.s, "VALUE") {
				s.notRead = true
			}
		}
		s.pending = 0
	}
	if s.txs != txsNone {
		s.followTx(d, t)
	} else if d == MySQL && s.n == 2 && t.k == kOther && t.s == ":" && s.first != "" {
		// "label: BEGIN ... END", a MariaDB compound statement.
		s.tx = TxForGood
	}
	if need&needRead == 0 {
		return
	}
	switch t.k {
	case kWord:
		bits := lookup(t.s)
		if bits&(wWrite|wSideEffect) != 0 {
			s.notRead = true
		}
		if bits&wNonTx != 0 {
			s.notAtomic = true
		}
		switch {
		case len(t.s) == 7 && strings.EqualFold(t.s, "REPLACE"):
			s.pending = pendReplace
		case len(t.s) == 4 && strings.EqualFold(t.s, "NEXT"):
			s.pending = pendNext
		}
	case kQuoted:
		// A quoted name is not a keyword, but it can name a function:
		// "nextval"('s') calls nextval.
		bits := lookup(t.s)
		if bits&wSideEffect != 0 {
			s.notRead = true
		}
		if bits&wNonTx != 0 {
			s.notAtomic = true
		}
		// EXPLAIN ("analyze") runs the statement: its options are names.
		if (strings.EqualFold(t.s, "ANALYZE") || strings.EqualFold(t.s, "ANALYSE")) && strings.EqualFold(s.first, "EXPLAIN") {
			s.notRead = true
		}
	}
}

// startTx notes a statement that may open or close a transaction.
func (s *stmt) startTx(d Dialect, w string) {
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

// readings lists the flag sets a text must be read with in a dialect: one
// per server setting that would change its tokens, only when the text has
// the byte that makes the difference.
func readings(d Dialect, q string) (out [8]uint8, n int) {
	out[0], n = 0, 1
	backslash := strings.IndexByte(q, '\\') >= 0
	switch d {
	case Postgres:
		if backslash {
			out[1], n = pgBackslashStrings, 2
		}
	case MySQL:
		var vary uint8
		if backslash {
			vary |= myNoBackslash
		}
		if strings.IndexByte(q, '"') >= 0 {
			vary |= myANSIQuotes
		}
		if strings.IndexByte(q, '/') >= 0 && (strings.Contains(q, "/*!") || strings.Contains(q, "/*M!")) {
			vary |= myGatedAsComment
		}
		// Every subset of vary.
		n = 0
		for f := uint8(0); f < 16; f++ {
			if f&^vary == 0 {
				out[n] = f
				n++
			}
		}
	}
	return out, n
}

// dialects lists the lexers a Dialect stands for.
func dialects(d Dialect) (out [2]Dialect, n int) {
	if d == Postgres || d == MySQL {
		return [2]Dialect{d}, 1
	}
	return [2]Dialect{Postgres, MySQL}, 2
}

// IsRead reports whether q is exactly one statement and a plain read in
// every reading: SELECT, VALUES, TABLE, WITH, SHOW or EXPLAIN/DESCRIBE
// without a locking clause, INTO, a data-modifying part, EXPLAIN ANALYZE,
// or a call of a function the reader knows to have a side effect. A
// function of the user's own with side effects cannot be told apart.
func IsRead(d Dialect, q string) bool {
	ds, nd := dialects(d)
	for _, dd := range ds[:nd] {
		fs, nf := readings(dd, q)
		for _, f := range fs[:nf] {
			r := analyze(dd, q, f, needRead)
			if r.bad || r.stmts != 1 || r.notRead {
				return false
			}
		}
	}
	return true
}

// IsAtomic reports whether q is provably exactly one statement that the
// server runs atomically: when the server rolls it back, nothing it did
// remains. Several statements, CALL, DO, EXECUTE, anonymous blocks,
// transaction control, and statements that call functions whose effects
// survive a rollback (dblink, session advisory locks, GET_LOCK) are not.
func IsAtomic(d Dialect, q string) bool {
	ds, nd := dialects(d)
	for _, dd := range ds[:nd] {
		fs, nf := readings(dd, q)
		for _, f := range fs[:nf] {
			r := analyze(dd, q, f, needRead)
			if r.bad || r.stmts != 1 || r.notAtomic {
				return false
			}
		}
	}
	return true
}

// TxControl tells how a text run outside database/sql's BeginTx changes
// the session's transaction state, following every statement in it: the
// last effect wins (TxOpens, TxEnds), and TxForGood (the session is no
// longer in plain autocommit, or sqlretry cannot tell) beats everything.
// Where readings disagree, the answer that keeps retries off wins.
func TxControl(d Dialect, q string) int {
	if plainFirstWord(q) {
		return TxNone
	}
	if tx, ok := wordsOnlyTx(d, q); ok {
		return tx
	}
	return txControlRead(d, q)
}

// wordsOnlyTx is TxControl's fast path for "BEGIN", "COMMIT AND CHAIN":
// a text of ASCII letters and white space has the same words in every
// reading, so they go straight to the statement's rules.
func wordsOnlyTx(d Dialect, q string) (int, bool) {
	for i := 0; i < len(q); i++ {
		if c := q[i]; !isSpace(c) && (c|0x20 < 'a' || c|0x20 > 'z') && c != '_' {
			return 0, false
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
	}
	return best, true
}

// txControlRead is TxControl without the fast path: every reading is lexed.
func txControlRead(d Dialect, q string) int {
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
		}
	}
	return best
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
		return eqUpper(w, "XA")
	case 3:
		return eqUpper(w, "END") || eqUpper(w, "SET")
	case 4:
		return eqUpper(w, "CALL")
	case 5:
		return eqUpper(w, "BEGIN") || eqUpper(w, "START") || eqUpper(w, "ABORT")
	case 6:
		return eqUpper(w, "COMMIT")
	case 7:
		return eqUpper(w, "PREPARE") || eqUpper(w, "EXECUTE")
	case 8:
		return eqUpper(w, "ROLLBACK")
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

// IsRollbackToSavepoint reports whether q is exactly one statement,
// ROLLBACK [WORK|TRANSACTION] TO [SAVEPOINT] name, in every reading of
// both dialects.
func IsRollbackToSavepoint(q string) bool {
	for _, dd := range [2]Dialect{Postgres, MySQL} {
		fs, nf := readings(dd, q)
		for _, f := range fs[:nf] {
			r := analyze(dd, q, f, needTx)
			if r.bad || r.stmts != 1 || !r.rollbackTo {
				return false
			}
		}
	}
	return true
}
