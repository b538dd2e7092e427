package sqlretry

import (
	"context"
	"database/sql/driver"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand"
	"testing"
)

// walFake serves pgRecordAt's two queries from memory.
type walFake struct {
	segSize, blk any
	files        map[string][]byte
	reads        []string
}

type walFakeRows struct {
	cols []string
	row  []driver.Value
	done bool
}

func (r *walFakeRows) Columns() []string { return r.cols }
func (r *walFakeRows) Close() error      { return nil }
func (r *walFakeRows) Next(dest []driver.Value) error {
	if r.done {
		return io.EOF
	}
	r.done = true
	copy(dest, r.row)
	return nil
}

func (c *walFake) Prepare(string) (driver.Stmt, error) { return nil, fmt.Errorf("no") }
func (c *walFake) Close() error                        { return nil }
func (c *walFake) Begin() (driver.Tx, error)           { return nil, fmt.Errorf("no") }
func (c *walFake) QueryContext(_ context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	switch {
	case q == pgWALSizesQuery:
		return &walFakeRows{cols: []string{"a", "b"}, row: []driver.Value{c.segSize, c.blk}}, nil
	case q == pgWALReadQuery:
		name := args[0].Value.(string)
		from, n := args[1].Value.(int64), args[2].Value.(int64)
		c.reads = append(c.reads, fmt.Sprintf("%s@%d+%d", name, from, n))
		f, ok := c.files[name]
		if !ok {
			return &walFakeRows{cols: []string{"f"}, row: []driver.Value{nil}}, nil
		}
		end := from + n
		if end > int64(len(f)) {
			end = int64(len(f))
		}
		return &walFakeRows{cols: []string{"f"}, row: []driver.Value{append([]byte(nil), f[from:end]...)}}, nil
	}
	return nil, fmt.Errorf("unexpected query %q", q)
}

// walWriter writes a synthetic WAL stream (timeline 1) into segment
// files: page headers (long on a segment's first page), MAXALIGNed
// record starts, records crossing pages and segments.
type walWriter struct {
	segSize, blk uint64
	cur          uint64
	files        map[string][]byte
	rng          *rand.Rand
}

func (w *walWriter) byteAt(b byte) {
	if w.cur%w.blk == 0 {
		hdr := uint64(24)
		if w.cur%w.segSize == 0 {
			hdr = 40
		}
		for i := uint64(0); i < hdr; i++ {
			w.put(0xD1)
		}
	}
	w.put(b)
}

func (w *walWriter) put(b byte) {
	segno := w.cur / w.segSize
	perID := 0x100000000 / w.segSize
	name := fmt.Sprintf("%08X%08X%08X", 1, segno/perID, segno%perID)
	f := w.files[name]
	if f == nil {
		f = make([]byte, w.segSize)
		w.files[name] = f
	}
	f[w.cur%w.segSize] = b
	w.cur++
}

// fill writes random record bytes up to LSN s (s 8-aligned).
func (w *walWriter) fill(s uint64) {
	if s > 2048 {
		w.cur = s - 2048 // only the last bytes matter: pgRecordAt reads 512 before L and the previous segment's last 512
	}
	for w.cur < s {
		if w.cur%w.blk == 0 {
			hdr := uint64(24)
			if w.cur%w.segSize == 0 {
				hdr = 40
			}
			for i := uint64(0); i < hdr; i++ {
				w.put(0xD1)
			}
			continue
		}
		w.put(byte(w.rng.Intn(256)))
	}
}

// message writes the transaction's logical message as PostgreSQL does
// and returns L (XLogBytePosToEndRecPtr of the MAXALIGNed end).
func (w *walWriter) message(xid uint32, payload string) uint64 {
	rec := walMessageRecord(xid, payload)
	for _, b := range rec {
		w.byteAt(b)
	}
	// MAXALIGN the end; a page boundary is the end itself.
	for w.cur%8 != 0 {
		w.put(0)
	}
	return w.cur
}

// walMessageRecord is the record of pg_logical_emit_message(true,
// 'sqlretry', payload) in transaction xid, as PostgreSQL writes it
// (little-endian), unaligned.
func walMessageRecord(xid uint32, payload string) []byte {
	rec := make([]byte, 0, 64+len(payload))
	var h [24]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(59+len(payload)))
	binary.LittleEndian.PutUint32(h[4:], xid)
	h[17] = pgRmLogicalMsg
	rec = append(rec, h[:]...)
	rec = append(rec, 0xFF, byte(33+len(payload)))
	rec = append(rec, 5, 0, 0, 0, 1, 0, 0, 0) // dbId, transactional, pad
	rec = binary.LittleEndian.AppendUint64(rec, 9)
	rec = binary.LittleEndian.AppendUint64(rec, uint64(len(payload)))
	rec = append(rec, "sqlretry\x00"...)
	return append(rec, payload...)
}

