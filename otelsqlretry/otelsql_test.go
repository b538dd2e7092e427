package otelsqlretry_test

import (
	"context"
	"testing"

	"github.com/XSAM/otelsql"
	"github.com/sqlretry/sqlretry"
)

// With otelsql the order is: the driver registered through otelsql, the
// *sql.DB opened through sqlretry. sqlretry's span is the logical
// operation and otelsql's spans, one per attempt, are its children.
func TestWithOtelsqlEachAttemptIsAChildSpan(t *testing.T) {
	tel := newTelemetry(t)
	f := newFakeDB()
	f.script("UPDATE", serializationFailure)
	name, err := otelsql.Register(f.register(), otelsql.WithTracerProvider(tel.tp), otelsql.WithMeterProvider(tel.mp))
	if err != nil {
		t.Fatal(err)
	}
	db, err := sqlretry.Open(name, "fake", sqlretry.WithDialect(sqlretry.DialectPostgres), sqlretry.WithClock(instantClock{}),
		sqlretry.WithObserver(tel.observer(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); err != nil {
		t.Fatal(err)
	}
	op := tel.span(t, "UPDATE")
	wantAttrs(t, "UPDATE", op.Attributes(), map[string]any{"sqlretry.resend_count": int64(1)})
	var attempts []string
	for _, s := range tel.spans.Ended() {
		if s.Name() == "sql.conn.exec" {
			if s.Parent().SpanID() != op.SpanContext().SpanID() {
				t.Errorf("otelsql's exec span is not a child of the operation's span")
			}
			attempts = append(attempts, s.Status().Code.String())
		}
	}
	if len(attempts) != 2 {
		t.Fatalf("otelsql exec spans %v, want 2 (the failed attempt and the retry)", attempts)
	}
	if attempts[0] != "Error" || attempts[1] != "Unset" {
		t.Errorf("attempt statuses %v, want [Error Unset]", attempts)
	}
}

// The other order hides sqlretry: with otelsql outside, db.Driver() is
// otelsql's, and StatsOf (like RunInTx's policy and SetShadow) finds no
// sqlretry behind it.
func TestOtelsqlOutsideHidesSqlretry(t *testing.T) {
	c, err := sqlretry.WrapConnector(newFakeDB(), sqlretry.WithDialect(sqlretry.DialectPostgres))
	if err != nil {
		t.Fatal(err)
	}
	db := otelsql.OpenDB(c)
	defer db.Close()
	if _, ok := sqlretry.StatsOf(db); ok {
		t.Fatal("StatsOf found sqlretry behind otelsql")
	}
	if sqlretry.SetShadow(db, true) {
		t.Fatal("SetShadow found sqlretry behind otelsql")
	}
}
