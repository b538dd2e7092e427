package integration

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// 8. Swap-in transparency: the same application code, run once through the
// raw driver and once through sqlretry, writes the same transcript: every
// value scanned, every column type, every error message.

// transcript records what application code saw.
type transcript struct{ strings.Builder }

func (tr *transcript) add(format string, a ...any) { fmt.Fprintf(tr, format+"\n", a...) }

// rows records every row of a query, with the column types.
func (tr *transcript) rows(rows *sql.Rows, err error) {
	if err != nil {
		tr.add("query error: %v", err)
		return
	}
	defer rows.Close()
	for set := 1; ; set++ {
		cts, err := rows.ColumnTypes()
		if err != nil {
			tr.add("column types: %v", err)
		}
		for _, ct := range cts {
			nullable, okN := ct.Nullable()
			length, okL := ct.Length()
			p, s, okP := ct.DecimalSize()
			tr.add("set %d column %s %s scan=%v nullable=%v/%v length=%d/%v decimal=%d,%d/%v", set, ct.Name(), ct.DatabaseTypeName(),
				ct.ScanType(), nullable, okN, length, okL, p, s, okP)
		}
		for rows.Next() {
			vals := make([]any, len(cts))
			ptrs := make([]any, len(cts))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := rows.Scan(ptrs...); err != nil {
				tr.add("scan: %v", err)
				continue
			}
			tr.add("set %d row %s", set, show(vals))
		}
		if err := rows.Err(); err != nil {
			tr.add("rows error: %v", err)
		}
		if !rows.NextResultSet() {
			break
		}
	}
}

func show(vals []any) string {
	parts := make([]string, len(vals))
	for i, v := range vals {
		switch x := v.(type) {
		case []byte:
			parts[i] = fmt.Sprintf("bytes(%q)", x)
		case time.Time:
			parts[i] = "time(" + x.UTC().Format(time.RFC3339Nano) + ")"
		default:
			parts[i] = fmt.Sprintf("%T(%v)", v, v)
		}
	}
	return strings.Join(parts, " ")
}

