package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sqlretry/sqlretry/internal/sqltext"
)

var _ driver.Tx = (*tx)(nil)

// tx is the Tx decorator and the state of the transaction open on a conn.
// No statement inside a transaction is retried on its own. The first
// retryable error poisons the transaction: later statements and COMMIT fail
// with it without reaching the server. That matters on MySQL, where a
// deadlock rolls the transaction back and later statements would run in
// autocommit: a silent partial write if the caller swallowed the error.
type tx struct {
	c        *conn
	inner    driver.Tx
	ctx      context.Context // BeginTx's context: the deadline for resolving a lost COMMIT
	readOnly bool
	attempt  *txAttempt // set when RunInTx began this transaction

	poison   error  // first retryable error
	firstErr error  // first error of any class (PostgreSQL aborts on any)
	wrote    bool   // ran something other than a plain read
	xid      int64  // PostgreSQL transaction id taken before COMMIT, 0 if none
	mark     pgMark // where xid is in the WAL (resolve_failover.go)
	token    []byte
	marker   string // the MySQL marker table token went into
	sentinel []byte // that table's sentinel row when it was checked (resolve.go)
	// markerWithCommit: the marker's INSERT is sent with the COMMIT
	// (commitWithMarker).
	markerWithCommit bool
	// nothingDurable: the server held the transaction read-only (a
	// PostgreSQL standby, a MySQL READ ONLY transaction): its COMMIT can
	// make nothing last, so a lost one needs no resolution.
	nothingDurable bool
	// sessionErr: a MySQL session-ended number a statement got on a
	// connection still open, judged at the rollback (judgeSession).
	sessionErr error
	// escaped: a statement ended or started a transaction by itself
	// (escapesTx): part of the work may be committed already, so a lost
	// COMMIT is never turned into a replay.
	escaped bool
	// lockedTables: LOCK TABLES ran in it (MySQL): no commit marker.
	lockedTables bool
}

// guard refuses statements in a poisoned transaction, except ROLLBACK TO
// SAVEPOINT, which may revive it.
func (t *tx) guard(query string) error {
	if t.poison != nil && !isRollbackToSavepoint(query) {
		return &poisonedError{cause: t.poison}
	}
	return nil
}

// done records a statement's result inside the transaction. A statement
// that ends or starts a transaction by itself escapes it, whether it
// succeeded or not (MySQL commits before a DDL statement runs). A read run
// with a NotIdempotent context counts as a write: the caller said it has
// an effect (a function of the user's own called by a SELECT).
func (t *tx) done(ctx context.Context, err error, query string, isQuery bool) {
	if t.c.escapesTx(query) {
		t.escape(query)
	}
	if a := t.attempt; a != nil && a.rare != nil && a.rare.boundMS > 0 && (!a.rare.touched || !a.rare.sticky) && !isShortWaitQuery(query) {
		st := readSettingText(query) // once for both checks
		if !a.rare.touched && st.touches(a.boundSetting()) {
			// The closure may have read or set the setting: the attempt
			// is not committed, it runs again unbounded (touchedRedo).
			a.rare.touched = true
		}
		if !a.rare.sticky && st.sticky() {
			a.rare.sticky = true
		}
	}
	if err == nil {
		t.c.r.succeeded(ticket{})
		if !t.wrote && (!isQuery || !t.c.isReadQuery(query) || markedNotIdempotent(ctx)) && !isShortWaitQuery(query) {
			t.wrote = true // (the short-wait statements write nothing: shortwait.go)
		}
		if (t.poison != nil || t.firstErr != nil) && isRollbackToSavepoint(query) {
			t.poison, t.firstErr = nil, nil // the server accepted it: the transaction lives on
			t.attempt.revived()
		}
		return
	}
	t.failed(err, query)
}

// mayTouchSetting says whether a statement may read or set the setting
// name, read widely, since a false match costs only one more attempt
// (touchedRedo): its name anywhere in the text (SET "lock_timeout", a
// comment, a string); a Unicode escape (U&"..." or U&'...' can spell the
// name or a function without their letters: attack21); pg_settings,
// pg_show_all_settings, and the ..._to_xml functions (query_to_xml runs an
// SQL text it is given, table_to_xml reads a relation named at run time:
// attack21, attack22); set_config or current_setting unless each call's
// first argument is a plain string of another setting's name (the
// row-level security idiom set_config('app.tenant', $1, true), run in
// every transaction, was taken for a touch: attack21); and, outside
// comments and string data (sqltext.PostgresCode, in each reading:
// with a backslash in the text, standard_conforming_strings on and off),
// SHOW ALL, and CALL, DO and EXECUTE as words, whatever follows them
// (attack17: "CALL\n p()" and EXECUTE were missed). SHOW of another
// setting is not a touch (attack22: SHOW TimeZone ran closures twice). A function, view, trigger, column default, check constraint
// or policy of the user's own that reads or sets it from a plain
// statement cannot be seen.
func mayTouchSetting(query, name string) bool { return readSettingText(query).touches(name) }

// settingText is a statement as the setting checks read it: lower case,
// and its code (sqltext.PostgresCode: comments left out, string data
// blanked) in each reading PostgreSQL may give it, made once per
// statement for both checks.
type settingText struct {
	lower string
	code  [2]string
	n     int
}

func readSettingText(query string) settingText {
	st := settingText{lower: strings.ToLower(query)}
	st.code, st.n = sqltext.PostgresCode(query)
	return st
}

// touches is mayTouchSetting.
func (st settingText) touches(name string) bool {
	q := st.lower
	if strings.Contains(q, name) || strings.Contains(q, "u&") || strings.Contains(q, "pg_settings") ||
		strings.Contains(q, "show_all_settings") || strings.Contains(q, "_to_xml") ||
		settingCall(q, "set_config") || settingCall(q, "current_setting") {
		return true
	}
	for _, c := range st.code[:st.n] {
		if touchWords(c) {
			return true
		}
	}
	return false
}

// touchWords says whether the lower-case code w holds SHOW ALL, a DO
// block, or CALL or EXECUTE as a word.
func touchWords(w string) bool {
	return doBlock(w) || hasWord(w, "call") || hasWord(w, "execute") || showAll(w)
}

// showAll says whether w holds the words SHOW ALL.
func showAll(w string) bool {
	for i := 0; ; {
		j := strings.Index(w[i:], "show")
		if j < 0 {
			return false
		}
		start := i + j
		i = start + 4
		if start > 0 && identByte(w[start-1]) || i < len(w) && identByte(w[i]) {
			continue
		}
		rest := strings.TrimLeft(w[i:], " \t\r\n\f\v")
		if strings.HasPrefix(rest, "all") && (len(rest) == 3 || !identByte(rest[3])) {
			return true
		}
	}
}

// sessionSticky says whether a statement may leave session state that a
// rollback does not undo: a prepared statement made or dropped in SQL
// (PREPARE, DEALLOCATE, DISCARD), a session advisory lock, work through
// dblink on another session. An attempt that ran one is not run again
// for a touched bound (touchedRedo): the run again would PREPARE twice
// (42P05), EXECUTE what the first run deallocated (26000), or take the
// lock twice (attack22).
func sessionSticky(query string) bool { return readSettingText(query).sticky() }

// sticky is sessionSticky.
func (st settingText) sticky() bool {
	for _, q := range st.code[:st.n] {
		if hasWord(q, "prepare") || hasWord(q, "deallocate") || hasWord(q, "discard") ||
			strings.Contains(q, "_advisory_lock") || strings.Contains(q, "dblink") {
			return true
		}
	}
	return false
}

// settingCall says whether the lower-case q calls f (set_config,
// current_setting) with anything but a plain string literal as its first
// argument: a parameter, an expression, another kind of literal. (A plain
// literal naming the setting itself is caught by the name's search.)
func settingCall(q, f string) bool {
	for i := 0; ; {
		j := strings.Index(q[i:], f)
		if j < 0 {
			return false
		}
		i += j + len(f)
		rest := strings.TrimLeft(q[i:], " \t\r\n")
		if !strings.HasPrefix(rest, "(") {
			continue // not a call: a column or a word in a string
		}
		rest = strings.TrimLeft(rest[1:], " \t\r\n")
		if len(rest) == 0 || rest[0] != '\'' {
			return true
		}
		end := strings.IndexByte(rest[1:], '\'')
		if end < 0 || strings.IndexByte(rest[1:end+1], '\\') >= 0 {
			return true
		}
		after := strings.TrimLeft(rest[end+2:], " \t\r\n")
		if len(after) == 0 || after[0] != ',' && after[0] != ')' {
			return true // 'lock' || '_timeout', '...'::text, a doubled quote
		}
	}
}

