package workload

import (
	"errors"
	"testing"
)

// TestSummarizeKeepsTheCause: the demo's and the chaos benchmark's error
// tables show the whole cause, and the same cause on different ports is
// one row (issue 12: "dial tcp 127.0.0.1" was all that was left).
func TestSummarizeKeepsTheCause(t *testing.T) {
	a := errors.New("failed to connect to `user=postgres database=postgres`: 127.0.0.1:40001 (127.0.0.1): dial error: dial tcp 127.0.0.1:40001: connect: connection refused")
	b := errors.New("failed to connect to `user=postgres database=postgres`: 127.0.0.1:40002 (127.0.0.1): dial error: dial tcp 127.0.0.1:40002: connect: connection refused")
	want := "failed to connect to `user=postgres database=postgres`: 127.0.0.1:<port> (127.0.0.1): dial error: dial tcp 127.0.0.1:<port>: connect: connection refused"
	if got := Summarize(a); got != want {
		t.Errorf("Summarize = %q, want %q", got, want)
	}
	if Summarize(a) != Summarize(b) {
		t.Error("the same cause on two ports is two rows")
	}
}
