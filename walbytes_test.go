package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The WAL check at L (pgRecordAt, walRecordEndingAt) against the bytes a
// real PostgreSQL writes: messages emitted as sqlretry emits them (the
// question before COMMIT, pgAskXIDProof13AndServer), placed so that L
// lands at and around page and segment boundaries, read back with
// pgRecordAt. Each must be recognised as the transaction's own ("other"
// there would answer "not committed" for a COMMIT that took effect, and
// the replay would write twice); a wrong id and a shifted L must not.
//
// It needs the PostgreSQL server binaries (initdb, pg_ctl): without them
// it skips, and fails under CI=true.

// walServer is a private PostgreSQL server for these tests.
type walServer struct {
	t    testing.TB
	bin  string
	dir  string
	data string
	port int
	db   *sql.DB
}

func walPGBin(t testing.TB) string {
	t.Helper()
	var dirs []string
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dirs = append(dirs, strings.TrimSpace(string(out)))
	}
	more, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for i := len(more) - 1; i >= 0; i-- {
		dirs = append(dirs, more[i])
	}
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d
		}
	}
	walUnavailable(t, "no PostgreSQL server binaries (initdb)")
	return ""
}

func walUnavailable(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("DATABASE UNAVAILABLE under CI=true: %s", why)
	}
	t.Skipf("DATABASE UNAVAILABLE, skipping: %s", why)
}

// walRun runs a server program, as the postgres system user when root.
func walRun(name string, args ...string) *exec.Cmd {
	if os.Geteuid() == 0 {
		return exec.Command("runuser", append([]string{"-u", "postgres", "--", name}, args...)...)
	}
	return exec.Command(name, args...)
}

func walFreePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startWALServer initialises a cluster with initdb's extra arguments,
// runs prepare on its data directory (pg_resetwal), and starts it with the
// extra settings.
func startWALServer(t testing.TB, initdb []string, prepare func(bin, data string) error, settings ...string) *walServer {
	t.Helper()
	s := &walServer{t: t, bin: walPGBin(t)}
	dir, err := os.MkdirTemp("", "sqlretry-wal-")
	if err != nil {
		t.Fatal(err)
	}
	s.dir, s.data = dir, filepath.Join(dir, "data")
	t.Cleanup(func() { os.RemoveAll(dir) })
	if os.Geteuid() == 0 {
		if out, err := exec.Command("chown", "postgres:postgres", dir).CombinedOutput(); err != nil {
			walUnavailable(t, fmt.Sprintf("chown: %v: %s", err, out))
		}
	}
	args := append([]string{"-D", s.data, "-A", "trust", "-U", "postgres", "--no-sync"}, initdb...)
	if out, err := walRun(filepath.Join(s.bin, "initdb"), args...).CombinedOutput(); err != nil {
		walUnavailable(t, fmt.Sprintf("initdb: %v: %s", err, out))
	}
	if prepare != nil {
		if err := prepare(s.bin, s.data); err != nil {
			t.Fatal(err)
		}
	}
	s.start(t, s.data, settings...)
	return s
}