// doBlock says whether the lower-case q holds a DO statement: the word do
// followed by its body's dollar quote or string, or by LANGUAGE; not ON
// CONFLICT DO NOTHING / DO UPDATE.
func doBlock(q string) bool {
	for i := 0; ; {
		j := strings.Index(q[i:], "do")
		if j < 0 {
			return false
		}
		j += i
		i = j + 2
		if j > 0 && identByte(q[j-1]) || i < len(q) && identByte(q[i]) && q[i] != '$' {
			continue
		}
		rest := strings.TrimLeft(q[i:], " \t\r\n")
		if strings.HasPrefix(rest, "$") || strings.HasPrefix(rest, "'") || strings.HasPrefix(rest, "e'") || strings.HasPrefix(rest, "language") {
			return true
		}
	}
}

// hasWord says whether the lower-case word w stands in q on its own: not
// part of a longer identifier (letters, digits, _ and $ around it).
func hasWord(q, w string) bool {
	for i := 0; ; {
		j := strings.Index(q[i:], w)
		if j < 0 {
			return false
		}
		j += i
		end := j + len(w)
		if (j == 0 || !identByte(q[j-1])) && (end == len(q) || !identByte(q[end]) || q[end] == '$') {
			return true
		}
		i = j + 1
	}
}

func identByte(b byte) bool {
	return b == '_' || b == '$' || b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b >= 0x80
}

// escape marks the transaction escaped (done). A statement that leaves
// the session out of plain autocommit for good (SET autocommit, SET
// completion_type, and what sqlretry cannot see into: txForGood) outlives
// the transaction: the connection stays manual, as when it runs outside
// one (conn.noteTxControl).
func (t *tx) escape(query string) {
	t.escaped = true
	if q := strings.Join(strings.Fields(strings.ToLower(query)), " "); strings.Contains(q, "lock table") ||
		strings.Contains(q, "read lock") || strings.Contains(q, "for export") || strings.Contains(q, "backup lock") {
		// Anywhere in the text (after a comment, in SET STATEMENT ... FOR,
		// a second statement): a false match only leaves the marker out.
		// FLUSH TABLES ... WITH READ LOCK and ... FOR EXPORT lock tables
		// too: the marker's INSERT failed with 1100 and the transaction
		// was reported failed where the plain COMMIT succeeds (attack15);
		// MariaDB's BACKUP LOCK, with 1223 (attack16).
		t.lockedTables = true
	}
	if t.attempt != nil {
		t.attempt.escaped = true
	}
	if t.c.txControl(query) == txForGood {
		t.c.manual.Store(2)
	}
}

// failed notes an error inside the transaction.
func (t *tx) failed(err error, query string) {
	if isPassThrough(err) {
		return
	}
	var p *poisonedError
	if errors.As(err, &p) {
		return
	}
	r := t.c.r
	cls := r.classify(err)
	if (cls == ConnectionLost || cls == Unavailable) && t.c.mysqlSessionCandidate(err) {
		// A MySQL session-ended number on a connection still open: a SIGNAL
		// (the statement's) or a KILL. The rollback tells (judgeSession).
		cls = Permanent
		t.sessionErr = err
	}
	pending := false
	if cls == Permanent && !t.readOnly && isReadOnlyAnswer(err) {
		// A write refused as read-only in a transaction the caller did not
		// declare read-only: the user's session setting, or a standby.
		switch r.dialect {
		case DialectMySQL: // the transaction lives on and can answer
			var standby bool
			if err, standby = t.c.judgeReadOnly(t.ctx, err); standby {
				cls = Unavailable
			}
		case DialectPostgres: // aborted: ask after the rollback; no COMMIT meanwhile
			pending = true
			t.c.readOnlyPending = true
			err = &readOnlyError{err: err}
		}
	}
	if isStandby(err) {
		r.record(Permanent) // the server answered: a standby is up
	} else {
		r.record(cls)
	}
	if cls == ConnectionLost || errors.Is(err, driver.ErrBadConn) {
		t.c.bad.Store(true)
		t.c.noteLost(err)
	}
	if t.firstErr == nil {
		t.firstErr = err
	}
	t.attempt.raised(err)
	if (cls != Permanent || pending) && t.poison == nil {
		t.poison = err
		if t.attempt != nil {
			t.attempt.poison = err
		}
	}
}

func (t *tx) exec(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if err := t.guard(query); err != nil {
		return nil, err
	}
	res, err := t.c.execInner(ctx, query, args)
	t.done(ctx, err, query, false)
	return res, err
}

func (t *tx) query(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if err := t.guard(query); err != nil {
		return nil, err
	}
	rows, err := t.c.queryInner(ctx, query, args)
	t.done(ctx, err, query, true)
	if err != nil {
		return nil, err
	}
	return &txRows{inner: rows, tx: t, query: query}, nil
}

func (t *tx) stmtExec(ctx context.Context, s *stmt, args []driver.NamedValue) (driver.Result, error) {
	if err := t.guard(s.query); err != nil {
		return nil, err
	}
	res, err := s.execInner(ctx, args)
	t.done(ctx, err, s.query, false)
	return res, err
}

func (t *tx) stmtQuery(ctx context.Context, s *stmt, args []driver.NamedValue) (driver.Rows, error) {
	if err := t.guard(s.query); err != nil {
		return nil, err
	}
	rows, err := s.queryInner(ctx, args)
	t.done(ctx, err, s.query, true)
	if err != nil {
		return nil, err
	}
	return &txRows{inner: rows, tx: t, query: s.query}, nil
}

func (t *tx) Rollback() error {
	t.c.tx = nil
	a := t.attempt
	err := t.rollback()
	if a != nil {
		a.ended.Store(endRolledBack)
	}
	return err
}

// Commit refuses a poisoned transaction, remembers what it needs to
// resolve a lost COMMIT, and never reports a COMMIT whose outcome it does
// not know as either success or failure. In a RunInTx attempt its outcome
// is recorded: a closure that commits itself (runTxOnce).
func (t *tx) Commit() error {
	a := t.attempt
	if h := a.redo(); h != nil {
		// The closure commits after it met sqlretry's own lock timeout
		// (caught in a savepoint: its "busy" branch), or after it may have
		// read or set the bound's setting: the plain driver would have
		// waited for the lock, and the closure would have seen the
		// session's value. Not committed; RunInTx runs the attempt again
		// unbounded (decide, runAttempt).
		_ = t.rollback()
		t.c.tx = nil
		if h == errBoundTouched {
			a.rare.commitRefused = true
		}
		a.ended.Store(endRolledBack)
		return &poisonedError{cause: h}
	}
	restore := a != nil && t.restoreBound(a)
	err := t.commit()
	if restore && err == nil {
		t.restoreBoundAfter(a)
	}
	if a != nil {
		a.commitErr = err
		a.ended.Store(endCommitted)
	} else if err == nil || errors.Is(err, ErrAmbiguousCommit) {
		// A transaction of its own (db.BeginTx on the outer *sql.DB)
		// committed inside an attempt's closure: that attempt must not be
		// replayed (noteCommit; hostile review 2026-12-02).
		noteCommit()
	}
	return err
}

// restoreBound says whether a COMMIT needs the bound restored after it:
// the closure may have made sqlretry's bound the session's value (a
// helper that saves the setting, changes it and sets back what it saved,
// at session level: attack15) and the attempt commits all the same,
// because part of its work committed by itself before (an escape: a
// hand-typed COMMIT, a nested RunInTx), so it cannot run again unbounded
// (touchedRedo). After the COMMIT the session's value, where it is the
// bound, is set back to the one the bound replaced (restoreBoundAfter).
// Behind PgBouncer in transaction mode that statement may reach another
// client's server session, where it does nothing unless that session's
// value is the bound too (attack19, gated). Nothing is done when the
// session cannot be asked or may not set it (a SET ROLE of the
// closure's): the session, with its role and temporary tables, is kept
// (attack16: discarding it lost them).
func (t *tx) restoreBound(a *txAttempt) bool {
	rr := a.rare
	return rr != nil && rr.touched && rr.boundMS > 0 && t.poison == nil && t.ctx.Err() == nil
}

// restoreBoundAfter runs the restore on the session after a COMMIT that
// succeeded (restoreBound).
func (t *tx) restoreBoundAfter(a *txAttempt) {
	rr := a.rare
	ctx, cancel := context.WithTimeout(t.ctx, 5*time.Second)
	defer cancel()
	_ = execConn(ctx, t.c.inner, restoreBoundQuery(a.boundSetting(), rr.boundMS, rr.boundPre))
}

