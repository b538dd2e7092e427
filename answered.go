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

// answeredOnLiveSession reports a MySQL error whose number says the
// session ended or was refused, got on a session that still answers: a
// statement raised it (SIGNAL), and it is that statement's. A killed or
// shut-down session is closed by the server right after its error, so the
// driver's ping fails (and go-sql-driver/mysql then closes the
// connection). Only on this error path: one round trip, never on success.
// A user rule that classifies the error keeps the last word.
func (c *conn) answeredOnLiveSession(ctx context.Context, err error) bool {
	n, _, ok := mysqlErrorOf(err)
	if !ok || !mysqlSessionNumber(n) || ctx == nil || ctx.Err() != nil {
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
	if v, ok := c.inner.(driver.Validator); ok && !v.IsValid() {
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

// pgInFailedTx: PostgreSQL's "current transaction is aborted" (25P02). In
// autocommit there is no transaction: a statement raised it.
func pgInFailedTx(err error) bool {
	var pg interface{ SQLState() string }
	return errors.As(err, &pg) && pg.SQLState() == "25P02"
}
