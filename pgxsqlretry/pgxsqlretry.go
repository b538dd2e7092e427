// Package pgxsqlretry sends sqlretry's question before COMMIT in the
// COMMIT's own network flight, through pgx's connection, so that lost-COMMIT
// resolution on PostgreSQL costs no round trip of its own:
//
//	db, err := sqlretry.Open("pgx", dsn, pgxsqlretry.CommitInOneFlight())
//
// It is a package of its own so that the sqlretry package never imports
// pgx. The price of the saved round trip: a reply lost before the
// question's answer arrived is sqlretry.ErrAmbiguousCommit, where the
// separate question would have resolved it (README, "Lost COMMITs").
package pgxsqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// CommitInOneFlight is the sqlretry option that sends the question before
// COMMIT and the COMMIT in one message of PostgreSQL's simple query
// protocol on connections of pgx's database/sql driver (stdlib); other
// drivers' connections keep the separate question.
func CommitInOneFlight() sqlretry.Option { return sqlretry.WithCommitFlight(Flight{}) }

// Flight is the sqlretry.CommitFlight for pgx's stdlib connections.
type Flight struct{}

var _ sqlretry.CommitFlight = Flight{}

// Handles reports whether dc is, or wraps, a *stdlib.Conn.
func (Flight) Handles(dc driver.Conn) bool { return pgConnOf(dc) != nil }

// pgConnOf follows Unwrap() driver.Conn (the sqlretry convention, also
// what other decorators offer) down to pgx's connection.
func pgConnOf(dc driver.Conn) *pgconn.PgConn {
	for i := 0; dc != nil && i < 16; i++ {
		if sc, ok := dc.(*stdlib.Conn); ok {
			return sc.Conn().PgConn()
		}
		u, ok := dc.(interface{ Unwrap() driver.Conn })
		if !ok {
			return nil
		}
		dc = u.Unwrap()
	}
	return nil
}

// Commit sends "question; COMMIT" as one Query message. Inside the
// transaction block that BEGIN opened, the COMMIT there ends it. The
// server runs the statements in order and answers them in order; after an
// error it skips the rest of the message, so an error in place of the
// question's result (FATAL included) proves that the COMMIT did not run.
// The simple protocol is used whatever the connection's
// default_query_exec_mode: the question has no parameters, and its
// answer comes as text.
//
// pgx's own Tx for the transaction is left as it is: it holds no resource,
// and stdlib checks the connection's transaction status (idle after the
// COMMIT) when the pool takes the connection back.
func (Flight) Commit(ctx context.Context, dc driver.Conn, question string) (row []driver.Value, askErr, err error) {
	pc := pgConnOf(dc)
	if pc == nil {
		return nil, nil, errors.New("pgxsqlretry: not a pgx connection")
	}
	if pc.IsClosed() {
		// pgconn refuses before it writes anything: proven "not sent", as
		// stdlib reports a closed connection. (pgconn's SafeToRetry is not
		// trusted beyond this: see sqlretry's commitOutcomeUnknown.)
		return nil, nil, driver.ErrBadConn
	}
	mrr := pc.Exec(ctx, question+"; COMMIT")
	// The question's result.
	if mrr.NextResult() {
		rr := mrr.ResultReader()
		for rr.NextRow() {
			if row == nil {
				row = decodeRow(rr.FieldDescriptions(), rr.Values())
			}
		}
		if _, err := rr.Close(); err != nil {
			return answeredOrLost(row, err)
		}
	} else {
		// No result: an error before the question's first row (an error the
		// server raised planning it, a lost connection); Close has it.
		return answeredOrLost(nil, mrr.Close())
	}
	if row == nil {
		_ = mrr.Close()
		return nil, nil, errors.New("pgxsqlretry: the question returned no row")
	}
	// The COMMIT's result, as pgx.Tx.Commit judges it.
	if !mrr.NextResult() {
		err := mrr.Close()
		if err == nil {
			err = errors.New("pgxsqlretry: no result for COMMIT")
		}
		return row, nil, err
	}
	tag, err := mrr.ResultReader().Close()
	if cerr := mrr.Close(); err == nil {
		err = cerr
	}
	if err == nil && tag.String() == "ROLLBACK" {
		err = pgx.ErrTxCommitRollback
	}
	return row, nil, err
}

// answeredOrLost sorts a failure of the question: the server's own error
// (with a SQLState) is an answer, and the COMMIT after it did not run;
// anything else lost the answer. A row that arrived carries the id, which
// is all sqlretry needs to resolve the COMMIT whatever happened after it.
func answeredOrLost(row []driver.Value, err error) ([]driver.Value, error, error) {
	if err == nil {
		err = errors.New("pgxsqlretry: the question's result ended without an error")
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return nil, err, nil
	}
	return row, nil, err
}

// decodeRow turns the question's text-format row into the values
// database/sql drivers give: integers as int64, NULL as nil, the rest as
// strings.
func decodeRow(fds []pgconn.FieldDescription, vals [][]byte) []driver.Value {
	row := make([]driver.Value, len(vals))
	for i, v := range vals {
		if v == nil {
			continue
		}
		if i < len(fds) && fds[i].Format == pgtype.TextFormatCode {
			switch fds[i].DataTypeOID {
			case pgtype.Int8OID, pgtype.Int4OID, pgtype.Int2OID:
				if n, err := strconv.ParseInt(string(v), 10, 64); err == nil {
					row[i] = n
					continue
				}
			}
		}
		row[i] = string(v)
	}
	return row
}
