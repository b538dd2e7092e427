package sqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
)

// The question before COMMIT in the COMMIT's own network flight
// (issue 13, goal 2). prepareResolution asks for the transaction id in a
// round trip of its own before COMMIT: +18 % on a small transaction on a
// local server, and one more round trip (40 ms on a 20 ms link) on a slow
// one. A CommitFlight sends the question and COMMIT together, in one
// message; PostgreSQL runs them in order and answers both in one reply.
//
// The price: the id now comes back in the same reply as the COMMIT's
// outcome, so a reply lost before the question's answer arrived loses the
// id too, while the COMMIT may have run. Such a loss is ErrAmbiguousCommit,
// where the separate question resolves it (the question's own loss is a
// connection lost before COMMIT: replayed; a COMMIT lost after it is
// resolved by the id). Only an answer of the server's to the question (an
// error, FATAL included) proves that the COMMIT after it in the same
// message never ran. That is why the flight is an option, never a default.

// CommitFlight sends the question sqlretry asks before COMMIT together with
// the COMMIT, in one network flight on the driver's own connection. The
// root package does not import any driver: a driver-aware package (for
// pgx, github.com/sqlretry/sqlretry/pgxsqlretry) implements it, and
// WithCommitFlight installs it.
type CommitFlight interface {
	// Handles reports whether dc, the driver's connection (possibly
	// wrapped: follow Unwrap() driver.Conn), is one this flight can drive.
	// It sends nothing. When it reports false, sqlretry asks the question
	// in a round trip of its own, as without the flight.
	Handles(dc driver.Conn) bool

	// Commit sends question (one SELECT that returns one row) and then
	// COMMIT, in one flight, inside the open transaction, and reports:
	//   - row: the question's row, nil when it did not arrive;
	//   - askErr: the server's own error for the question (it has a
	//     SQLState). The COMMIT after it was then not run: the transaction
	//     is still open and aborted, or its session is gone. row is nil.
	//   - err: what the driver's Tx.Commit would have returned for the
	//     COMMIT (pgx.ErrTxCommitRollback's text for a COMMIT that rolled
	//     back), or, when row is nil and askErr is nil, the failure that
	//     lost the question's answer: the COMMIT may have run. It is
	//     driver.ErrBadConn only when nothing was sent (then the
	//     transaction is replayed: the server rolls it back).
	// The driver's own Tx is not told: sqlretry does not call its Commit
	// after a flight, and calls its Rollback after an askErr.
	Commit(ctx context.Context, dc driver.Conn, question string) (row []driver.Value, askErr, err error)
}

// WithCommitFlight sends the PostgreSQL question before COMMIT (see
// WithCommitResolution) in the COMMIT's own network flight through f, when
// f handles the driver's connection (default: no flight, a round trip of
// its own). It saves that round trip on every writing transaction, at a
// price: a reply lost before the question's answer arrived is
// ErrAmbiguousCommit, where the separate question would have resolved it
// (README, "Lost COMMITs"). nil turns the flight off.
func WithCommitFlight(f CommitFlight) Option {
	return func(c *config) error { c.commitFlight = f; return nil }
}

// oneFlight returns the flight to commit t with, or nil for the usual
// question and COMMIT.
func (t *tx) oneFlight() CommitFlight {
	r := t.c.r
	f := r.cfg.commitFlight
	if f == nil || r.dialect != DialectPostgres || !r.cfg.resolveCommits || r.resolution.broken.Load() || !f.Handles(t.c.inner) {
		return nil
	}
	return f
}

// commitInOneFlight is commit's path for a writing transaction with a
// flight: the question of prepareResolution and the COMMIT in one flight.
func (t *tx) commitInOneFlight(f CommitFlight) error {
	c, r := t.c, t.c.r
	if err := t.ctx.Err(); err != nil {
		// As in commit: nothing sent, the outcome is known.
		_ = t.rollback()
		return err
	}
	q, ask, proof := r.pgAskQuery(c)
	row, askErr, err := f.Commit(t.ctx, c.inner, q)
	switch {
	case askErr != nil:
		// The server refused the question; the COMMIT after it in the same
		// message did not run (TestPostgresOneFlightQuestionErrorSkipsCommit).
		_ = t.rollback()
		return t.questionFailed(q, askErr, proof)
	case row == nil:
		// The question's answer was lost: the id is unknown and the COMMIT
		// may have run. commitFailed finds no id to ask by: ambiguous,
		// never "not committed".
		if err == nil {
			err = errors.New("sqlretry: the commit flight returned neither a row nor an error")
		}
		return t.commitFailed(err)
	}
	t.pgTakeAnswer(row, ask, proof)
	if err == nil {
		r.succeeded(ticket{})
		t.afterCommit()
		return nil
	}
	return t.commitFailed(err)
}

// questionFailed is prepareResolution's answer to a question the server
// refused: the transaction was aborted before COMMIT.
func (t *tx) questionFailed(q string, err error, proof bool) error {
	r := t.c.r
	if proof && r.pgProofRefused(err) {
		// Replay once, without the proof from now on.
		return newError("commit", 1, RetryTransaction, nil, err)
	}
	if q == pgAskXIDAndServer && r.pgReplayRefused(err) {
		// Replay once, without the replay position from now on: the
		// question asks nothing else the question before it did not.
		return newError("commit", 1, RetryTransaction, nil, err)
	}
	if lacksFunction(err) {
		// An engine without the functions (CockroachDB): replay once and
		// stop asking.
		r.resolution.broken.Store(true)
		return newError("commit", 1, RetryTransaction, nil, err)
	}
	return r.resolutionFailed(t.ctx, "asking for the transaction id", err)
}
