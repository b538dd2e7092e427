package pgxsqlretry

import (
	"database/sql/driver"
	"errors"
	"io"
	"reflect"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

func TestDecodeRow(t *testing.T) {
	fds := []pgconn.FieldDescription{
		{DataTypeOID: pgtype.Int8OID}, {DataTypeOID: pgtype.Int4OID}, {DataTypeOID: pgtype.TextOID},
		{DataTypeOID: pgtype.Int8OID}, {DataTypeOID: pgtype.Int8OID},
	}
	got := decodeRow(fds, [][]byte{[]byte("701"), []byte("150000"), []byte("00000001"), nil, []byte("-7")})
	want := []driver.Value{int64(701), int64(150000), "00000001", nil, int64(-7)}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decodeRow = %#v, want %#v", got, want)
	}
}

// The server's error for the question is an answer (the COMMIT after it
// did not run); any other failure lost the answer, and a row that came
// before it is kept.
func TestAnsweredOrLost(t *testing.T) {
	pgErr := &pgconn.PgError{Code: "42501"}
	if row, askErr, err := answeredOrLost([]driver.Value{int64(1)}, pgErr); row != nil || askErr != pgErr || err != nil {
		t.Errorf("server error: row=%v askErr=%v err=%v; want the error as the answer, no row", row, askErr, err)
	}
	row := []driver.Value{int64(1)}
	if got, askErr, err := answeredOrLost(row, io.ErrUnexpectedEOF); !reflect.DeepEqual(got, row) || askErr != nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("lost after the row: row=%v askErr=%v err=%v; want the row and the loss", got, askErr, err)
	}
	if got, askErr, err := answeredOrLost(nil, io.ErrUnexpectedEOF); got != nil || askErr != nil || err == nil {
		t.Errorf("lost before the row: row=%v askErr=%v err=%v; want only the loss", got, askErr, err)
	}
}

func TestHandlesOnlyPgx(t *testing.T) {
	if (Flight{}).Handles(nil) {
		t.Error("Handles(nil) = true")
	}
}