// restoreBoundQuery sets name at session level back to pre where its value
// is the bound (ms), in one statement with no arguments: pgx sends it by
// the simple protocol, with no prepared statement a DEALLOCATE ALL of the
// closure could have taken away (attack17: a cached SHOW failed with 26000
// and the bound stayed the session's value). pg_settings gives these
// settings in ms whatever the display unit.
func restoreBoundQuery(name string, ms int64, pre string) string {
	return "SELECT pg_catalog.set_config('" + name + "', '" + strings.ReplaceAll(pre, "'", "''") + "', false) FROM pg_catalog.pg_settings WHERE name = '" +
		name + "' AND setting = '" + strconv.FormatInt(ms, 10) + "'" + shortLockMark
}

func (t *tx) commit() error {
	c, r := t.c, t.c.r
	defer func() { c.tx = nil }()
	if t.poison != nil {
		_ = t.rollback()
		r.counters.poisoned.Add(1)
		return &poisonedError{cause: t.poison}
	}
	if t.wrote {
		if f := t.oneFlight(); f != nil {
			return t.commitInOneFlight(f) // resolve_flight.go
		}
		if err := t.prepareResolution(); err != nil {
			_ = t.rollback()
			return err
		}
	}
	if err := t.ctx.Err(); err != nil {
		// The caller's deadline came before COMMIT was sent: do not send
		// it, so that the outcome is known (not committed).
		_ = t.rollback()
		return err
	}
	abandoned, err := t.commitWithinDeadline()
	if abandoned {
		r.counters.commitsAmbiguous.Add(1)
		r.observe(t.ctx, Event{Kind: EventCommitResolved, Op: "commit", Attempt: 1, Class: ConnectionLost, Outcome: CommitUnknown, Err: err})
		return newError("commit", 1, Ambiguous, ErrAmbiguousCommit, err)
	}
	if err == nil {
		r.succeeded(ticket{})
		t.afterCommit()
		return nil
	}
	return t.commitFailed(err)
}

// commitWithinDeadline runs the driver's COMMIT within the caller's
// deadline; abandoned means the deadline came first and the outcome is
// unknown (no time is left to ask).
func (t *tx) commitWithinDeadline() (abandoned bool, err error) {
	if t.markerWithCommit {
		return t.commitWithMarker() // the MySQL marker travels with the COMMIT (resolve.go)
	}
	return t.withinDeadline("COMMIT", driver.Tx.Commit)
}

// withinDeadline runs a COMMIT or ROLLBACK of the driver within the
// BeginTx context. driver.Tx takes no context: pgx uses the BeginTx
// context itself, but go-sql-driver/mysql blocks on a silent network until
// TCP gives up. There the call runs on its own goroutine; when the deadline
// comes first the connection is marked bad, and closed only once the
// driver's call has returned, so the driver is never used from two
// goroutines at once.
//
// call is a method expression (driver.Tx.Commit), not a method value, so
// the common path allocates nothing.
func (t *tx) withinDeadline(what string, call func(driver.Tx) error) (abandoned bool, err error) {
	if t.c.r.dialect != DialectMySQL || t.ctx.Done() == nil {
		return false, call(t.inner)
	}
	done := make(chan error, 1)
	inner := t.inner
	go func() { done <- call(inner) }()
	select {
	case err := <-done:
		return false, err
	case <-t.ctx.Done():
		t.c.bad.Store(true)
		t.c.inflight.Store(&done)
		return true, fmt.Errorf("%s still in flight at the caller's deadline: %w", what, t.ctx.Err())
	}
}

// rollback ends the transaction on the server within the caller's deadline.
func (t *tx) rollback() error {
	_, err := t.withinDeadline("ROLLBACK", driver.Tx.Rollback)
	if t.sessionErr != nil {
		t.judgeSession(err)
	}
	if t.c.readOnlyPending {
		t.c.readOnlyPending = false
		if err == nil {
			t.judgeReadOnlyAfterRollback()
		}
	}
	return err
}

// commitFailed decides what a failed COMMIT means. Errors that the server
// answered, and errors from before anything was sent, say it did not
// commit; a lost connection or an explicit "unknown" must be resolved.
func (t *tx) commitFailed(err error) error {
	r := t.c.r
	cls := r.classify(err)
	r.record(cls)
	if err.Error() == errTxCommitRollbackText && t.firstErr != nil {
		// PostgreSQL turned COMMIT into ROLLBACK because of an earlier error
		// the caller swallowed: report that error, with its class.
		return newError("commit", 1, r.classify(t.firstErr), nil, fmt.Errorf("%w: %w", err, t.firstErr))
	}
	// The caller's deadline while COMMIT was in flight: the driver gave up
	// waiting for the reply, not the server (issue 9).
	atDeadline := t.ctx.Err() != nil && !serverAnswered(err)
	if !atDeadline && !commitOutcomeUnknown(cls, err) {
		return err // the server answered: not committed
	}
	t.c.bad.Store(true)
	if (!t.wrote || t.nothingDurable) && !t.escaped {
		// Nothing to lose: a transaction that provably only read, or that
		// the server held read-only, may be replayed.
		return newError("commit", 1, RetryTransaction, nil, err)
	}
	outcome := CommitUnknown
	if !atDeadline && t.ctx.Err() == nil {
		// Within the caller's deadline only (shared/DESIGN.md): past it the
		// old session may still be committing, and waiting for it is time
		// the caller does not have. Then the answer is ErrAmbiguousCommit.
		outcome = r.resolveCommit(t.ctx, t)
	}
	if outcome == CommitUnknown && err == driver.ErrBadConn {
		// The driver contract: nothing was sent, and the server rolls back
		// on disconnect. Only the exact sentinel is trusted here.
		outcome = CommitNotCommitted
	}
	switch {
	case outcome == CommitCommitted:
		return nil
	case outcome == CommitNotCommitted && !t.escaped:
		return newError("commit", 1, RetryTransaction, nil, err)
	case t.escaped:
		// Its last part did not commit, or nobody knows; what the
		// transaction committed by itself before did. No replay.
		err = fmt.Errorf("%w (the transaction had committed part of its work itself before: %s)", err, escapedWhat)
	}
	r.counters.commitsAmbiguous.Add(1)
	if ctxErr := t.ctx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
		err = fmt.Errorf("%w (COMMIT in flight at the caller's deadline: %w)", err, ctxErr)
	}
	return newError("commit", 1, Ambiguous, ErrAmbiguousCommit, err)
}

// commitOutcomeUnknown reports a COMMIT error that does not say whether the
// COMMIT took effect: a lost connection, an "unknown" from the server, or
// any client-side failure. A client's claim that nothing was sent is not
// trusted at COMMIT: pgx reports a COMMIT it had already written, when the
// socket closed under it, as "conn closed" with SafeToRetry() true.
func commitOutcomeUnknown(cls Class, err error) bool {
	switch cls {
	case ConnectionLost, Ambiguous:
		return true
	case Unavailable:
		return !serverAnswered(err)
	}
	return false
}

// serverAnswered reports an error that the database server sent.
func serverAnswered(err error) bool {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return true
	}
	_, _, ok := mysqlErrorOf(err)
	return ok
}

// txAttempt is one RunInTx attempt. It is the context given to BeginTx,
// which links it to the transaction the driver opens (conn.BeginTx), so
// that the Tx decorator records on it what the database raised in this
// attempt; and it is the context given to the closure, where a nested
// RunInTx finds it. One allocation per attempt serves all of that.
type txAttempt struct {
	context.Context
	begun bool // BeginTx has returned: a BeginTx inside the closure is not this attempt's
	// tracked: sqlretry's Tx began for this attempt (not a shadow-mode
	// one, whose errors go unjudged: SetShadow may have turned it on since
	// the call started).
	tracked bool
	bounded bool // the short-wait statement was sent in its transaction (runTxOnce)
	// ownBound: the lock_timeout in force is sqlretry's bound (not a
	// lower one of the user's, which the statement kept): a 55P03 is
	// sqlretry's own, one the plain driver would not have given.
	// Its first 55P03 under that bound is kept (attemptRare.ownHit) past a
	// ROLLBACK TO SAVEPOINT: whatever the closure then did (went on after
	// a savepoint, rolled back, committed itself, returned an error of its
	// own), the plain driver would have waited for the lock, so the
	// attempt is neither committed nor final (decide, tx.Commit).
	ownBound bool
	// ownDeadlock: the bound is a deadlock_timeout (short deadlock
	// checks), its own error a 40P01, not a 55P03.
	ownDeadlock bool
	// escaped: a statement of the attempt's transaction ended or started a
	// transaction by itself (tx.done): no replay.
	escaped bool
	// ended: the transaction's Commit or Rollback was called (endCommitted,
	// endRolledBack), by the closure or, after it, by runTxOnce; atomic
	// because database/sql rolls back from its own goroutine when the
	// context ends. byClosure is ended as the closure left it, commitErr
	// the Commit's result. (Packed next to begun.)
	byClosure int8
	ended     atomic.Int32
	// over: the attempt's closure has returned. A closure may keep its
	// context (a goroutine it started, a struct it stored it in): a RunInTx
	// given that context later is not nested in this attempt, which is over
	// and would not replay it (it had no replay of its own).
	over      atomic.Bool // (next to ended: the attempt stays in 128 bytes)
	commitErr error
	poison    error // first retryable error (tx.failed)
	first     error // first error the database raised in this attempt, of any class ...
	last      error // ... and the last
	// answered: the last error whose code says the session ended, raised
	// on a session that lived on (tx.judgeSession): the statement's, no
	// replay.
	answered error
	// rare: what few attempts have (a nested RunInTx's replay, an own
	// lock timeout), behind one pointer so that the attempt stays in a
	// 128-byte allocation.
	rare *attemptRare
	// seq: nestedSeq when the closure started (txnested.go)
	seq uint64
}

