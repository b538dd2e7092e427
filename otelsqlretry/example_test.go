package otelsqlretry_test

import (
	"context"
	"fmt"

	"github.com/XSAM/otelsql"
	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/otelsqlretry"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// The order of wrapping with otelsql: register the driver through otelsql
// (inside), open the *sql.DB through sqlretry (outside). Each attempt is
// then an otelsql span under sqlretry's span for the whole operation.
func Example_withOtelsql() {
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	defer tp.Shutdown(context.Background())

	// With a real driver: otelsql.Register("pgx") after importing
	// github.com/jackc/pgx/v5/stdlib.
	f := newFakeDB()
	f.script("UPDATE", serializationFailure)
	otelName, err := otelsql.Register(f.register(), otelsql.WithTracerProvider(tp))
	if err != nil {
		panic(err)
	}
	obs, err := otelsqlretry.NewObserver(otelsqlretry.WithTracerProvider(tp))
	if err != nil {
		panic(err)
	}
	db, err := sqlretry.Open(otelName, "postgres://...", sqlretry.WithDialect(sqlretry.DialectPostgres), sqlretry.WithObserver(obs))
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(context.Background(), "UPDATE accounts SET balance = balance - 1 WHERE id = 1"); err != nil {
		panic(err)
	}

	var op sdktrace.ReadOnlySpan
	for _, s := range spans.Ended() {
		if s.Name() == "UPDATE" {
			op = s
		}
	}
	for _, a := range op.Attributes() {
		if a.Key == "sqlretry.resend_count" {
			fmt.Println("UPDATE, resend_count", a.Value.AsInt64())
		}
	}
	for _, e := range op.Events() {
		fmt.Println("  event", e.Name)
	}
	for _, s := range spans.Ended() {
		if s.Parent().SpanID() == op.SpanContext().SpanID() {
			fmt.Println("  child", s.Name(), s.Status().Code)
		}
	}
	// Output:
	// UPDATE, resend_count 1
	//   event sqlretry.retry
	//   child sql.conn.exec Error
	//   child sql.conn.exec Unset
}
