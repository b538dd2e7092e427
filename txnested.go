package sqlretry

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// A RunInTx nested in another's closure with a context of its own (a
// helper that writes an audit row with context.Background(), say) cannot
// be seen through the context, yet once it has committed, replaying the
// outer closure would run it again. It is seen by the stack instead: the
// outer attempt's runTxOnce is below it (nestedInAttempt). Such a commit
// is recorded by goroutine, with a sequence number; an attempt that ran
// on that goroutine after the number it read at its start is not
// replayed. Only a nested RunInTx on the closure's own goroutine is seen:
// one the closure starts on another goroutine and waits for is not (the
// README says so).
var (
	closuresRunning atomic.Int64  // attempts whose closure is running now, anywhere
	nestedSeq       atomic.Uint64 // the last nested commit's number
	nestedCommitted sync.Map      // goroutine id → nestedSeq of its last nested commit
)

// noteCommit is called when a RunInTx that found no outer attempt in its
// context has committed: if it ran inside another attempt's closure, that
// attempt must not be replayed. The stack walk is taken only while some
// closure runs.
func noteCommit() {
	if closuresRunning.Load() > 0 && nestedInAttempt() {
		nestedCommitted.Store(goid(), nestedSeq.Add(1))
	}
}

// nestedCommitSince says whether a RunInTx nested with a context of its
// own committed on this goroutine after seq was read.
func nestedCommitSince(seq uint64) bool {
	if nestedSeq.Load() == seq {
		return false
	}
	v, ok := nestedCommitted.Load(goid())
	return ok && v.(uint64) > seq
}

// forgetNestedCommits drops this goroutine's record once the outermost
// RunInTx on it returns (one not itself inside an attempt), so that the
// map does not grow with the goroutines that ever nested.
func forgetNestedCommits(seq uint64) {
	if nestedSeq.Load() == seq || closuresRunning.Load() > 0 && nestedInAttempt() {
		return
	}
	nestedCommitted.Delete(goid())
}

// goid is the calling goroutine's id, from the first line of its trace
// ("goroutine 123 [running]:"). About a microsecond: taken only where a
// nested commit happened.
func goid() uint64 {
	var buf [32]byte
	n := runtime.Stack(buf[:], false)
	var id uint64
	for _, c := range buf[len("goroutine "):n] {
		if c < '0' || c > '9' {
			break
		}
		id = id*10 + uint64(c-'0')
	}
	return id
}
