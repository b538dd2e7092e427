// Package sqltext reads just enough SQL to make sqlretry's safety
// decisions: is a text one plain read, is it one statement the server runs
// atomically, and does it open or close a transaction by hand.
//
// It is a lexer, one state machine per dialect, that follows each server's
// token rules (PostgreSQL: "4.1. Lexical Structure"; MySQL: "9.1 Literal
// Values", "9.2 Schema Object Names", "9.7 Comments"), so that a keyword
// inside a literal, a quoted name or a comment is never taken for code and
// code is never taken for a comment. Where a server setting changes the
// token boundaries (PostgreSQL standard_conforming_strings, MySQL
// NO_BACKSLASH_ESCAPES and ANSI_QUOTES, MySQL version-gated comments), the
// text is read every way and a verdict holds only when all readings agree.
// When in doubt the answer is "not a read", "not atomic".
//
// The verdicts are checked against PostgreSQL's own parser and TiDB's MySQL
// parser in the sqlparsecheck module.
package sqltext

import "strings"

// Dialect is the SQL dialect of a text. Unknown reads it as both.
type Dialect uint8

// The dialects, in the order of sqlretry.Dialect.
const (
	Unknown Dialect = iota
	Postgres
	MySQL
)

type kind uint8

const (
	kEOF    kind = iota
	kWord        // an unquoted identifier or keyword (MySQL: also numbers)
	kQuoted      // a quoted identifier; s is its inside
	kString      // a string literal of any kind
	kNumber      // PostgreSQL numbers
	kParam       // $1, ?
	kSemi        // ; the statement separator
	kLParen      // (
	kOther       // operators and punctuation
	kBad         // an unterminated literal or comment, or a byte the server rejects
)

type token struct {
	k kind
	s string
}

// Reading flags: the server settings that change token boundaries.
const (
	pgBackslashStrings = 1 << iota // standard_conforming_strings = off: '...' takes backslash escapes
	myNoBackslash                  // sql_mode NO_BACKSLASH_ESCAPES
	myANSIQuotes                   // sql_mode ANSI_QUOTES: "..." is a name, not a string
	myGatedAsComment               // a version-gated /*!NNNNN ... */ comment the server skips
)

type lexer struct {
	q      string
	i      int
	flags  uint8
	inExec bool // MySQL: inside an executable comment /*! ... */
}

// isSpace: white space in MySQL (my_isspace) and PostgreSQL 16 and later
// (\v is an error in 15, where the text then runs nothing).
func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isLetter(c byte) bool { return c|0x20 >= 'a' && c|0x20 <= 'z' || c == '_' || c >= 0x80 }

// --- PostgreSQL ---------------------------------------------------------

// nextPG returns the next token by PostgreSQL's rules (scan.l).
func (l *lexer) nextPG() token {
	q := l.q
	for l.i < len(q) {
		c := q[l.i]
		switch {
		case isSpace(c):
			l.i++
		case c == '-' && l.i+1 < len(q) && q[l.i+1] == '-':
			// "--" starts a comment anywhere, even inside an operator.
			for l.i < len(q) && q[l.i] != '\n' && q[l.i] != '\r' {
				l.i++
			}
		case c == '/' && l.i+1 < len(q) && q[l.i+1] == '*':
			// Block comments nest in PostgreSQL (unlike the SQL standard's).
			depth := 0
			for {
				if l.i+1 >= len(q) {
					l.i = len(q)
					return token{k: kBad}
				}
				if q[l.i] == '/' && q[l.i+1] == '*' {
					depth++
					l.i += 2
				} else if q[l.i] == '*' && q[l.i+1] == '/' {
					depth--
					l.i += 2
					if depth == 0 {
						break
					}
				} else {
					l.i++
				}
			}
		default:
			return l.tokenPG(c)
		}
	}
	return token{k: kEOF}
}

