package sqltext

import "strings"

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
	// MariaDB's SET STATEMENT var=value[, ...] FOR <statement>.
	setFor     bool // after SET STATEMENT: the FOR not seen yet
	afterValue bool // the last token was VALUE: NEXT / PREVIOUS VALUE FOR seq is no statement's FOR
	forGood    bool // TxForGood before the FOR: the statement after it keeps it
}

const (
	pendReplace = 1 + iota // REPLACE: a function only when "(" follows
	pendNext               // NEXT VALUE FOR: MariaDB's sequence increment
	pendColon              // MySQL ":": ":=" assigns a variable
	pendInto               // MySQL INTO: "INTO @x" assigns a variable
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
		if short && s.n == 2 && s.txs == txsNone && !s.forGood {
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
	if s.forGood {
		s.tx = TxForGood
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
	if s.setFor {
		if t.k == kWord && s.depth == 0 && !s.afterValue && eqUpper(t.s, "FOR") {
			s.inner()
			return
		}
		s.afterValue = t.k == kWord && eqUpper(t.s, "VALUE")
	}
	if s.n == 1 {
		if t.k == kLParen {
			s.n = 0 // "(SELECT 1) UNION ..." starts with its first word
			return
		}
		if t.k != kWord {
			if d == MySQL && t.k == kOther && t.s == "<" {
				// "<<label>> LOOP ...": an Oracle-mode compound statement
				// (no MySQL statement starts with "<").
				s.tx = TxForGood
			}
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
		case pendColon, pendInto:
			// A MySQL user variable assigned (@x := ..., INTO @x) keeps
			// its value when the server rolls the statement back, and is
			// session state a plain read must not change.
			if t.k == kOther && (s.pending == pendColon && t.s == "=" || s.pending == pendInto && t.s == "@") {
				s.notRead, s.notAtomic = true, true
			}
			// INTO OUTFILE / DUMPFILE writes a file on the server, before
			// any row is read, that a rollback of the statement leaves
			// behind: a re-run fails with 1086, file exists (attack14).
			if s.pending == pendInto && t.k == kWord && (strings.EqualFold(t.s, "OUTFILE") || strings.EqualFold(t.s, "DUMPFILE")) {
				s.notRead, s.notAtomic = true, true
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
		case d == MySQL && len(t.s) == 4 && strings.EqualFold(t.s, "INTO"):
			s.pending = pendInto
		}
	case kOther:
		if d == MySQL && t.s == ":" {
			s.pending = pendColon
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

// inner starts reading the statement after SET STATEMENT ... FOR as if it
// were alone: what it does to the transaction is what the text does (FOR
// COMMIT, FOR START TRANSACTION, FOR CALL p()). The whole stays no read
// and not atomic, as a statement that starts with SET; a TxForGood before
// the FOR stays.
func (s *stmt) inner() {
	*s = stmt{notRead: true, notAtomic: true, forGood: s.forGood || s.tx == TxForGood}
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
// a call of a function the reader knows to have a side effect (or to run
// an SQL text it is given), or, in MySQL, an assignment to a variable
// (@x := ..., INTO @x). A function of the user's own with side effects
// cannot be told apart.
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
// transaction control, statements that call functions whose effects
// survive a rollback (dblink, session advisory locks, GET_LOCK, functions
// that run an SQL text) and MySQL statements that assign a user variable
// (the rollback does not undo it) are not.
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
