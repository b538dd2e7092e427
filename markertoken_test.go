package sqlretry

import (
	"bytes"
	"encoding/hex"
	"strings"
	"testing"
	"time"
)

// Marker tokens carry their time, so that the clean-up does not rely on
// created_at alone, which a closure can move (attack17).
func TestMarkerTokenCarriesItsTime(t *testing.T) {
	now := time.Date(2026, 12, 1, 1, 30, 0, 0, time.UTC)
	a, b := markerToken(now), markerToken(now)
	if len(a) != 16 || a[6] != markerTokenTimed {
		t.Fatalf("token %x: want 16 bytes, the 7th %#x", a, markerTokenTimed)
	}
	if bytes.Equal(a, b) {
		t.Fatal("two tokens of one millisecond are equal")
	}
	if !bytes.Equal(a[:6], b[:6]) {
		t.Fatalf("the time prefixes differ: %x %x", a[:6], b[:6])
	}
	q := markerCleanQuery("m", now)
	i := strings.Index(q, "token < X'")
	if i < 0 {
		t.Fatalf("no token bound in %q", q)
	}
	cut, err := hex.DecodeString(q[i+len("token < X'") : i+len("token < X'")+12])
	if err != nil {
		t.Fatal(err)
	}
	if older := markerToken(now.Add(-time.Hour - time.Millisecond)); bytes.Compare(older, cut) >= 0 {
		t.Errorf("a token over an hour old (%x) is not under the cut %x", older, cut)
	}
	if newer := markerToken(now.Add(-time.Hour + time.Millisecond)); bytes.Compare(newer, cut) < 0 {
		t.Errorf("a token under an hour old (%x) is under the cut %x", newer, cut)
	}
	if !strings.Contains(q, "created_at < NOW(6) - INTERVAL 1 HOUR AND") || !strings.Contains(q, "NOT ("+markerSentinels+")") {
		t.Errorf("the clean-up lost a condition: %q", q)
	}
}
