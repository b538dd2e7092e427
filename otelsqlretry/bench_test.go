package otelsqlretry_test

import (
	"context"
	"database/sql"
	"testing"

	"github.com/XSAM/otelsql"
	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/otelsqlretry"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// BenchmarkObservedExec is the happy path's cost with the observer
// attached, beside XSAM/otelsql's, on a driver that does nothing: wrap=raw
// is the driver alone; "-noop" uses OpenTelemetry's default no-op
// providers, "-sdk" the SDK (every span sampled, none exported; metrics
// to a manual reader). Sub-benchmarks wrap=... for `benchstat -col /wrap`
// (make bench).
func BenchmarkObservedExec(b *testing.B) {
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	tp := sdktrace.NewTracerProvider()
	defer mp.Shutdown(context.Background())
	defer tp.Shutdown(context.Background())
	observer := func(opts ...otelsqlretry.Option) sqlretry.Option {
		o, err := otelsqlretry.NewObserver(opts...)
		if err != nil {
			b.Fatal(err)
		}
		return sqlretry.WithObserver(o)
	}
	for _, wrap := range []string{"raw", "sqlretry", "sqlretry+otelsqlretry-noop", "otelsql-noop", "sqlretry+otelsqlretry-sdk", "otelsql-sdk"} {
		b.Run("wrap="+wrap, func(b *testing.B) {
			f := newFakeDB()
			var db *sql.DB
			switch wrap {
			case "raw":
				db = sql.OpenDB(f)
			case "sqlretry":
				db = sqlretry.OpenDB(f, sqlretry.WithDialect(sqlretry.DialectPostgres))
			case "sqlretry+otelsqlretry-noop":
				db = sqlretry.OpenDB(f, sqlretry.WithDialect(sqlretry.DialectPostgres), observer())
			case "otelsql-noop":
				db = otelsql.OpenDB(f)
			case "sqlretry+otelsqlretry-sdk":
				db = sqlretry.OpenDB(f, sqlretry.WithDialect(sqlretry.DialectPostgres),
					observer(otelsqlretry.WithMeterProvider(mp), otelsqlretry.WithTracerProvider(tp)))
			case "otelsql-sdk":
				db = otelsql.OpenDB(f, otelsql.WithMeterProvider(mp), otelsql.WithTracerProvider(tp))
			}
			defer db.Close()
			ctx := context.Background()
			if _, err := db.ExecContext(ctx, "UPDATE t SET v = 1"); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := db.ExecContext(ctx, "UPDATE t SET v = 1"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