func (l *lexer) tokenPG(c byte) token {
	q, start := l.q, l.i
	switch {
	case isLetter(c):
		j := start + 1
		for j < len(q) && (isLetter(q[j]) || isDigit(q[j]) || q[j] == '$') {
			j++
		}
		if j-start == 1 && j < len(q) {
			switch c | 0x20 {
			case 'e': // E'...': C-style backslash escapes, whatever the settings
				if q[j] == '\'' {
					return l.quoted(j, '\'', kString, true)
				}
			case 'b', 'x': // bit strings: no escapes at all
				if q[j] == '\'' {
					return l.quoted(j, '\'', kString, false)
				}
			case 'n':
				if q[j] == '\'' {
					return l.quoted(j, '\'', kString, l.flags&pgBackslashStrings != 0)
				}
			case 'u': // U&'...' and U&"...": Unicode escapes, never escaping the quote
				if q[j] == '&' && j+1 < len(q) && (q[j+1] == '\'' || q[j+1] == '"') {
					k := kString
					if q[j+1] == '"' {
						k = kBad // a name written in escapes: could spell anything
					}
					t := l.quoted(j+1, q[j+1], k, false)
					if t.k != kBad {
						t.k = k
					}
					return t
				}
			}
		}
		l.i = j
		return token{k: kWord, s: q[start:j]}
	case c == '"':
		t := l.quoted(start, '"', kQuoted, false)
		if t.k == kQuoted && t.s == "" {
			t.k = kBad // zero-length delimited identifier
		}
		return t
	case c == '\'':
		return l.quoted(start, '\'', kString, l.flags&pgBackslashStrings != 0)
	case c == '$':
		j := start + 1
		if j < len(q) && isDigit(q[j]) {
			for j < len(q) && isDigit(q[j]) {
				j++
			}
			if j < len(q) && (isLetter(q[j]) || q[j] == '$') {
				l.i = j // "$1abc": trailing junk
				return token{k: kBad}
			}
			l.i = j
			return token{k: kParam, s: q[start:j]}
		}
		// Dollar quoting: $tag$ ... $tag$, the tag an identifier without $.
		if j < len(q) && isLetter(q[j]) {
			for j < len(q) && (isLetter(q[j]) || isDigit(q[j])) {
				j++
			}
		}
		if j >= len(q) || q[j] != '$' {
			l.i = start + 1 // a lone "$"
			return token{k: kBad}
		}
		tag := q[start : j+1]
		end := strings.Index(q[j+1:], tag)
		if end < 0 {
			l.i = len(q)
			return token{k: kBad}
		}
		l.i = j + 1 + end + len(tag)
		return token{k: kString, s: q[j+1 : j+1+end]}
	case isDigit(c) || c == '.' && start+1 < len(q) && isDigit(q[start+1]):
		j := scanNumber(q, start)
		if j < len(q) && (isLetter(q[j]) || isDigit(q[j]) || q[j] == '$') {
			// "1into": PostgreSQL 15 reads 1 INTO, 16 and later reject it
			// ("trailing junk"), and 0x1F, 1_000 are numbers only since 16.
			l.i = j
			return token{k: kBad}
		}
		l.i = j
		return token{k: kNumber, s: q[start:j]}
	case c == ';':
		l.i++
		return token{k: kSemi, s: ";"}
	case c == '(':
		l.i++
		return token{k: kLParen, s: "("}
	}
	switch c {
	case ')', ',', '.', ':', '[', ']', '+', '-', '*', '/', '<', '>', '=', '~', '!', '@', '#', '%', '^', '&', '|', '`', '?':
		// Operators are read one byte at a time: what matters is that a
		// "--" or "/*" inside one still starts a comment (nextPG), and that
		// "#" is an operator (#>>, #-), never a comment.
		l.i++
		return token{k: kOther, s: q[start:l.i]}
	}
	l.i = start + 1 // a backslash, NUL, control byte: the server rejects it
	return token{k: kBad}
}

// quoted reads a literal or name that opens with the quote at q[open], by
// both dialects' rules: the quote doubled stands for itself, and with
// backslash a backslash escapes the next byte; a NUL is refused.
func (l *lexer) quoted(open int, quote byte, k kind, backslash bool) token {
	q := l.q
	for i := open + 1; i < len(q); i++ {
		switch q[i] {
		case '\\':
			if backslash {
				i++
			}
		case quote:
			if i+1 < len(q) && q[i+1] == quote {
				i++
				continue
			}
			l.i = i + 1
			return token{k: k, s: q[open+1 : i]}
		case 0:
			l.i = len(q)
			return token{k: kBad}
		}
	}
	l.i = len(q)
	return token{k: kBad}
}

// --- MySQL / MariaDB ----------------------------------------------------

