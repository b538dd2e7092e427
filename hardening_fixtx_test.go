package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"testing"
)

// Item 1: a statement run with a NotIdempotent context inside a transaction
// counts as a write even when its text reads as a plain read (a SELECT of
// a function of the user's own that writes). A lost COMMIT of such a
// transaction is resolved, never replayed on the guess that it only read.
func TestNotIdempotentReadInsideATransactionCountsAsAWrite(t *testing.T) {
	marked := map[string]func(context.Context) context.Context{
		"NotIdempotent": NotIdempotent,
		"Idempotent(false)": func(ctx context.Context) context.Context {
			return context.WithValue(ctx, keyIdempotent, false)
		},
	}
	for name, mark := range marked {
		for _, tc := range []struct {
			name     string
			opts     []Option
			prepared bool
			want     error // nil: success after one run
		}{
			{"pg", nil, false, nil},
			{"pg prepared", nil, true, nil},
			{"mysql marker", []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("sqlretry_marker")}, false, nil},
			{"mysql no marker", []Option{WithDialect(DialectMySQL)}, false, ErrAmbiguousCommit},
		} {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				srv := newFakeServer()
				srv.script("COMMIT", step{err: errLost, ran: true}) // committed, reply lost
				db, _ := testDB(t, srv, tc.opts...)
				calls := 0
				err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					var rows *sql.Rows
					var err error
					if tc.prepared {
						st, perr := tx.PrepareContext(ctx, "SELECT f()")
						if perr != nil {
							return perr
						}
						defer st.Close()
						rows, err = st.QueryContext(mark(ctx))
					} else {
						rows, err = tx.QueryContext(mark(ctx), "SELECT f()")
					}
					if err != nil {
						return err
					}
					return rows.Close()
				})
				if n := srv.ranCount("SELECT f()"); n != 1 || calls != 1 {
					t.Fatalf("SELECT f() committed %d times in %d runs (err=%v): a lost COMMIT of a marked write was replayed", n, calls, err)
				}
				if tc.want == nil && err != nil {
					t.Fatalf("err = %v, want nil: the COMMIT was resolved as committed", err)
				}
				if tc.want != nil && !errors.Is(err, tc.want) {
					t.Fatalf("err = %v, want %v", err, tc.want)
				}
			})
		}
	}
	// The same read unmarked still counts as a read: replayed.
	srv := newFakeServer()
	srv.script("COMMIT", step{err: errLost, ran: true})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		rows, err := tx.QueryContext(ctx, "SELECT n FROM t")
		if err != nil {
			return err
		}
		return rows.Close()
	})
	if err != nil || calls != 2 {
		t.Fatalf("an unmarked read: err=%v calls=%d, want a replay", err, calls)
	}
}

// Item 3: a closure that ends the transaction itself. RunInTx's own
// COMMIT then gets sql.ErrTxDone; it returns the closure's outcome and
// never replays.
func TestRunInTxClosureThatCommitsItself(t *testing.T) {
	for _, tc := range []struct {
		name   string
		commit step // the closure's COMMIT
		opts   []Option
		end    func(tx *sql.Tx) error // what the closure does at its end
		want   error                  // nil: success
		wantIs error
	}{
		{"commit, return its error", step{}, nil, func(tx *sql.Tx) error { return tx.Commit() }, nil, nil},
		{"commit, return nil", step{}, nil, func(tx *sql.Tx) error { tx.Commit(); return nil }, nil, nil},
		{"lost commit resolved committed", step{err: errLost, ran: true}, nil, func(tx *sql.Tx) error { tx.Commit(); return nil }, nil, nil},
		{"lost commit unresolved", step{err: errLost, ran: true}, []Option{WithCommitResolution(false)}, func(tx *sql.Tx) error { tx.Commit(); return nil }, ErrAmbiguousCommit, ErrAmbiguousCommit},
		{"commit refused", step{err: errSerialization}, nil, func(tx *sql.Tx) error { tx.Commit(); return nil }, errSerialization, errSerialization},
		{"rollback, return nil", step{}, nil, func(tx *sql.Tx) error { tx.Rollback(); return nil }, sql.ErrTxDone, sql.ErrTxDone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("COMMIT", tc.commit)
			db, _ := testDB(t, srv, tc.opts...)
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO log VALUES ('once')"); err != nil {
					return err
				}
				return tc.end(tx)
			})
			if calls != 1 {
				t.Fatalf("calls = %d (err=%v); want no replay", calls, err)
			}
			if tc.want == nil {
				if err != nil {
					t.Fatalf("err = %v; the closure's COMMIT succeeded", err)
				}
				return
			}
			if !errors.Is(err, tc.wantIs) {
				t.Fatalf("err = %v, want %v", err, tc.wantIs)
			}
		})
	}
}