// What a transaction's own Commit or Rollback did (txAttempt.ended).
const (
	endCommitted  = 1
	endRolledBack = 2
)

// escapedWhat says why an attempt is not replayed after an escape.
const escapedWhat = "COMMIT, ROLLBACK or BEGIN run as a statement, a statement that commits implicitly such as DDL on MySQL, or a nested RunInTx that committed"

// escapedError is the error of an attempt that would have been replayed
// but for an escape (tx.done).
type escapedError struct{ err error }

func (e *escapedError) Error() string {
	return "sqlretry: RunInTx: the closure committed part of its work itself (" + escapedWhat +
		"), so sqlretry cannot replay it: " + e.err.Error()
}
func (e *escapedError) Unwrap() error { return e.err }

// nestedReplay is the failure of a RunInTx nested in an attempt's closure
// for a reason worth a replay: it runs once, and the replay is the
// outer attempt's.
type nestedReplay struct{ err, cause error }

// attemptRare is what few attempts have (txAttempt.rare).
type attemptRare struct {
	nested *nestedReplay
	// ownHit: see txAttempt.ownBound.
	ownHit error
	// The bound sqlretry set (ms, 0: none), the session's value it
	// replaced (as SHOW gave it), and whether a statement of the closure
	// may have read or set the setting (mayTouchSetting; touchedRedo).
	boundMS  int64
	boundPre string
	touched  bool
	// sticky: a statement may have left session state no rollback undoes
	// (sessionSticky): no run again for a touched bound.
	sticky bool
	// commitRefused: the closure's own Commit was refused for a touched
	// bound (tx.Commit): the attempt runs again, as after a return.
	commitRefused bool
	// conn: the connection the attempt's transaction began on, for an
	// attempt that may get a bound (runTxOnce; conn.boundRefusedAt).
	conn *conn
}

// ownHit is the first 55P03 (40P01 with short deadlock checks) the
// attempt met under its own bound, nil if none.
func (a *txAttempt) ownHit() error {
	if a.rare == nil {
		return nil
	}
	return a.rare.ownHit
}

// errBoundTouched is why an attempt whose closure may have read or set
// the bound's setting is not committed (touchedRedo).
var errBoundTouched = errors.New("sqlretry: the closure may have read or set the setting of sqlretry's short-wait bound, so the attempt was not committed")

// touchedRedo says whether the attempt ran under a bound of sqlretry's and
// its closure may have read or set the bound's setting (mayTouchSetting):
// what it saw, decided or saved then came from sqlretry's bound, not the
// session's value the plain driver would have shown it. Such an attempt
// is never committed and its outcome is not the call's: it is rolled back
// and run again at once, unbounded (runAttempt), as the plain driver
// would have run it. Not when part of its work committed by itself (an
// escape, a nested RunInTx that committed): that attempt cannot run
// again; it commits, and the session's value is restored after
// (restoreBound). Before this rule (attack15-20) sqlretry read the
// closure's statements to tell whether it set the setting, to what
// value, for the transaction or the session, and restored the session's
// value; each hostile round found spellings those checks misread.
func (a *txAttempt) touchedRedo() bool {
	return a.rare != nil && a.rare.touched && !a.rare.sticky && !a.escaped && !nestedCommitSince(a.seq)
}

// redo is why the attempt must not commit and is run again (decide,
// runAttempt): its own lock timeout (ownHit) or a touched bound
// (touchedRedo); nil when it may commit.
func (a *txAttempt) redo() error {
	if a == nil {
		return nil
	}
	if h := a.ownHit(); h != nil {
		return h
	}
	if a.touchedRedo() {
		return errBoundTouched
	}
	return nil
}

// boundSetting is the setting the attempt's bound is.
func (a *txAttempt) boundSetting() string {
	if a.ownDeadlock {
		return "deadlock_timeout"
	}
	return "lock_timeout"
}

func (a *txAttempt) nested() *nestedReplay {
	if a.rare == nil {
		return nil
	}
	return a.rare.nested
}

func (a *txAttempt) rareState() *attemptRare {
	if a.rare == nil {
		a.rare = &attemptRare{}
	}
	return a.rare
}

// Value compares the key's type first: comparing an interface with each
// constant goes through the runtime's generic equality, a measurable part
// of a transaction's cost on the happy path (issue 13 goal 3).
func (a *txAttempt) Value(key any) any {
	if k, ok := key.(ctxKey); ok {
		switch k {
		case keyAttempt:
			if a.begun {
				return nil
			}
			return a
		case keyRunInTx:
			if a.over.Load() {
				break // the caller's attempt, if any
			}
			return a
		}
	}
	return a.Context.Value(key)
}

// raised records an error the database raised in this attempt's
// transaction.
func (a *txAttempt) raised(err error) {
	if a == nil {
		return
	}
	if a.first == nil {
		a.first = err
	}
	a.last = err
	if a.ownBound && a.ownHit() == nil && (a.rare == nil || !a.rare.touched) {
		// (Once the closure may have set the setting, a 55P03 may be its
		// own: attack8. The attempt runs again unbounded: touchedRedo.)
		switch code := ErrorCode(err); {
		case a.ownDeadlock && code == "40P01",
			!a.ownDeadlock && code == "55P03" && !strings.Contains(err.Error(), "could not obtain lock"):
			// (Not a NOWAIT's "could not obtain lock on row": that one is
			// the closure's, under any lock_timeout. Its message may be in
			// another language, and is then taken for the bound's.) A
			// deadlock found under a short deadlock_timeout: the plain
			// driver may have left the cycle to another transaction to
			// find, so this one would have waited and gone on.
			a.rareState().ownHit = err
		}
	}
}

// revived forgets the errors before a ROLLBACK TO SAVEPOINT the server
// accepted: the transaction lives on.
func (a *txAttempt) revived() {
	if a != nil {
		a.poison, a.first, a.last = nil, nil, nil
	}
}

// causeOf returns the error that decides whether an attempt whose closure
// returned err is replayed, or nil when err is not the database's:
// only errors the database raised in this attempt are replay causes, and
// an error of the closure's own (a parse error, an HTTP call) is returned
// unchanged. A closure that swallowed a retryable error and returned
// another is still replayed (poisoning, shared/DESIGN.md).
func (a *txAttempt) causeOf(err error, pgRules bool) error {
	if n := a.nested(); n != nil && errors.Is(err, n.err) {
		return n.cause
	}
	var p *poisonedError
	raised := errors.As(err, &p) ||
		a.first != nil && (errors.Is(err, a.first) || errors.Is(err, a.last))
	if !raised && a.poison == nil {
		return nil
	}
	return a.decider(err, pgRules)
}

// decider is the error that decides for the attempt: on PostgreSQL any
// error aborts the transaction, so the first one (a unique violation the
// closure swallowed decides, not the 25P02 after it); on MySQL an error
// such as a unique violation leaves the transaction alive, so the first
// retryable one.
func (a *txAttempt) decider(err error, pgRules bool) error {
	switch {
	case pgRules && a.first != nil:
		return a.first
	case a.poison != nil:
		return a.poison
	}
	return err
}

const (
	keyAttempt ctxKey = 100 // BeginTx's context: the attempt to link
	keyRunInTx ctxKey = 101 // the closure's context: the attempt it runs in
)