// The same record as PostgreSQL writes it under wal_level=logical when the
// message is the first record of a subtransaction whose top-level id was
// assigned before (a savepoint open at COMMIT): a top-level-xid block
// (XLR_BLOCK_ID_TOPLEVEL_XID) before the main data, and, with a
// replication origin set, an origin block before that. A hostile
// tester's crash restarts (attack13) got ErrAmbiguousCommit for such
// commits: the record was not recognised.
func TestWalRecordWithOriginAndTopLevelXID(t *testing.T) {
	const blk = 8192
	for _, c := range []struct {
		name   string
		blocks []byte
	}{
		{"top-level xid", []byte{252, 0xF4, 0x02, 0, 0}},
		{"origin and top-level xid", []byte{253, 1, 0, 252, 0xF4, 0x02, 0, 0}},
		{"origin", []byte{253, 1, 0}},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec := walMessageRecord(759, "756")
			rec = append(append(append([]byte(nil), rec[:24]...), c.blocks...), rec[24:]...)
			binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)))
			raw := make([]byte, 512)
			aligned := (len(rec) + 7) &^ 7
			copy(raw[512-aligned:], rec)
			from := uint64(4096) // within a page: no header in the window
			if a, what := walRecordEndingAt(nil, raw, from, blk, 756); a != walOurs {
				t.Errorf("%s: %v, %s; want ours", c.name, a, what)
			}
			if a, what := walRecordEndingAt(nil, raw, from, blk, 757); a != walOther {
				t.Errorf("%s, another id: %v, %s; want other", c.name, a, what)
			}
		})
	}
}

// TestPgRecordAtSyntheticBoundaries: our message placed so that L
// falls at every 8-aligned offset around page and segment boundaries
// (segment 0 included, L < 512, L at a segment's start): pgRecordAt must
// say "ours" for every one (an "other" replays a committed transaction).
func TestPgRecordAtSyntheticBoundaries(t *testing.T) {
	const segSize = 1 << 20
	for _, blk := range []uint64{1024, 8192, 65536} {
		var starts []uint64
		for s := uint64(40); s < 1200; s += 8 {
			starts = append(starts, s) // segment 0, L < 512 and beyond
		}
		for _, base := range []uint64{blk, 2 * blk, segSize, 2 * segSize, 5 * segSize} {
			for d := int64(-200); d <= 200; d += 8 {
				starts = append(starts, uint64(int64(base)+d))
			}
		}
		bad := 0
		for _, s := range starts {
			if s%blk < 40 && s%segSize < 40 || s%blk < 24 {
				continue // inside a page header: no record starts there
			}
			w := &walWriter{segSize: segSize, blk: blk, files: map[string][]byte{}, rng: rand.New(rand.NewSource(int64(s)))}
			w.fill(s)
			xid := uint32(777)
			full := int64(xid) | 5<<32 // with its epoch, as pg_current_xact_id() gives it
			L := w.message(xid, fmt.Sprint(full))
			c := &walFake{segSize: int64(segSize), blk: int64(blk), files: w.files}
			ours, other, desc := recordAt(context.Background(), c, []int64{1}, pgMark{tli: 1, lsn: L}, full)
			if !ours {
				bad++
				if bad < 10 {
					t.Errorf("blk %d start %d L %d (offset in seg %d, in page %d): ours=%v other=%v: %s", blk, s, L, L%segSize, L%blk, ours, other, desc)
				}
			}
			// Another transaction's message (another id in its payload)
			// ending at L: the WAL there is not ours.
			if o, oth, desc := recordAt(context.Background(), c, []int64{1}, pgMark{tli: 1, lsn: L}, full+1); o || !oth {
				t.Errorf("blk %d L %d, other id: ours=%v other=%v: %s", blk, L, o, oth, desc)
			}
		}
		t.Logf("blk %d: %d placements, %d not recognised", blk, len(starts), bad)
	}
}

// TestPgRecordAtOddWALSizes: a server (a PostgreSQL-compatible engine, a
// proxy) answering sizes PostgreSQL never has (a segment of 4 GiB or more
// or a negative one made perID zero: integer divide by zero) gets neither
// verdict, and no panic.
func TestPgRecordAtOddWALSizes(t *testing.T) {
	for _, seg := range []int64{1 << 32, 1 << 33, -8192, 3 << 20, 1 << 19} {
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Errorf("segment size %d: panic: %v", seg, p)
				}
			}()
			c := &walFake{segSize: seg, blk: int64(8192), files: map[string][]byte{}}
			ours, other, desc := recordAt(context.Background(), c, []int64{1}, pgMark{tli: 1, lsn: 0x5000000}, 7)
			if ours || other {
				t.Errorf("segment size %d: ours=%v other=%v: %s; want neither", seg, ours, other, desc)
			}
		}()
	}
}

// TestWalRecordEndingAtNoPanic: odd inputs to the parser.
func TestWalRecordEndingAtNoPanic(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 20000; i++ {
		n := rng.Intn(600)
		raw := make([]byte, n)
		rng.Read(raw)
		if rng.Intn(2) == 0 && n > 20 {
			copy(raw[n-9-rng.Intn(8):], "sqlretry\x00")
		}
		var prev []byte
		if rng.Intn(3) == 0 {
			prev = make([]byte, rng.Intn(600))
			rng.Read(prev)
		}
		from := uint64(rng.Intn(3) * rng.Intn(1<<20))
		blk := []uint64{1, 7, 8, 24, 40, 1024, 8192}[rng.Intn(7)]
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Fatalf("panic raw %d from %d blk %d: %v", n, from, blk, p)
				}
			}()
			walRecordEndingAt(prev, raw, from, blk, int64(rng.Uint32()))
		}()
	}
}

// recordAt is pgRecordAt's verdict as two flags (neither: unknown,
// unread, or an error, whose text is desc).
func recordAt(ctx context.Context, dc driver.Conn, tlis []int64, m pgMark, xid int64) (ours, other bool, desc string) {
	ans, desc, err := pgRecordAt(ctx, dc, tlis, m, xid)
	if err != nil {
		return false, false, err.Error()
	}
	return ans == walOurs, ans == walOther, desc
}