func (s *walServer) start(t testing.TB, data string, settings ...string) {
	t.Helper()
	s.port = walFreePort(t)
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=20 -c wal_keep_size=4GB -c max_wal_size=4GB", s.port, s.dir)
	for _, o := range settings {
		opts += " -c " + o
	}
	if out, err := walRun(filepath.Join(s.bin, "pg_ctl"), "-D", data, "-w", "-l", data+".log", "-o", opts, "start").CombinedOutput(); err != nil {
		walUnavailable(t, fmt.Sprintf("pg_ctl start: %v: %s", err, out))
	}
	t.Cleanup(func() { _ = walRun(filepath.Join(s.bin, "pg_ctl"), "-D", data, "-m", "immediate", "stop").Run() })
	db, err := sql.Open("pgx", fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", s.port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s.db = db
}

// walGeometry is what pgRecordAt reads of the cluster.
type walGeometry struct{ seg, blk uint64 }

func (g walGeometry) usablePerSeg() uint64 {
	return (g.blk - 40) + (g.seg/g.blk-1)*(g.blk-24)
}

// bytePos is the count of record bytes (page headers left out) before the
// WAL position p, a record's start (XLogRecPtrToBytePos).
func (g walGeometry) bytePos(p uint64) uint64 {
	segno, off := p/g.seg, p%g.seg
	var in uint64
	if off < g.blk {
		if off > 40 {
			in = off - 40
		}
	} else {
		in = (g.blk - 40) + (off/g.blk-1)*(g.blk-24)
		if r := off % g.blk; r > 24 {
			in += r - 24
		}
	}
	return segno*g.usablePerSeg() + in
}

// endBytePos is bytePos for a record's end (at a page boundary: the
// boundary itself).
func (g walGeometry) endBytePos(p uint64) uint64 { return g.bytePos(p-1) + 1 }

// fillerSQL is a non-transactional logical message that occupies exactly
// f bytes of record (f a multiple of 8, at least 56).
func fillerSQL(f uint64) string {
	k := int64(f) - 52 // 24 header, 2 short data header, 24 xl_logical_message, "f\0"
	if f > 280 {
		k = int64(f) - 55 // long data header
	}
	return fmt.Sprintf("SELECT pg_catalog.pg_logical_emit_message(false, 'f', pg_catalog.repeat('x', %d))", k)
}

// walMessage is one message as sqlretry recorded it.
type walMessage struct {
	xid  int64
	lsn  uint64
	what string
}

// walTx runs one transaction that ends with sqlretry's question before
// COMMIT, its message ending near target (a count of record bytes, 0: no
// aim), after the statements in before.
func walTx(ctx context.Context, t testing.TB, db *sql.DB, g walGeometry, target uint64, before []string, what string) walMessage {
	t.Helper()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var m walMessage
	err = c.Raw(func(dc any) error {
		d := dc.(driver.Conn)
		for _, q := range before {
			if strings.HasPrefix(q, "!") { // outside the transaction
				if _, err := queryRows(ctx, d, q[1:]); err != nil {
					return fmt.Errorf("%s: %w", q, err)
				}
			}
		}
		if _, err := queryRows(ctx, d, "BEGIN"); err != nil {
			return err
		}
		for _, q := range before {
			if strings.HasPrefix(q, "!") {
				continue
			}
			if _, err := queryRows(ctx, d, q); err != nil {
				return fmt.Errorf("%s: %w", q, err)
			}
		}
		if target != 0 {
			vals, err := queryRow(ctx, d, "SELECT pg_catalog.pg_current_wal_insert_lsn()")
			if err != nil {
				return err
			}
			p := g.bytePos(lsnValue(vals[0]))
			f := target - 64 - p
			for target < p+64+56 || f < 56 {
				target += g.blk - 24
				f = target - 64 - p
			}
			if _, err := queryRow(ctx, d, fillerSQL(f)); err != nil {
				return err
			}
		}
		vals, err := queryRow(ctx, d, pgAskXIDProof13AndServer)
		if err != nil {
			return err
		}
		m = walMessage{xid: asInt64(vals[0]), lsn: lsnValue(vals[1]), what: what}
		_, err = queryRows(ctx, d, "COMMIT")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// walCheck reads the WAL at each message's L as pgRecordAt does.
func walCheck(ctx context.Context, t testing.TB, db *sql.DB, tlis []int64, msgs []walMessage, wantOurs bool) (ours int) {
	t.Helper()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Raw(func(dc any) error {
		d := dc.(driver.Conn)
		for _, m := range msgs {
			mark := pgMark{tli: tlis[0], lsn: m.lsn}
			o, other, desc := recordAt(ctx, d, tlis, mark, m.xid)
			if o {
				ours++
			}
			if wantOurs && (!o || other) {
				t.Errorf("%s: L %s id %d: ours %v other %v: %s", m.what, lsnString(m.lsn), m.xid, o, other, desc)
			}
			if !wantOurs && other {
				t.Errorf("%s: L %s id %d (not ours: id in a subtransaction): other: %s", m.what, lsnString(m.lsn), m.xid, desc)
			}
			if !wantOurs {
				continue
			}
			// Another id, and L shifted, are never ours.
			if o, _, desc := recordAt(ctx, d, tlis, mark, m.xid+1); o {
				t.Errorf("%s: L %s: id %d taken for %d: %s", m.what, lsnString(m.lsn), m.xid+1, m.xid, desc)
			}
			for _, shift := range []int64{-8, 8, -64, 64} {
				sm := mark
				sm.lsn = uint64(int64(m.lsn) + shift)
				if in := sm.lsn % walBlk(d, ctx); in > 0 && in < 40 {
					continue // inside a page header: no record ends there
				}
				if o, _, desc := recordAt(ctx, d, tlis, sm, m.xid); o {
					t.Errorf("%s: L %s shifted by %d: ours: %s", m.what, lsnString(m.lsn), shift, desc)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ours
}

func walGeometryOf(ctx context.Context, t testing.TB, db *sql.DB) walGeometry {
	t.Helper()
	var g walGeometry
	if err := db.QueryRowContext(ctx, pgWALSizesQuery).Scan(&g.seg, &g.blk); err != nil {
		t.Fatal(err)
	}
	return g
}

// walSweep runs the transactions: L at and around the next page
// boundaries (within a segment and at its first page), and, with
// segBoundaries, around segment boundaries (a filler up to the segment's
// end first).
func walSweep(ctx context.Context, t testing.TB, db *sql.DB, g walGeometry, secondPages, segBoundaries int, before func(i int) []string) []walMessage {
	t.Helper()
	var msgs []walMessage
	insertPos := func() uint64 {
		var s string
		if err := db.QueryRowContext(ctx, "SELECT pg_catalog.pg_current_wal_insert_lsn()::text").Scan(&s); err != nil {
			t.Fatal(err)
		}
		n, _ := parseLSN(s)
		return n
	}
	i := 0
	// Around page boundaries: L from 96 bytes before to 96 after.
	for d := int64(-96); d <= 96; d += 8 {
		p := insertPos()
		next := (p/g.blk + 2) * g.blk // a page boundary at least a page ahead
		target := uint64(int64(g.endBytePos(next)) + d)
		msgs = append(msgs, walTx(ctx, t, db, g, target, before(i), fmt.Sprintf("page boundary %+d", d)))
		i++
	}
	// Around the start of a segment's second page (after the long header).
	for j := 0; j < secondPages; j++ {
		d := []int64{-8, 0, 8, -32, 32, -24, 24, -16, 16}[j%9]
		if _, err := db.ExecContext(ctx, "SELECT pg_catalog.pg_switch_wal()"); err != nil {
			t.Fatal(err)
		}
		p := insertPos()
		segStart := p / g.seg * g.seg
		target := uint64(int64(g.endBytePos(segStart+g.blk)) + d)
		msgs = append(msgs, walTx(ctx, t, db, g, target, before(i), fmt.Sprintf("second page of a segment %+d", d)))
		i++
	}
	// Around segment boundaries.
	ds := []int64{-64, -8, 0, 8, 16, 24, 40, 56, 64, 72, 128, 512}
	for j := 0; j < segBoundaries; j++ {
		d := ds[j%len(ds)]
		p := insertPos()
		next := (p/g.seg + 1) * g.seg
		if g.endBytePos(next)-g.bytePos(p) < 65536 {
			next += g.seg
		}
		// Most of the way with a filler of its own (a statement), then aim.
		fill := g.endBytePos(next) - g.bytePos(p) - 32768
		fill -= fill % 8
		if _, err := db.ExecContext(ctx, fillerSQL(fill)); err != nil {
			t.Fatal(err)
		}
		target := uint64(int64(g.endBytePos(next)) + d)
		msgs = append(msgs, walTx(ctx, t, db, g, target, before(i), fmt.Sprintf("segment boundary %+d", d)))
		i++
	}
	return msgs
}

// walPlace says where L landed, for the log.
func walPlace(g walGeometry, msgs []walMessage) string {
	pages, segs := 0, 0
	for _, m := range msgs {
		off := m.lsn % g.seg
		if off%g.blk <= 64 || off%g.blk >= g.blk-64 {
			pages++
		}
		if off <= 128 || off >= g.seg-64 {
			segs++
		}
	}
	return fmt.Sprintf("%d messages, %d within 64 bytes of a page boundary, %d at a segment boundary", len(msgs), pages, segs)
}

// walWrites are the writes before the question: none (the question
// assigns the id), rows of varied sizes (full page images after the
// checkpoints), a released savepoint.
func walWrites(i int) []string {
	var qs []string
	if i%7 == 3 {
		qs = append(qs, "!CHECKPOINT")
	}
	switch i % 5 {
	case 1:
		qs = append(qs, fmt.Sprintf("INSERT INTO w VALUES (%d, pg_catalog.repeat('a', %d))", i, i*37%300))
	case 2:
		qs = append(qs, fmt.Sprintf("INSERT INTO w SELECT g, pg_catalog.md5(g::text) FROM pg_catalog.generate_series(1, %d) g", 1+i%40))
	case 3:
		qs = append(qs, "SAVEPOINT s", fmt.Sprintf("INSERT INTO w VALUES (%d, 'sp')", i), "RELEASE SAVEPOINT s")
	case 4:
		qs = append(qs, fmt.Sprintf("UPDATE w SET v = pg_catalog.repeat('u', %d) WHERE k %% 11 = %d", i%90, i%11))
	}
	return qs
}

func walTable(ctx context.Context, t testing.TB, db *sql.DB) {
	t.Helper()
	if _, err := db.ExecContext(ctx, "CREATE TABLE w (k int, v text)"); err != nil {
		t.Fatal(err)
	}
}

func walBlk(d driver.Conn, ctx context.Context) uint64 {
	vals, err := queryRow(ctx, d, pgWALSizesQuery)
	if err != nil {
		return 8192
	}
	return uint64(asInt64(vals[1]))
}

// startWALStandby makes a streaming standby of s (pg_basebackup) and
// starts it with the extra settings.
func startWALStandby(t testing.TB, s *walServer, settings ...string) *walServer {
	return startWALStandbyIn(t, s, "standby", settings...)
}

func startWALStandbyIn(t testing.TB, s *walServer, name string, settings ...string) *walServer {
	t.Helper()
	st := &walServer{t: t, bin: s.bin, dir: s.dir, data: filepath.Join(s.dir, name)}
	if out, err := walRun(filepath.Join(s.bin, "pg_basebackup"), "-h", "127.0.0.1", "-p", fmt.Sprint(s.port), "-U", "postgres",
		"-D", st.data, "-R", "-X", "stream", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("pg_basebackup: %v: %s", err, out)
	}
	st.start(t, st.data, settings...)
	return st
}

// walReset runs pg_resetwal with args before the cluster's first start:
// -e sets the xid epoch (ids past 2^32), -l the next WAL segment (names
// whose middle part is not 0).
func walReset(args ...string) func(bin, data string) error {
	return func(bin, data string) error {
		out, err := walRun(filepath.Join(bin, "pg_resetwal"), append(args, "-D", data)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("pg_resetwal: %v: %s", err, out)
		}
		return nil
	}
}

// walMore runs n transactions without aim (the writes move L around).
func walMore(ctx context.Context, t testing.TB, db *sql.DB, g walGeometry, n int) []walMessage {
	var msgs []walMessage
	for i := 0; i < n; i++ {
		msgs = append(msgs, walTx(ctx, t, db, g, 0, walWrites(i), fmt.Sprintf("unaimed %d", i)))
	}
	return msgs
}

// TestPgRecordAtRealWAL: 1 MB segments with wal_level logical,
// wal_compression and ids past 2^32; 16 MB segments with wal_level
// replica. Messages with L at and around page boundaries, the first pages
// of segments and segment boundaries (records that begin in one segment
// and end in the next), and more in between, each recognised as the
// transaction's own; a wrong id or a shifted L never. In an open
// savepoint (the message carries the subtransaction's id) never "other".
func TestPgRecordAtRealWAL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, c := range []struct {
		name     string
		initdb   []string
		prepare  func(bin, data string) error
		settings []string
		pages    int // around the second page of a segment
		segs     int
		more     int
	}{
		{"1MB logical epoch", []string{"--wal-segsize=1"}, walReset("-e", "2", "-l", "000000010000000100000FFD"),
			[]string{"wal_level=logical", "wal_compression=pglz"}, 9, 24, 80},
		{"16MB replica", []string{"--wal-segsize=16"}, nil, []string{"wal_level=replica"}, 9, 8, 80},
		{"64MB", []string{"--wal-segsize=64"}, walReset("-l", "00000001000000030000003F"), nil, 2, 0, 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			began := time.Now()
			s := startWALServer(t, c.initdb, c.prepare, c.settings...)
			walTable(ctx, t, s.db)
			g := walGeometryOf(ctx, t, s.db)
			msgs := walSweep(ctx, t, s.db, g, c.pages, c.segs, walWrites)
			msgs = append(msgs, walMore(ctx, t, s.db, g, c.more)...)
			ours := walCheck(ctx, t, s.db, []int64{1}, msgs, true)
			if strings.HasPrefix(c.name, "1MB") && (msgs[0].xid < 1<<32 || msgs[len(msgs)-1].lsn < 1<<32) {
				t.Errorf("id %d, L %s: pg_resetwal did not take", msgs[0].xid, lsnString(msgs[len(msgs)-1].lsn))
			}
			// In an open savepoint: not ours (another id), never other.
			var sp []walMessage
			for i := 0; i < 12; i++ {
				before := []string{"SAVEPOINT s"}
				if i%2 == 1 {
					before = append(before, fmt.Sprintf("INSERT INTO w VALUES (%d, 'sub')", i))
				}
				sp = append(sp, walTx(ctx, t, s.db, g, 0, before, fmt.Sprintf("open savepoint %d", i)))
			}
			walCheck(ctx, t, s.db, []int64{1}, sp, false)
			t.Logf("segment %d: %s; %d ours; L from %s to %s; %v", g.seg, walPlace(g, msgs), ours,
				lsnString(msgs[0].lsn), lsnString(msgs[len(msgs)-1].lsn), time.Since(began))
		})
	}
}

// TestPgRecordAtPromotedStandby: messages on timeline 1 read on a promoted
// standby (timeline 2, archive_mode on): the parent's segments, the
// switch segment renamed .partial, and the child's copy of it alone; the
// history file as pgHistoryFork reads it.
func TestPgRecordAtPromotedStandby(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := startWALServer(t, []string{"--wal-segsize=1"}, nil, "wal_level=replica", "max_wal_senders=5")
	walTable(ctx, t, s.db)
	st := startWALStandby(t, s, "archive_mode=on", "archive_command=/bin/true")
	g := walGeometryOf(ctx, t, s.db)
	msgs := walSweep(ctx, t, s.db, g, 2, 8, walWrites)
	// More in the last segment, the one the promotion splits.
	var split []walMessage
	for i := 0; i < 8; i++ {
		split = append(split, walTx(ctx, t, s.db, g, 0, walWrites(i), "switch segment"))
	}
	last := split[len(split)-1].lsn
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var replay string
		if err := st.db.QueryRowContext(ctx, "SELECT pg_catalog.pg_last_wal_replay_lsn()::text").Scan(&replay); err != nil {
			t.Fatal(err)
		}
		if n, _ := parseLSN(replay); n >= last {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("standby at %s, not %s", replay, lsnString(last))
		}
	}
	if out, err := walRun(filepath.Join(s.bin, "pg_ctl"), "-D", s.data, "-m", "immediate", "stop").CombinedOutput(); err != nil {
		t.Fatalf("stop primary: %v: %s", err, out)
	}
	if out, err := walRun(filepath.Join(s.bin, "pg_ctl"), "-D", st.data, "-w", "promote").CombinedOutput(); err != nil {
		t.Fatalf("promote: %v: %s", err, out)
	}
	var tli string
	if err := st.db.QueryRowContext(ctx, "SELECT "+pgTimelineCol).Scan(&tli); err != nil || tli != "00000002" {
		t.Fatalf("promoted standby on timeline %q: %v", tli, err)
	}
	walCheck(ctx, t, st.db, []int64{1, 2}, append(msgs, split...), true)
	c, err := st.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Raw(func(dc any) error {
		d := dc.(driver.Conn)
		past, known, desc, child := pgHistoryFork(ctx, d, 2, pgMark{tli: 1, lsn: last})
		if !past || !known || child != 2 {
			t.Errorf("history file of timeline 2: past %v known %v child %d: %s", past, known, child, desc)
		}
		for _, m := range split {
			for _, tlis := range [][]int64{{1}, {2}} {
				o, other, what := recordAt(ctx, d, tlis, pgMark{tli: 1, lsn: m.lsn}, m.xid)
				if !o || other {
					t.Errorf("timelines %v: L %s id %d: ours %v other %v: %s", tlis, lsnString(m.lsn), m.xid, o, other, what)
				}
				if tlis[0] == 1 && !strings.Contains(what, ".partial") {
					t.Errorf("timeline 1: L %s not read from the .partial segment: %s", lsnString(m.lsn), what)
				}
			}
		}
		t.Logf("%s; the switch segment: %s", walPlace(g, msgs), desc)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func (s *walServer) pgctl(t testing.TB, args ...string) {
	t.Helper()
	if out, err := walRun(filepath.Join(s.bin, "pg_ctl"), append([]string{"-D", s.data}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("pg_ctl %v: %v: %s", args, err, out)
	}
}

func (s *walServer) lsn(ctx context.Context, t testing.TB, q string) uint64 {
	t.Helper()
	var v sql.NullString
	if err := s.db.QueryRowContext(ctx, "SELECT ("+q+")::text").Scan(&v); err != nil {
		t.Fatal(err)
	}
	n, _ := parseLSN(v.String)
	return n
}

func (s *walServer) waitReplay(ctx context.Context, t testing.TB, at uint64) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if s.lsn(ctx, t, "pg_catalog.pg_last_wal_replay_lsn()") >= at {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: replay not at %s", s.data, lsnString(at))
		}
	}
}

// TestPgRecordAtPartialParentSegment: a standby that had received only
// the start of the parent timeline's switch segment and replayed the rest
// from the child timeline's copy (restored from the archive) keeps the
// parent's file, zeros past what it received. Promoted, it must not read
// "another life's WAL" there for a message its history holds.
func TestPgRecordAtPartialParentSegment(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var archive string
	a := startWALServer(t, []string{"--wal-segsize=1"}, func(bin, data string) error {
		archive = filepath.Join(filepath.Dir(data), "archive")
		if out, err := walRun("mkdir", archive).CombinedOutput(); err != nil {
			return fmt.Errorf("mkdir: %v: %s", err, out)
		}
		conf := fmt.Sprintf("\narchive_mode = on\narchive_command = 'test ! -f %[1]s/%%f && cp %%p %[1]s/%%f'\nrestore_command = 'cp %[1]s/%%f %%p'\n", archive)
		f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteString(conf)
		return err
	}, "wal_level=replica", "max_wal_senders=5")
	walTable(ctx, t, a.db)
	b := startWALStandbyIn(t, a, "b")
	c := startWALStandbyIn(t, a, "c")
	g := walGeometryOf(ctx, t, a.db)
	if _, err := a.db.ExecContext(ctx, "SELECT pg_catalog.pg_switch_wal()"); err != nil {
		t.Fatal(err)
	}
	var msgs []walMessage
	for i := 0; i < 3; i++ {
		msgs = append(msgs, walTx(ctx, t, a.db, g, 0, walWrites(i), "received by c"))
	}
	c.waitReplay(ctx, t, msgs[len(msgs)-1].lsn)
	c.pgctl(t, "-m", "fast", "stop")
	for i := 0; i < 12; i++ {
		msgs = append(msgs, walTx(ctx, t, a.db, g, 0, walWrites(i), "not received by c"))
	}
	last := msgs[len(msgs)-1].lsn
	if last/g.seg != msgs[0].lsn/g.seg {
		t.Fatalf("the messages are not in one segment: %s to %s", lsnString(msgs[0].lsn), lsnString(last))
	}
	b.waitReplay(ctx, t, last)
	a.pgctl(t, "-m", "immediate", "stop")
	b.pgctl(t, "-w", "promote")
	if _, err := b.db.ExecContext(ctx, "CREATE TABLE after (k int); SELECT pg_catalog.pg_switch_wal()"); err != nil {
		t.Fatal(err)
	}
	segno := last / g.seg
	name := fmt.Sprintf("%08X%08X%08X", 2, segno/(0x100000000/g.seg), segno%(0x100000000/g.seg))
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(archive, name)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not archived", name)
		}
	}
	c.start(t, c.data)
	var hist string
	_ = b.db.QueryRowContext(ctx, "SELECT pg_catalog.pg_read_file('pg_wal/00000002.history')").Scan(&hist)
	x, _ := parseLSN(strings.Fields(hist)[1])
	c.waitReplay(ctx, t, x)
	c.pgctl(t, "-w", "promote")
	ls, _ := exec.Command("ls", "-l", filepath.Join(c.data, "pg_wal")).CombinedOutput()
	t.Logf("history of timeline 2: %q; c's pg_wal:\n%s", hist, ls)
	conn, err := c.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = conn.Raw(func(dc any) error {
		d := dc.(driver.Conn)
		now, err := pgAskNow(ctx, d)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			mark := pgMark{tli: 1, lsn: m.lsn}
			past, known, desc, child := pgHistoryFork(ctx, d, now.tli, mark)
			if !past || !known {
				t.Errorf("timeline %d: L %s: past %v known %v: %s", now.tli, lsnString(m.lsn), past, known, desc)
				continue
			}
			o, other, what := recordAt(ctx, d, []int64{1, child}, mark, m.xid)
			if !o || other {
				t.Errorf("%s: L %s, in the history of timeline %d (%s): ours %v other %v: %s", m.what, lsnString(m.lsn), now.tli, desc, o, other, what)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestPgRecordAtLostMessage: a message the crash lost (not flushed: no
// COMMIT, the WAL writer asleep), its place then written by the next life
// on the same timeline (other transactions; a WAL switch's zeros): other.
func TestPgRecordAtLostMessage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	settings := []string{"wal_writer_delay=10000", "wal_writer_flush_after=0", "autovacuum=off"}
	s := startWALServer(t, []string{"--wal-segsize=1"}, nil, settings...)
	walTable(ctx, t, s.db)
	g := walGeometryOf(ctx, t, s.db)
	for _, over := range []string{"transactions", "a WAL switch"} {
		if _, err := s.db.ExecContext(ctx, "CHECKPOINT"); err != nil {
			t.Fatal(err)
		}
		// The transaction asks its question and never commits: the crash
		// comes first.
		c, err := s.db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var m walMessage
		err = c.Raw(func(dc any) error {
			d := dc.(driver.Conn)
			for _, q := range []string{"BEGIN", "INSERT INTO w VALUES (1, 'lost')"} {
				if _, err := queryRows(ctx, d, q); err != nil {
					return err
				}
			}
			vals, err := queryRow(ctx, d, pgAskXIDProof13AndServer)
			if err != nil {
				return err
			}
			m = walMessage{xid: asInt64(vals[0]), lsn: lsnValue(vals[1]), what: "lost, then " + over}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		s.pgctl(t, "-m", "immediate", "stop")
		c.Close()
		s.db.Close()
		s.start(t, s.data, settings...)
		if replay := s.lsn(ctx, t, "pg_catalog.pg_last_wal_replay_lsn()"); replay >= m.lsn {
			t.Fatalf("the crash kept the message: recovery ended at %s, L %s", lsnString(replay), lsnString(m.lsn))
		}
		if over == "transactions" {
			for i := 0; i < 5; i++ {
				walTx(ctx, t, s.db, g, 0, walWrites(i), "next life")
			}
		} else if _, err := s.db.ExecContext(ctx, "SELECT pg_catalog.pg_switch_wal()"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.db.ExecContext(ctx, "CHECKPOINT"); err != nil {
			t.Fatal(err)
		}
		conn, err := s.db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		err = conn.Raw(func(dc any) error {
			o, other, what := recordAt(ctx, dc.(driver.Conn), []int64{1}, pgMark{tli: 1, lsn: m.lsn}, m.xid)
			t.Logf("%s: L %s: ours %v other %v: %s", m.what, lsnString(m.lsn), o, other, what)
			if o || !other {
				t.Errorf("%s: L %s: ours %v other %v: %s", m.what, lsnString(m.lsn), o, other, what)
			}
			return nil
		})
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
}
