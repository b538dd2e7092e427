package sqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
	"time"
)

// A server that answered a statement is up (shared/DESIGN.md): an error it
// returned for the statement is that statement's, even when its code is
// one of an ended or refused session, unless the session really ended.
// PostgreSQL errors say so by their severity (pgSessionAnswered); MySQL
// errors do not, and a SIGNAL can raise any number: the connection is
// asked.

// mysqlSessionNumber: the numbers of a session the server ended (KILL, a
// shutdown, a network error it saw, an idle timeout) or refused (too many
// connections). Galera's 1047 is not one: a node outside the primary
// component answers it on a live session, and the work belongs elsewhere.
func mysqlSessionNumber(n uint16) bool {
	switch n {
	case 1927, 1053, 1080, 1152, 1158, 1159, 1160, 1161, 1040, 1203, 4031:
		return true
	}
	return false
}

// livenessTimeout bounds the ping that asks whether a session lives.
const livenessTimeout = 2 * time.Second

// mysqlSessionCandidate reports a MySQL error whose number says the
// session ended or was refused, on a connection the driver still holds
// open: whether the session lives must be asked. A user rule that
// classifies the error keeps the last word.
func (c *conn) mysqlSessionCandidate(err error) bool {
	n, _, ok := mysqlErrorOf(err)
	if !ok || !mysqlSessionNumber(n) {
		return false
	}
	var own *Error
	if errors.As(err, &own) {
		return false
	}
	for _, rule := range c.r.cfg.rules {
		if _, ok := rule(err); ok {
			return false
		}
	}
	v, ok := c.inner.(driver.Validator)
	return !ok || v.IsValid()
}

// answeredOnLiveSession reports a MySQL session-ended number got by an
// autocommit statement on a session that still answers: a statement raised
// it (SIGNAL), and it is that statement's. A killed or shut-down session
// is closed by the server right after its error, so the driver's ping
// fails (go-sql-driver/mysql then closes the connection). One round trip,
// only on this error path. Not for a transaction's statements: their error
// may come while the rows are still open, when go-sql-driver/mysql cannot
// ping (its ping would close the connection); the transaction's rollback
// answers the question there (tx.judgeSession).
func (c *conn) answeredOnLiveSession(ctx context.Context, err error) bool {
	if ctx.Err() != nil || !c.mysqlSessionCandidate(err) {
		return false
	}
	p, ok := c.inner.(driver.Pinger)
	if !ok {
		return false
	}
	pctx, cancel := context.WithTimeout(ctx, livenessTimeout)
	defer cancel()
	return p.Ping(pctx) == nil
}

// judgeSession settles a MySQL session-ended number a statement of this
// transaction got (sessionErr), once the transaction's ROLLBACK returned
// rbErr: a session that rolled back lives, and the error was the
// statement's (RunInTx does not replay it); one that could not was ended,
// and the error counts as it says (the connection is discarded, the
// breaker counts it, RunInTx replays).
func (t *tx) judgeSession(rbErr error) {
	err := t.sessionErr
	t.sessionErr = nil
	if rbErr == nil {
		if t.attempt != nil {
			t.attempt.answered = err
		}
		return
	}
	t.c.bad.Store(true)
	t.c.noteLost(err)
	t.c.r.record(ConnectionLost)
}

// pgInFailedTx: PostgreSQL's "current transaction is aborted" (25P02). In
// autocommit there is no transaction: a statement raised it.
func pgInFailedTx(err error) bool { return pgCodeOf(err) == "25P02" }

// pgCodeOf is the SQLSTATE of a PostgreSQL error in err's chain, or "".
func pgCodeOf(err error) string {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return pg.SQLState()
	}
	return ""
}

// cutInFlight reports an attempt's error that the end of the caller's
// context may have cut after the statement was sent: not the server's
// answer, and not a refusal before sending (driver.ErrBadConn: pgx's
// stdlib returns it for a context already done, database/sql checks the
// context before calling the driver).
func cutInFlight(err error) bool {
	return err != nil && !serverAnswered(err) && !errors.Is(err, driver.ErrBadConn)
}