// RunInTx runs fn in a transaction and commits it. When the transaction is
// aborted by something that is safe to retry (a serialization failure, a
// deadlock, a lock-wait timeout, a connection lost before COMMIT was sent)
// it rolls back, backs off and runs fn again from the start, so fn must
// do nothing outside the transaction that cannot be repeated. A COMMIT
// that lost its connection is resolved, never guessed: success,
// a replay, or ErrAmbiguousCommit.
//
// Only errors the database raised in the attempt's transaction are replay
// causes: an error of fn's own (a parse error, a failed HTTP call, a
// give-up of sqlretry elsewhere) comes back unchanged after one run. On
// PostgreSQL the transaction's first error decides, not the "current
// transaction is aborted" that follows it. A timeout that repeats (idle in
// transaction, transaction or statement timeout) is fn's, not contention:
// it is replayed once at most. A RunInTx nested in fn runs once, and a
// replay it needs is the outer's: the attempts do not multiply.
//
// On a *sql.DB opened through sqlretry RunInTx uses its policy, breaker and
// budget; on any other *sql.DB the defaults, and since it cannot see the
// driver's calls there it judges by the error fn returned. opts may
// override the backoff (WithBackoff, WithMaxAttempts), the observer and the
// classifier rules for this call.
func RunInTx(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, opts ...Option) (err error) {
	if ctx == nil {
		return errors.New("sqlretry: RunInTx: nil context")
	}
	if db == nil {
		return errors.New("sqlretry: RunInTx: db is nil")
	}
	if fn == nil {
		return errors.New("sqlretry: RunInTx: fn is nil")
	}
	r := retrierOf(db)
	sees := r != nil // the Tx decorator records what the database raised
	if r == nil {
		r = plainRetrier()
	}
	if len(opts) > 0 {
		cfg := r.cfg
		cfg.backoff = r.backoff() // the options change the backoff in force (SetBackoff)
		cfg.rules = append([]Classifier(nil), cfg.rules...)
		if err := cfg.apply(opts); err != nil {
			return err
		}
		rc := *r // shares breaker, budget, counters and resolution state by pointer
		rc.cfg, rc.obs = cfg, cfg.observer
		rc.ops, _ = rc.obs.(OperationObserver)
		rc.liveBackoff = nil // this call's backoff is cfg's
		if rc.shortWait.offFor(cfg) {
			rc.shortWait = nil // WithShortLockWait(false) or WithShortDeadlockCheck(false) for this call
		}
		r = &rc
	}
	if r.operations() != nil || r.cfg.fallback != nil {
		return r.runInTxObserved(ctx, db, txOpts, fn, sees)
	}
	return r.runInTx(ctx, db, txOpts, fn, sees)
}

// runInTxObserved is RunInTx with an OperationObserver or a fallback. The
// deferred calls live here, not in RunInTx: a function with several defers
// and many returns goes through the runtime's defer machinery at every
// return, a measurable part of RunInTx's cost (issue 13 goal 3).
func (r *retrier) runInTxObserved(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, sees bool) (err error) {
	if o := r.operations(); o != nil { // the whole call, its replays included, is one operation
		op := Operation{Op: "tx", Dialect: r.dialect}
		ctx = o.StartOperation(ctx, op)
		returned := false
		defer func() {
			if !returned {
				// The closure panicked (or called runtime.Goexit): the
				// operation failed; the panic goes on.
				o.EndOperation(ctx, op, errClosurePanicked)
				return
			}
			o.EndOperation(ctx, op, err)
		}()
		err = r.runInTxFallback(ctx, db, txOpts, fn, sees)
		returned = true
		return err
	}
	return r.runInTxFallback(ctx, db, txOpts, fn, sees)
}

// errClosurePanicked is what an OperationObserver is told of a RunInTx
// whose closure panicked or called runtime.Goexit.
var errClosurePanicked = errors.New("sqlretry: the closure panicked")

// runInTxFallback is runInTx with the fallback for ErrCircuitOpen.
func (r *retrier) runInTxFallback(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, sees bool) (err error) {
	if fb := r.cfg.fallback; fb != nil {
		defer func() {
			if errors.Is(err, ErrCircuitOpen) {
				err = fb(ctx, err)
			}
		}()
	}
	return r.runInTx(ctx, db, txOpts, fn, sees)
}

// runInTx is RunInTx in shadow mode, nested in another's closure (seen
// through ctx), or outermost.
func (r *retrier) runInTx(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, sees bool) error {
	if r.shadow.Load() {
		return r.shadowRunInTx(ctx, db, txOpts, fn)
	}
	if outer, _ := ctx.Value(keyRunInTx).(*txAttempt); outer != nil {
		// No contention control: the outer may hold a slot, and waiting for
		// another could deadlock.
		return r.attempts(ctx, outer, nil, db, txOpts, fn, sees)
	}
	return r.outermost(ctx, db, txOpts, fn, sees)
}

// outermost runs the attempts of a RunInTx found in no other's context,
// and then forgets this goroutine's record of nested commits (txnested.go).
func (r *retrier) outermost(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, sees bool) error {
	defer forgetNestedCommits(nestedSeq.Load())
	return r.attempts(ctx, nil, r.txLimit, db, txOpts, fn, sees)
}