// nextMy returns the next token by MySQL's and MariaDB's rules (sql_lex.cc).
func (l *lexer) nextMy() token {
	q := l.q
	for l.i < len(q) {
		c := q[l.i]
		switch {
		case isSpace(c):
			l.i++
		case c == '#':
			for l.i < len(q) && q[l.i] != '\n' {
				l.i++
			}
		case c == '-' && l.i+1 < len(q) && q[l.i+1] == '-' && (l.i+2 == len(q) || q[l.i+2] <= ' ' || q[l.i+2] == 0x7f):
			// "-- " needs white space or a control character after it:
			// "1--1" is one minus minus one.
			for l.i < len(q) && q[l.i] != '\n' {
				l.i++
			}
		case c == '/' && l.i+1 < len(q) && q[l.i+1] == '*':
			j := l.i + 2
			exec := false
			if j < len(q) && q[j] == '!' {
				exec, j = true, j+1
			} else if j+1 < len(q) && q[j] == 'M' && q[j+1] == '!' { // MariaDB's /*M! ... */
				exec, j = true, j+2
			}
			if exec && l.flags&myGatedAsComment == 0 {
				// An executable comment: its inside is code (the server
				// runs it unless its version gate says otherwise).
				if l.inExec {
					l.i = len(q)
					return token{k: kBad}
				}
				for j < len(q) && isDigit(q[j]) {
					j++
				}
				l.i, l.inExec = j, true
				continue
			}
			end := strings.Index(q[l.i+2:], "*/")
			if end < 0 {
				l.i = len(q)
				return token{k: kBad}
			}
			l.i += 2 + end + 2
		case c == '*' && l.inExec && l.i+1 < len(q) && q[l.i+1] == '/':
			l.i += 2
			l.inExec = false
		default:
			return l.tokenMy(c)
		}
	}
	if l.inExec {
		l.inExec = false // unterminated: bad once, then the end
		return token{k: kBad}
	}
	return token{k: kEOF}
}

func (l *lexer) tokenMy(c byte) token {
	q, start := l.q, l.i
	switch {
	case isDigit(c) || c == '.' && start+1 < len(q) && isDigit(q[start+1]):
		// MySQL ends a number where a name would go on ("1.5into" is 1.5
		// INTO, "1e5into" is 1e5 INTO) but reads "1into" as one name. The
		// reader always ends the number: what follows is read as a word,
		// which can only make it more cautious.
		j := scanNumber(q, start)
		l.i = j
		return token{k: kWord, s: q[start:j]}
	case isLetter(c) || c == '$':
		j := start + 1
		for j < len(q) && (isLetter(q[j]) || isDigit(q[j]) || q[j] == '$') {
			j++
		}
		if j-start == 1 && j < len(q) && q[j] == '\'' {
			switch c | 0x20 {
			case 'x', 'b': // X'..', B'..': no escapes
				return l.quoted(j, '\'', kString, false)
			}
		}
		l.i = j
		return token{k: kWord, s: q[start:j]}
	case c == '\'':
		return l.quoted(start, '\'', kString, l.flags&myNoBackslash == 0)
	case c == '"':
		if l.flags&myANSIQuotes != 0 {
			return l.quoted(start, '"', kQuoted, false)
		}
		return l.quoted(start, '"', kString, l.flags&myNoBackslash == 0)
	case c == '`':
		return l.quoted(start, '`', kQuoted, false)
	case c == '?':
		l.i++
		return token{k: kParam, s: "?"}
	case c == ';':
		l.i++
		return token{k: kSemi, s: ";"}
	case c == '(':
		l.i++
		return token{k: kLParen, s: "("}
	}
	switch c {
	case ')', ',', '.', ':', '[', ']', '{', '}', '+', '-', '*', '/', '<', '>', '=', '~', '!', '@', '%', '^', '&', '|':
		l.i++
		return token{k: kOther, s: q[start:l.i]}
	}
	l.i = start + 1 // a backslash (\N), NUL, control byte
	return token{k: kBad}
}

// scanNumber returns the end of the number at q[start]: digits, a
// fraction, an exponent with at least one digit.
func scanNumber(q string, start int) int {
	j := start
	for j < len(q) && isDigit(q[j]) {
		j++
	}
	if j < len(q) && q[j] == '.' {
		j++
		for j < len(q) && isDigit(q[j]) {
			j++
		}
	}
	if j < len(q) && q[j]|0x20 == 'e' {
		k := j + 1
		if k < len(q) && (q[k] == '+' || q[k] == '-') {
			k++
		}
		if k < len(q) && isDigit(q[k]) {
			for k < len(q) && isDigit(q[k]) {
				k++
			}
			j = k
		}
	}
	return j
}