// pgApp is typical PostgreSQL application code.
func pgApp(t *testing.T, db *sql.DB, tbl string) string {
	ctx := context.Background()
	var tr transcript
	mustExec(t, db, "CREATE TABLE "+tbl+` (id int PRIMARY KEY, tags text[], nums int8[], doc jsonb, at timestamptz, day date,
		dur interval, note text, score numeric(10,2), raw bytea, flag bool, u uuid)`)
	at := time.Date(2026, 11, 24, 12, 30, 0, 123456000, time.FixedZone("CET", 3600))
	ins := "INSERT INTO " + tbl + " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
	res, err := db.ExecContext(ctx, ins, 1, []string{"a", "b,c", `q"uote`}, []int64{1, 2, 3}, map[string]any{"k": "v", "n": 1.5},
		at, at, "1 hour 30 minutes", "first", "12.50", []byte{0, 1, 255}, true, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
	tr.add("insert 1: %v", err)
	if err == nil {
		n, err := res.RowsAffected()
		tr.add("rows affected %d %v", n, err)
	}
	// NULLs, in the forms applications pass them.
	_, err = db.ExecContext(ctx, ins, 2, nil, []int64(nil), nil, sql.NullTime{}, nil, nil, sql.NullString{}, (*string)(nil), []byte(nil), sql.NullBool{}, nil)
	tr.add("insert 2 (nulls): %v", err)
	doc, _ := json.Marshal(struct {
		A []int `json:"a"`
	}{[]int{7, 8}})
	_, err = db.ExecContext(ctx, ins, 3, []string{}, []int64{}, doc, at.Add(time.Hour), at, "-2 days", "third", 0.5, []byte{}, false, nil)
	tr.add("insert 3: %v", err)

	tr.rows(db.QueryContext(ctx, "SELECT * FROM "+tbl+" ORDER BY id"))

	// Typed scans: arrays through pgtype, JSON, times, NULLs.
	m := pgtype.NewMap()
	for id := 1; id <= 3; id++ {
		var tags []string
		var nums []int64
		var docv []byte
		var when, day sql.NullTime
		var note sql.NullString
		var score sql.NullFloat64
		var flag sql.NullBool
		err := db.QueryRowContext(ctx, "SELECT tags, nums, doc, at, day, note, score, flag FROM "+tbl+" WHERE id = $1", id).
			Scan(m.SQLScanner(&tags), m.SQLScanner(&nums), &docv, &when, &day, &note, &score, &flag)
		tr.add("typed %d: %q %v %s %v %v %v %v %v err=%v", id, tags, nums, docv, when.Time.UTC(), day, note, score, flag, err)
	}

	// Prepared statement, used many times, including no rows.
	stmt, err := db.PrepareContext(ctx, "SELECT note FROM "+tbl+" WHERE id = $1")
	tr.add("prepare: %v", err)
	if err == nil {
		for _, id := range []int{1, 2, 3, 4} {
			var note sql.NullString
			err := stmt.QueryRowContext(ctx, id).Scan(&note)
			tr.add("stmt %d: %v %v", id, note, err)
		}
		stmt.Close()
	}

	// Named arguments: pgx's own, and database/sql's (which pgx refuses).
	var id int
	err = db.QueryRowContext(ctx, "SELECT id FROM "+tbl+" WHERE note = @note", pgx.NamedArgs{"note": "third"}).Scan(&id)
	tr.add("pgx.NamedArgs: %d %v", id, err)
	err = db.QueryRowContext(ctx, "SELECT id FROM "+tbl+" WHERE note = $1", sql.Named("note", "third")).Scan(&id)
	tr.add("sql.Named: %d %v", id, err)

	// A transaction rolled back, one committed, and errors.
	tx, err := db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
	tr.add("begin: %v", err)
	if err == nil {
		_, err = tx.ExecContext(ctx, "UPDATE "+tbl+" SET note = 'changed'")
		tr.add("tx update: %v", err)
		tr.add("rollback: %v", tx.Rollback())
		tr.add("second rollback: %v", tx.Rollback())
	}
	_, err = db.ExecContext(ctx, ins, 1, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil)
	tr.add("duplicate key: %v", err)
	_, err = db.ExecContext(ctx, "SELECT 1/0")
	tr.add("division by zero: %v", err)
	_, err = db.ExecContext(ctx, "SELEC 1")
	tr.add("syntax error: %v", err)
	err = db.QueryRowContext(ctx, "SELECT id FROM "+tbl+" WHERE id = 99").Scan(&id)
	tr.add("no rows: %v", err)
	tr.rows(db.QueryContext(ctx, "SELECT note, length(note) FROM "+tbl+" ORDER BY id"))

	// sql.Conn.Raw reaches *pgx.Conn (through sqlretry.UnwrapConn, which
	// returns a raw driver connection unchanged) for CopyFrom.
	conn, err := db.Conn(ctx)
	tr.add("conn: %v", err)
	if err == nil {
		err = conn.Raw(func(dc any) error {
			pc := sqlretry.UnwrapConn(dc).(*stdlib.Conn).Conn()
			n, err := pc.CopyFrom(ctx, pgx.Identifier{tbl}, []string{"id", "note"}, pgx.CopyFromRows([][]any{{10, "copied"}, {11, nil}}))
			tr.add("copy: %d", n)
			return err
		})
		tr.add("raw: %v", err)
		conn.Close()
	}
	tr.rows(db.QueryContext(ctx, "SELECT id, note FROM "+tbl+" WHERE id >= 10 ORDER BY id"))
	return tr.String()
}

// mysqlApp is typical MySQL/MariaDB application code.
func mysqlApp(t *testing.T, db *sql.DB, tbl string) string {
	ctx := context.Background()
	var tr transcript
	mustExec(t, db, "CREATE TABLE "+tbl+` (id int PRIMARY KEY, doc json, at datetime(6), day date, note varchar(50),
		score decimal(10,2), raw varbinary(10), flag bool, big bigint unsigned)`)
	at := time.Date(2026, 11, 24, 12, 30, 0, 123456000, time.UTC)
	ins := "INSERT INTO " + tbl + " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
	res, err := db.ExecContext(ctx, ins, 1, `{"k": "v", "n": [1, 2]}`, at, at, "first", "12.50", []byte{0, 1, 255}, true, uint64(1)<<63)
	tr.add("insert 1: %v", err)
	if err == nil {
		n, err := res.RowsAffected()
		tr.add("rows affected %d %v", n, err)
	}
	_, err = db.ExecContext(ctx, ins, 2, nil, sql.NullTime{}, nil, sql.NullString{}, (*string)(nil), []byte(nil), sql.NullBool{}, nil)
	tr.add("insert 2 (nulls): %v", err)
	doc, _ := json.Marshal(map[string]any{"a": []int{7, 8}})
	_, err = db.ExecContext(ctx, ins, 3, doc, at.Add(time.Hour), at, "third", 0.5, []byte{}, false, 0)
	tr.add("insert 3: %v", err)
	tr.rows(db.QueryContext(ctx, "SELECT * FROM "+tbl+" ORDER BY id"))

	for id := 1; id <= 3; id++ {
		var docv []byte
		var when sql.NullTime
		var note sql.NullString
		var score sql.NullFloat64
		var flag sql.NullBool
		err := db.QueryRowContext(ctx, "SELECT doc, at, note, score, flag FROM "+tbl+" WHERE id = ?", id).Scan(&docv, &when, &note, &score, &flag)
		tr.add("typed %d: %s %v %v %v %v err=%v", id, docv, when, note, score, flag, err)
	}

	stmt, err := db.PrepareContext(ctx, "SELECT note FROM "+tbl+" WHERE id = ?")
	tr.add("prepare: %v", err)
	if err == nil {
		for _, id := range []int{1, 2, 3, 4} {
			var note sql.NullString
			err := stmt.QueryRowContext(ctx, id).Scan(&note)
			tr.add("stmt %d: %v %v", id, note, err)
		}
		stmt.Close()
	}

	// Named arguments (the driver refuses them) and multiple result sets.
	var id int
	err = db.QueryRowContext(ctx, "SELECT id FROM "+tbl+" WHERE note = ?", sql.Named("note", "third")).Scan(&id)
	tr.add("sql.Named: %d %v", id, err)
	tr.rows(db.QueryContext(ctx, "SELECT id FROM "+tbl+" ORDER BY id; SELECT note, score FROM "+tbl+" WHERE id = 1; SELECT 'x' AS third"))
	proc := tbl + "_p"
	mustExec(t, db, "CREATE PROCEDURE "+proc+"() BEGIN SELECT COUNT(*) AS n FROM "+tbl+"; SELECT MAX(id) AS top FROM "+tbl+"; END")
	t.Cleanup(func() { db.Exec("DROP PROCEDURE IF EXISTS " + proc) })
	tr.rows(db.QueryContext(ctx, "CALL "+proc+"()"))

	tx, err := db.BeginTx(ctx, nil)
	tr.add("begin: %v", err)
	if err == nil {
		_, err = tx.ExecContext(ctx, "UPDATE "+tbl+" SET note = 'changed'")
		tr.add("tx update: %v", err)
		tr.add("rollback: %v", tx.Rollback())
		tr.add("second rollback: %v", tx.Rollback())
	}
	_, err = db.ExecContext(ctx, ins, 1, nil, nil, nil, nil, nil, nil, nil, nil)
	tr.add("duplicate key: %v", err)
	_, err = db.ExecContext(ctx, "SELEC 1")
	tr.add("syntax error: %v", err)
	err = db.QueryRowContext(ctx, "SELECT id FROM "+tbl+" WHERE id = 99").Scan(&id)
	tr.add("no rows: %v", err)
	tr.rows(db.QueryContext(ctx, "SELECT note, LENGTH(note) FROM "+tbl+" ORDER BY id"))
	return tr.String()
}

func TestSwapInTransparency(t *testing.T) {
	apps := map[string]func(*testing.T, *sql.DB, string) string{"pgx": pgApp, "mysql": mysqlApp}
	for _, driver := range []string{"pgx", "mysql"} {
		t.Run(driver, func(t *testing.T) {
			d := need(t, driver)
			var got [2]string
			for i, wrapped := range []bool{false, true} {
				open := sql.Open
				if wrapped {
					open = func(name, dsn string) (*sql.DB, error) { return sqlretry.Open(name, dsn) }
				}
				db, err := open(driver, d)
				if err != nil {
					t.Fatal(err)
				}
				tbl := table(t, db, "swap")
				// The transcript must not depend on the table's random name.
				got[i] = strings.ReplaceAll(apps[driver](t, db, tbl), tbl, "T")
				db.Close()
			}
			if got[0] != got[1] {
				t.Errorf("raw driver and sqlretry differ:\n%s", diffLines(got[0], got[1]))
			}
			if testing.Verbose() {
				t.Logf("transcript (%d lines):\n%s", strings.Count(got[1], "\n"), got[1])
			}
			// The transcript must have exercised what it claims to.
			for _, want := range []string{"insert 1: <nil>", "set 2 row", "stmt 4: { false} sql: no rows in result set", "duplicate key: "} {
				if driver == "pgx" && want == "set 2 row" {
					want = "copy: 2"
				}
				if !strings.Contains(got[1], want) {
					t.Errorf("transcript lacks %q", want)
				}
			}
		})
	}
}

func diffLines(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out strings.Builder
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if !reflect.DeepEqual(x, y) {
			fmt.Fprintf(&out, "line %d\n  raw:      %s\n  sqlretry: %s\n", i+1, x, y)
		}
	}
	return out.String()
}