// attempts runs RunInTx's attempts until one commits or a rule says stop.
// outer is the attempt whose closure this call runs in, seen through ctx;
// lim is contention control, nil when off or nested.
func (r *retrier) attempts(ctx context.Context, outer *txAttempt, lim *txLimiter, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, sees bool) error {
	// The clock is read once BEGIN has returned (the wait for a connection
	// is not the transaction's work, for contention control), and the first
	// of those reads starts the pacer: one clock read per attempt. The
	// pacer is built only for a replay; the backoff in force is taken now
	// (a call keeps the pacing it started with).
	bo := r.backoffNow()
	var p *pacer         // built for the first replay
	var start time.Time  // when the first attempt's BEGIN returned
	conflicted := false  // an attempt of this call was aborted by a conflict
	var prev error       // the last attempt's error, for a give-up at the deadline
	var lastTimeout uint // the last attempt's timeout, 0 if none
	// Short lock waits (shortwait.go): after a conflict, or while the db
	// meets deadlocks, an attempt bounds its lock waits; bounded counts
	// this call's attempts that did, and the bound stops for the call once
	// it reached deadlock_timeout.
	sw := r.shortWait
	if outer != nil || !sees {
		sw = nil
	}
	bounded, unbounded := 0, false
	for attempt := 1; ; attempt++ {
		var o txOutcome
		var lockWait time.Duration
		if sw != nil && !unbounded && (conflicted || sw.isHot(r.clock)) && !sw.paused(r.clock) {
			lockWait = sw.bound(bounded)
			if lockWait == 0 && lim != nil && lim.engaged.Load() {
				lockWait = sw.top() // shortwait.go
			}
			if lockWait == 0 {
				unbounded = true
			} else if !r.replayable(ctx, bo, attempt, start, lockWait) {
				lockWait = 0 // the last attempt: its lock waits as plain PostgreSQL's
			} else {
				bounded++
			}
		}
		werr := r.runAttempt(ctx, &o, lim, db, txOpts, fn, sees, conflicted, lockWait)
		if werr != nil {
			return r.stop(ctx, "tx", max(attempt-1, 1), werr, prev, "caller's context is done")
		}
		if start.IsZero() {
			start = o.began
		}
		conflicted = conflicted || o.conflict
		// A timeout that ended the attempt (timeoutOf) is the closure's
		// slowness, not a collision: it moves no spread.
		spreadConflict := o.conflict && timeoutOf(o.cause) == 0
		tracks, auto := r.spreadTracks(lim, false)
		if tracks {
			if spreadConflict {
				r.spreadOn(true)
			} else if o.err == nil && r.spread.p.Load() != 0 {
				r.spreadOn(false)
			}
		}
		unbounded = unbounded || o.unbound
		err := o.err
		if sw != nil && o.cause != nil {
			sw.failed(o.cause, o.bounded, r.clock)
		}
		if err == nil {
			if o.bounded {
				sw.committed(since(r.clock, o.began))
			}
			if outer != nil {
				// This transaction committed on its own: replaying the outer
				// closure would run it again.
				outer.escaped = true
			} else {
				noteCommit() // nested with a context of its own?
			}
			return nil
		}
		if ctx.Err() != nil {
			if o.ownTimeout {
				// sqlretry's own lock timeout is never what the caller gets:
				// the plain driver would still be waiting for the lock. Its
				// error is not the one a stop keeps beside the context's.
				return r.stop(ctx, "tx", attempt, nil, prev, "caller's context is done")
			}
			return r.stop(ctx, "tx", attempt, err, prev, "caller's context is done")
		}
		if (errors.Is(err, ErrCircuitOpen) && !o.replay) || errors.Is(err, ErrBudgetExhausted) || errors.Is(err, ErrAmbiguousCommit) {
			return err
		}
		if o.cause == nil {
			return err // fn's own error, or a give-up of something else: final
		}
		cls := o.cls
		var own *Error
		var poisoned *poisonedError
		if o.phase == phaseCommit && !errors.As(err, &own) && !errors.As(err, &poisoned) && commitOutcomeUnknown(cls, err) {
			// A raw COMMIT error that sqlretry's Tx did not resolve (a *sql.DB
			// that sqlretry did not open): its outcome is unknown.
			return newError("commit", attempt, cls, ErrAmbiguousCommit, err)
		}
		if o.escaped {
			return &escapedError{err: err}
		}
		if o.cause != err && !errors.Is(err, o.cause) {
			// The cause first: errors.As finds the error that decided (the
			// unique violation, not the 25P02 the closure met after it).
			err = fmt.Errorf("%w (then: %w)", o.cause, err)
		}
		if outer != nil {
			if ctx.Value(keyNoRetry) != nil {
				// The caller asked for one run: a give-up, final for the
				// outer RunInTx too (an *Error; the raw error would be
				// replayed by it).
				r.counters.giveUps.Add(1)
				return newError("tx", attempt, cls, nil, err)
			}
			// Nested: one run; a replay is the outer RunInTx's.
			if o.replay {
				outer.rareState().nested = &nestedReplay{err: err, cause: o.cause}
			}
			return err
		}
		if !o.replay || ctx.Value(keyNoRetry) != nil {
			return r.giveUp(ctx, "tx", attempt, cls, err, "not retryable")
		}
		if t := timeoutOf(o.cause); t != 0 {
			if t == lastTimeout {
				return r.giveUp(ctx, "tx", attempt, cls, err, "the same timeout repeated: it is the transaction's, not contention")
			}
			lastTimeout = t
		} else {
			lastTimeout = 0
		}
		if cls == Unavailable || cls == ConnectionLost {
			if !r.budget.withdraw() {
				return r.refuse(ctx, "tx", attempt, cls, ErrBudgetExhausted, err)
			}
			r.counters.retriesConnection.Add(1)
		}
		if p == nil {
			p = &pacer{b: *bo, clock: r.clock, rnd: r.rnd, start: start}
		}
		d, stop := p.next(ctx, attempt)
		if stop == "" && spreadConflict && r.spreading(auto) {
			d = r.spreadReplayAuto(ctx, d, since(r.clock, o.began), attempt, p, auto)
		}
		if stop != "" {
			if !o.ownTimeout || stop == stopMaxAttempts {
				return r.paceStop(ctx, "tx", attempt, cls, err, stop)
			}
			// The pacing would end the call on sqlretry's own lock
			// timeout (a replayable attempt's bound ended near MaxElapsed
			// or the caller's deadline): the plain driver would have gone
			// on waiting. One more attempt at once, its waits unbounded,
			// as plain PostgreSQL's (attack7, in a CI run: the caller got
			// "context deadline exceeded (while retrying: 55P03)").
			d, unbounded = 0, true
		}
		r.counters.retriesTransaction.Add(1)
		r.observe(ctx, Event{Kind: EventRetry, Op: "tx", Attempt: attempt, Class: cls, Err: err, Delay: d, Reason: "transaction aborted; replaying it"})
		if o.ownTimeout {
			err = prev // not the cause a later stop keeps
		}
		if serr := r.clock.Sleep(ctx, d); serr != nil {
			return r.stop(ctx, "tx", attempt, err, prev, "caller's context is done")
		}
		prev = err
	}
}

// replayable says whether a replay could follow an attempt whose lock
// waits are bounded by lockWait: not on the last attempt MaxAttempts
// allows, nor on one whose bound would end past MaxElapsed (from start,
// when the first attempt's BEGIN returned; zero before it), nor in a call
// marked NoRetry. Such an attempt is not bounded (shortwait.go): its lock
// timeout would end the call where plain PostgreSQL would have waited and
// committed.
func (r *retrier) replayable(ctx context.Context, bo *Backoff, attempt int, start time.Time, lockWait time.Duration) bool {
	if attempt >= bo.MaxAttempts || ctx.Value(keyNoRetry) != nil {
		return false
	}
	elapsed := time.Duration(0)
	if !start.IsZero() {
		elapsed = since(r.clock, start)
	}
	return elapsed+lockWait <= bo.MaxElapsed
}

// txOutcome is what one RunInTx attempt came to.
type txOutcome struct {
	began    time.Time // when BeginTx returned
	phase    txPhase
	err      error // what the attempt returned
	cause    error // what decides about a replay; nil: err is final
	cls      Class // cause's class
	replay   bool
	conflict bool // aborted by a conflict with another transaction (for contention control)
	escaped  bool // it would have been replayed, but the closure committed part of its work itself
	bounded  bool // its lock waits were bounded (shortwait.go): the statement ran in its transaction
	// ownTimeout: the attempt ended in the lock timeout of sqlretry's own
	// bound (55P03), where the plain driver would have gone on waiting.
	ownTimeout bool
	unbound    bool // the call's later attempts go unbounded
}

// runAttempt runs one attempt within the contention control: the slot is
// given back on every path, a panic of fn included (the panic goes on with
// its own value). werr is the caller's context ending while it waited for
// a slot. conflicted says an earlier attempt of the same call was aborted
// by a conflict: later ones are that caller's trouble (one transaction
// waiting on a lock held outside, say), not transactions colliding with
// each other, and the contention control counts them only while they held
// a slot of its engagement (txSlot.replay).
//
// o is filled in place (not returned: the copy was a measurable part of
// RunInTx's cost, issue 13 goal 3).
func (r *retrier) runAttempt(ctx context.Context, o *txOutcome, lim *txLimiter, db *sql.DB, txOpts *sql.TxOptions,
	fn func(context.Context, *sql.Tx) error, sees, conflicted bool, lockWait time.Duration) (werr error) {
	var slot txSlot
	if lim != nil {
		if slot, werr = lim.acquire(ctx); werr != nil {
			return werr
		}
		slot.replay = conflicted
		defer func() {
			var took time.Duration
			if !o.began.IsZero() {
				took = since(r.clock, o.began)
			}
			cost := took
			if o.bounded && o.conflict {
				cost = r.shortWait.conflictCost(took, true, o.cause) // shortwait.go
			}
			lim.releaseCost(slot, o.conflict, o.err == nil && o.phase == phaseCommit, took, cost)
		}()
	}
	// The database-side queue (contention_gate.go): the attempt waits for
	// its replica's turn while the queue is in use; outside it, after a
	// conflict, it looks whether other replicas use it.
	queue := lim != nil && sees && r.cfg.contentionQueue
	var g *serverGate
	if queue && slot.gated {
		g = lim.gate(r.inner, r.dialect, gateName(fn))
	}
	inGate := g != nil && g.enter(ctx)
	if inGate {
		defer g.leave()
	}
	att := &txAttempt{Context: ctx}
	o.began, o.phase, o.err = runTxOnce(att, db, txOpts, fn, r.clock, r.shortWait, lockWait)
	// The attempt again at once without the bound's statement: when the
	// server does not know the settings (shortwait.go: off for good; the
	// closure did not run), and when a statement that must come first in
	// its transaction (SET TRANSACTION ISOLATION LEVEL / SNAPSHOT / READ
	// WRITE) came after it (25001; the call's later attempts unbounded; a
	// 25001 of another kind, VACUUM in a transaction, fails the same way
	// unbounded), unless part of the closure's work committed by itself.
	mustFirst := false
	roleRefused := false // the session's role may not set the bound: the call's later attempts go unbounded
	if att.bounded && o.err != nil && ctx.Err() == nil {
		// Only the attempt's own bound statement, which fails before its
		// closure runs (phaseBegin): a closure's error that wraps another
		// db's refusal (a RunInTx of its own inside) is the closure's.
		own := o.phase == phaseBegin
		refused, stale := own && r.shortWaitRefused(o.err), own && staleStatement(o.err)
		mustFirst = !refused && att.byClosure == 0 && !att.escaped && !nestedCommitSince(att.seq) &&
			att.first != nil && ErrorCode(att.first) == "25001"
		roleRefused = refused && r.shortWait.roleRefusal(o.err, r.clock)
		if refused && !roleRefused {
			r.shortWait.off.Store(true)
		}
		if refused || mustFirst || stale {
			att = &txAttempt{Context: ctx}
			o.began, o.phase, o.err = runTxOnce(att, db, txOpts, fn, r.clock, nil, 0)
		}
	}
	// The attempt again at once, unbounded, when its closure may have read
	// or set the bound's setting (touchedRedo): whatever it returned, the
	// attempt was rolled back (tx.Commit, runTxOnce).
	touched := false
	if att.bounded && ctx.Err() == nil && (att.byClosure == 0 || att.rare != nil && att.rare.commitRefused) && att.touchedRedo() {
		touched = true
		for range 2 {
			att = &txAttempt{Context: ctx}
			o.began, o.phase, o.err = runTxOnce(att, db, txOpts, fn, r.clock, nil, 0)
			// Once more when its first error was 26000: the closure ran
			// DEALLOCATE ALL (or DISCARD ALL) in the attempt rolled back,
			// which no rollback undoes, and a statement the driver had
			// cached was gone (pgx drops the entry on the error). The
			// plain driver, running the closure once, never meets it
			// (attack17's helper with DEALLOCATE ALL).
			if o.err == nil || ctx.Err() != nil || att.first == nil || ErrorCode(att.first) != "26000" ||
				att.byClosure != 0 || att.escaped || nestedCommitSince(att.seq) {
				break
			}
		}
	}
	o.bounded = att.bounded
	o.unbound = touched || roleRefused
	if o.err != nil {
		r.decide(o, att, sees)
		o.conflict = ctx.Err() == nil && o.replay && r.isConflict(o.cause, o.cls)
		o.ownTimeout = att.ownHit() != nil && o.cause == att.ownHit()
		o.unbound = o.unbound || mustFirst || touched
	}
	if queue && !inGate && lim.probeDue(o.conflict) {
		if g == nil {
			g = lim.gate(r.inner, r.dialect, gateName(fn))
		}
		if g != nil {
			g.probe()
		}
	}
	return nil
}

