package sqltext

import "strings"

// PostgresCode returns the code of q as PostgreSQL reads it, once per
// reading that could tell its tokens apart (standard_conforming_strings
// on, and off when q has a backslash): its tokens in lower case, one
// space between them, the comments left out, every string literal (plain,
// E”, B”, X”, N”, U&”, a dollar-quoted body) as ” and a quoted name
// as "name". Word checks on it see only code: a word in a string or a
// comment is not there, and a quote in a comment hides nothing. A token
// the server rejects (an unterminated literal or comment, a name in
// Unicode escapes) is ?; an unterminated literal or comment ends the
// reading. It allocates: it is for statements that need a closer look,
// not for every statement.
func PostgresCode(q string) (out [2]string, n int) {
	fs, nf := readings(Postgres, q)
	for _, f := range fs[:nf] {
		out[n] = postgresCode(q, f)
		n++
	}
	return out, n
}

func postgresCode(q string, flags uint8) string {
	var b strings.Builder
	b.Grow(len(q))
	l := lexer{q: q, flags: flags}
	for {
		t := l.nextPG()
		if t.k == kEOF {
			return b.String()
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		switch t.k {
		case kWord:
			b.WriteString(strings.ToLower(t.s))
		case kQuoted:
			b.WriteByte('"')
			b.WriteString(t.s)
			b.WriteByte('"')
		case kString:
			b.WriteString("''")
		case kBad:
			b.WriteByte('?')
		default:
			b.WriteString(t.s)
		}
	}
}