// decide says whether a failed attempt is replayed, and for what cause.
func (r *retrier) decide(o *txOutcome, att *txAttempt, sees bool) {
	r.decideOn(o, att, sees)
	h := att.ownHit()
	if h == nil {
		return
	}
	switch {
	case o.replay && o.cause == h:
	case att.escaped || nestedCommitSince(att.seq):
		// Part of the work committed by itself, then the rest met the
		// bound: not replayed, and not a bare 55P03 either (F2 of a review).
		if o.cause == nil {
			o.cause, o.cls, o.escaped = h, RetryTransaction, true
		}
	case att.byClosure != endCommitted:
		// The closure met sqlretry's own lock timeout and handled it (a
		// savepoint, its own rollback, an error of its own, a classifier
		// rule that makes 55P03 final): the plain driver would have waited
		// for the lock. Replayed, its lock waits unbounded.
		o.cause, o.cls, o.replay, o.escaped, o.unbound = h, RetryTransaction, true, false, true
	}
}

func (r *retrier) decideOn(o *txOutcome, att *txAttempt, sees bool) {
	err := o.err
	if att.byClosure != 0 {
		return // the closure ended the transaction itself: its outcome is final
	}
	var own *Error
	var handOff *handOffError
	pgRules := r.dialect != DialectMySQL
	switch {
	case o.phase == phaseBegin && errors.As(err, &handOff):
		// BEGIN found only connections from before the breaker last opened
		// (database/sql gave up after its own re-runs; a connection dialled
		// while the breaker opened is one too): nothing was sent. Replayed
		// after a pause, which the breaker gates (TestPatroniFailover's
		// switchover in a CI rehearsal surfaced ErrCircuitOpen this way).
		o.cause, o.cls, o.replay = err, Unavailable, true
		return
	case o.phase != phaseCommit && errors.As(err, &own):
		// sqlretry's own give-up or refusal (a statement, a dial, a nested
		// RunInTx): final. At COMMIT the Tx's *Error is its verdict.
		return
	case !sees:
		o.cause = err // a *sql.DB sqlretry did not open: only the error itself to judge by
	case o.phase == phaseBody:
		o.cause = att.causeOf(err, pgRules)
	case o.phase == phaseCommit:
		var p *poisonedError
		if errors.As(err, &p) || pgRules && att.first != nil {
			o.cause = att.decider(err, pgRules)
		} else {
			o.cause = err
		}
	default:
		o.cause = err
	}
	if o.cause == nil {
		return
	}
	o.cls = r.classify(o.cause)
	if o.cls == RetryStatement {
		o.cls = RetryTransaction // the transaction aborts with it (ERRORS.md rule 1)
	}
	if o.cls != Permanent && att.answered != nil && errors.Is(o.cause, att.answered) {
		o.cls = Permanent // tx.failed found the session alive: the statement's error
	}
	switch o.cls {
	case RetryStatement, RetryTransaction, Unavailable:
		o.replay = true
	case ConnectionLost, Ambiguous:
		o.replay = true // before COMMIT the server rolls back on disconnect
	}
	if o.replay && (att.escaped || nestedCommitSince(att.seq)) {
		o.replay, o.escaped = false, true
	}
}

// backoffNow is the backoff in force (retrier.backoff) without copying
// it: what SetBackoff stores is never changed afterwards.
func (r *retrier) backoffNow() *Backoff {
	if r.liveBackoff != nil {
		if b := r.liveBackoff.Load(); b != nil {
			return b
		}
	}
	return &r.cfg.backoff
}

// since is clock.Now().Sub(t). On the real clock it reads only the
// monotonic clock (time.Since), where time.Now reads the wall clock too:
// half the clock reads of a transaction's accounting.
func since(clock Clock, t time.Time) time.Duration {
	if _, ok := clock.(realClock); ok {
		return time.Since(t)
	}
	return clock.Now().Sub(t)
}

// txBeginner is a *sql.DB, or the *sql.Conn of contention control's
// database-side queue.
type txBeginner interface {
	BeginTx(ctx context.Context, opts *sql.TxOptions) (*sql.Tx, error)
}

type txPhase uint8

const (
	phaseBegin txPhase = iota
	phaseBody
	phaseCommit
)

// runTxOnce runs one attempt of a RunInTx transaction; began is when
// BeginTx returned. fn runs with att as its context.
func runTxOnce(att *txAttempt, db txBeginner, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, clock Clock,
	sw *shortWait, lockWait time.Duration) (began time.Time, phase txPhase, err error) {
	if lockWait > 0 {
		att.rareState() // conn.BeginTx links its connection here
	}
	sqlTx, err := db.BeginTx(att, txOpts)
	began = clock.Now()
	if err != nil {
		return began, phaseBegin, err
	}
	att.begun = true
	committed := false
	defer func() {
		if !committed {
			_ = sqlTx.Rollback() // also when fn panics
		}
	}()
	if lockWait > 0 && att.tracked && (att.rare.conn == nil || !att.rare.conn.boundRefused(clock)) {
		att.bounded = true
		// Before the closure's statements, so that a SET LOCAL of its own
		// wins; a failure is the attempt's, before its closure ran. Not in
		// a shadow-mode transaction: the plain driver's, whose 55P03
		// nothing would replay.
		b, err := sw.set(att, sqlTx, lockWait, clock)
		if err != nil {
			if c := att.rare.conn; c != nil && ErrorCode(err) == "42501" {
				c.boundRefusedAt.Store(clock.Now().UnixNano()) // the session's (roleRefusal)
			}
			return began, phaseBegin, err
		}
		att.ownBound, att.ownDeadlock = b.ms > 0, sw.deadlockMode
		if b.ms > 0 {
			sw.boundSet()
			r := att.rareState()
			r.boundMS, r.boundPre = b.ms, b.pre
		}
	}
	att.seq = nestedSeq.Load()
	slot := enterClosure()
	func() {
		defer func() { // also when fn panics
			leaveClosure(slot)
			att.over.Store(true)
		}()
		err = fn(att, sqlTx)
	}()
	att.byClosure = int8(att.ended.Load())
	if err != nil {
		return began, phaseBody, err
	}
	if h := att.redo(); h != nil && att.byClosure == 0 {
		return began, phaseBody, h // not committed: decide, runAttempt
	}
	committed = true
	if err := sqlTx.Commit(); err != nil {
		if errors.Is(err, sql.ErrTxDone) {
			// The closure ended the transaction itself: its outcome.
			switch att.ended.Load() {
			case endCommitted:
				att.byClosure = endCommitted
				return began, phaseCommit, att.commitErr
			case endRolledBack:
				att.byClosure = endRolledBack
			}
		}
		return began, phaseCommit, err
	}
	return began, phaseCommit, nil
}

var (
	plainOnce sync.Once
	plain     *retrier
)

// plainRetrier serves RunInTx on a *sql.DB that sqlretry did not open: the
// default backoff and budget, no breaker (it cannot see the dials).
func plainRetrier() *retrier {
	plainOnce.Do(func() {
		cfg := defaultConfig()
		cfg.breaker = nil
		plain = newRetrier(cfg, nil, DialectUnknown)
	})
	return plain
}

// markedNotIdempotent reports a context marked NotIdempotent (or
// Idempotent's value false).
func markedNotIdempotent(ctx context.Context) bool {
	v, ok := ctx.Value(keyIdempotent).(bool)
	return ok && !v
}

// spreadReplay is the delay before a conflict's replay: the backoff's d,
// or a random one up to the db's spread when that is longer. The spread
// is what the attempt took times spreadK·p/(1-p), p the db's recent share
// of attempts that conflicted (spreadOn), at most the backoff's Max,
// halved for each earlier attempt of the call (the older a call, the
// sooner its replay: attack24, callers whose replays waited while fresh
// first attempts went on got 0.15-0.5 of the others' commits), and the
// delay at most a quarter of the time left to the caller's deadline and
// never past the backoff's MaxElapsed (attack24: a call slept 6-8 s past
// it). On a hot spot the backoff alone (5 ms, doubling per attempt of one
// call) had the replays collide again: MariaDB, 16 workers on 8 rows
// (cmd/ceiling), 1.33 attempts per commit and 0.72-0.80 of a hand-written
// loop's rate that sleeps 500 ms; with the spread 1.09-1.16 attempts per
// commit and 1.0-1.2 of the loop (README, "Replay spread"). Replicas of an
// application each see the same share of conflicts, so they spread alike
// (a spread that grew with each replica's own conflicts starved some of
// them: fairness 0.32-0.62 at 4-8 replicas).
func (r *retrier) spreadReplay(ctx context.Context, d, took time.Duration, attempt int, pc *pacer) time.Duration {
	p := float64(r.spread.p.Load()) / spreadOne
	if p <= 0 || p >= 1 || took <= 0 {
		return d
	}
	top := r.backoff().Max
	if pc != nil {
		top = pc.b.Max // the backoff the call started with (SetBackoff since: attack review)
	}
	sp := min(time.Duration(float64(took)*spreadK*p/(1-p)), top) >> min(max(attempt-1, 0), 16)
	if sp <= d {
		return d
	}
	x := time.Duration(r.rnd() * float64(sp))
	now := r.clock.Now()
	if dl, ok := ctx.Deadline(); ok {
		x = min(x, dl.Sub(now)/4)
	}
	if pc != nil {
		x = min(x, pc.b.MaxElapsed-now.Sub(pc.start))
	}
	return max(d, x)
}

// spreadReplayAuto is spreadReplay, at most spreadAutoMax (or d) for a
// PostgreSQL db's default spread (auto, spreadTracks).
func (r *retrier) spreadReplayAuto(ctx context.Context, d, took time.Duration, attempt int, pc *pacer, auto bool) time.Duration {
	x := r.spreadReplay(ctx, d, took, attempt, pc)
	if auto && x > spreadAutoMax {
		x = max(d, spreadAutoMax)
	}
	return x
}

// spreads says whether the replay spread is on for the db or call
// (WithReplaySpread: by default on MySQL and MariaDB only).
func (r *retrier) spreads() bool {
	return r.cfg.replaySpread && (r.cfg.replaySpreadSet || r.dialect == DialectMySQL)
}

// spreadTracks says whether an attempt of a call with limiter lim counts
// in the db's share of conflicting attempts p: the db spreads (spread.db:
// MySQL, or WithReplaySpread(true) given to the db), the call does, or the
// db is a PostgreSQL one with the default (spread.auto) and its contention
// control is not engaged (auto; shadow: shadow mode runs no attempt
// through the limiter, whose state it would read stale). Every call of the
// db counts, also one given WithReplaySpread(false) (attack24).
//
// On PostgreSQL the spread is off while contention control is engaged (it
// limits the db's transactions, and short deadlock checks find deadlocks
// in milliseconds), and while it is not an auto replay is spread only
// while at least spreadAutoShare of the db's recent attempts conflicted
// (spreading), at most spreadAutoMax: conflicts that frequent with
// contention control out are other replicas', which no replica's limiter
// can remove (it lets go and stays out). Without the spread such replicas
// replayed after the backoff's few milliseconds and collided again: about
// 2 attempts per commit at 2, 4 and 8 replicas (chaos replicas,
// 2026-12-02). Rarer conflicts (a killed session, a slow link, where an
// attempt's time is mostly round trips and the spread, which grows with
// it, paused replays 0.2-1 s and halved the chaos latency scenario's rate)
// replay after the backoff. With contention control off
// (WithContentionControl(false)) nothing spreads by default.
func (r *retrier) spreadTracks(lim *txLimiter, shadow bool) (tracks, auto bool) {
	auto = r.spread.auto && (shadow || lim != nil && !lim.engaged.Load())
	return r.spread.db || r.spreads() || auto, auto
}

// spreading says whether a conflict's replay is spread now, given
// spreadTracks' auto: the call spreads (spreads), or the db spreads by
// default now, and the call did not refuse it.
func (r *retrier) spreading(auto bool) bool {
	if r.spreads() {
		return true
	}
	return auto && !r.cfg.replaySpreadSet && r.spread.p.Load() >= spreadAutoShare
}

// spreadOne is p = 1 in spreadState; spreadK scales the spread: 100 (300
// committed 1.03-1.09x more on MariaDB's replicas scenario in one run,
// but gave the slowest of 16 callers 0.32-0.53 of the fastest in
// attack24's hot spots, against 0.49-0.70 with 100 and the loop's 0.75-0.85).
const (
	spreadOne   = 1 << 20
	spreadK     = 100
	spreadFloor = spreadOne >> 10 // p under about 0.1 % is taken as 0 (spreadOn)
	// spreadAutoShare: a PostgreSQL db not engaged spreads its replays by
	// default while at least a fifth of its recent attempts conflicted
	// (spreadTracks). Chaos, 2026-12-02: 2, 4 and 8 replicas 0.5 without
	// the spread and 0.3-0.37 with it; a killed session every 200 ms
	// 0.09-0.15; a 20 ms link 0.12-0.19 (narrowly under: spreadAutoMax
	// bounds what crossing it costs there).
	spreadAutoShare = spreadOne / 5
	// spreadAutoMax bounds that default spread, which could otherwise
	// reach the backoff's Max (1 s) on the one-process hot spot before
	// contention control engages (its p99.9 was about 1 s in 4 of 8 chaos
	// cells with the unbounded default spread, and in 3 of 8 without any:
	// a deadlock found after deadlock_timeout); across replicas most
	// spreads are under it (attempts of 2-5 ms, a share of 0.3: up to
	// 85-215 ms).
	spreadAutoMax = 250 * time.Millisecond
)

// spreadState is the db's replay spread: p, its share of attempts that
// conflicted (spreadOne is all of them), an average over about the last
// 64 attempts, and when an attempt last ended (unix ns, the db's clock).
// db: the db itself spreads (not only some calls), so every call's
// attempts count, also those of calls with WithReplaySpread(false)
// (attack24: a hot path turned off left the rest of the db spreading as
// if nothing conflicted).
type spreadState struct {
	p    atomic.Int64
	last atomic.Int64
	db   bool
	auto bool // PostgreSQL's default spread (spreadTracks)
}

// spreadQuiet: each such stretch with no attempt of the db ending halves
// p (attack24: after a burst of deadlocks and 2 s without a transaction,
// a lone deadlock's replay still waited up to a second).
const spreadQuiet = 250 * time.Millisecond

// spreadOn moves the db's share of attempts that conflicted (spreadState).
func (r *retrier) spreadOn(conflict bool) {
	now := r.clock.Now().UnixNano()
	var halve int64
	if last := r.spread.last.Swap(now); last != 0 && now-last > int64(spreadQuiet) {
		halve = min((now-last)/int64(spreadQuiet), 62)
	}
	for {
		old := r.spread.p.Load()
		base := old >> halve
		var x int64
		if conflict {
			x = spreadOne
		}
		nw := base + (x-base)/64
		if nw < spreadFloor {
			// A share this small spreads nothing worth a pause, and at 0
			// a commit skips spreadOn: its clock read and the swap of
			// last, a cache line every caller of the db writes.
			nw = 0
		}
		if nw == old || r.spread.p.CompareAndSwap(old, nw) {
			return
		}
	}
}
