package sqlretry

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// A RunInTx nested in another's closure with a context of its own (a
// helper that writes an audit row with context.Background(), say) cannot
// be seen through the context, yet once it has committed, replaying the
// outer closure would run it again. It is seen by its goroutine instead:
// the outer attempt marked it while its closure runs (inClosure). Such a commit
// is recorded by goroutine, with a sequence number; an attempt that ran
// on that goroutine after the number it read at its start is not
// replayed. Only a nested RunInTx on the closure's own goroutine is seen:
// one the closure starts on another goroutine and waits for is not (the
// README says so).
var (
	nestedSeq       atomic.Uint64 // the last nested commit's number
	nestedCommitted sync.Map      // goroutine id → nestedSeq of its last nested commit
)

// Which goroutines run an attempt's closure now. Asking the stack at every
// top-level commit while any closure ran anywhere cost tens of thousands
// of instructions per commit under concurrency (issue 13 goal 3), so each
// attempt marks its goroutine (curG) in a slot of closureSlots while its
// closure runs: a goroutine that finds its own mark is inside a closure;
// one that does not, while closureOverflow is 0, is not. An attempt that
// finds no free slot near its own (a collision, a closure nested in
// another on the same goroutine, no curG on this architecture) counts in
// closureOverflow instead, and while that is above 0 a goroutine without
// its mark asks the stack, as before.
var (
	closureSlots    [closureSlotCount]atomic.Uintptr
	_               [64]byte // keep closureOverflow off the slots' cache lines
	closureOverflow atomic.Int64
)

const (
	closureSlotCount = 1024
	closureProbe     = 4 // slots looked at from the goroutine's own
)

// closureSlot is where g's mark is looked for first.
func closureSlot(g uintptr) uintptr {
	return uintptr(uint64(g>>6) * 0x9E3779B97F4A7C15 >> (64 - 10)) // 10 = log2(closureSlotCount)
}

// closureOverflowG holds, by goroutine, the marks that found no free slot
// near their own (a collision): such a goroutine is asked here, not by
// walking its stack, so that a collision anywhere does not make every
// statement of every goroutine walk its own (a hostile review measured
// 1 to 3 allocations per autocommit INSERT while one closure overflowed).
// Only where curG is not known is the stack asked.
var closureOverflowG struct {
	sync.RWMutex
	marks map[uintptr]int32 // g → closures it runs that found no slot
}

// enterClosure marks the calling goroutine as running an attempt's
// closure; leaveClosure(slot) takes the mark away (also when fn panics).
// slot is -1 when the mark went to closureOverflow (and, with curG known,
// to closureOverflowG).
func enterClosure() int {
	g := curG()
	if g != 0 {
		i := closureSlot(g)
		for k := uintptr(0); k < closureProbe; k++ {
			j := (i + k) % closureSlotCount
			if closureSlots[j].Load() == 0 && closureSlots[j].CompareAndSwap(0, g) {
				return int(j)
			}
		}
		closureOverflowG.Lock()
		if closureOverflowG.marks == nil {
			closureOverflowG.marks = map[uintptr]int32{}
		}
		closureOverflowG.marks[g]++
		closureOverflowG.Unlock()
	}
	closureOverflow.Add(1)
	return -1
}

func leaveClosure(slot int) {
	if slot >= 0 {
		closureSlots[slot].Store(0)
		return
	}
	if g := curG(); g != 0 {
		closureOverflowG.Lock()
		if closureOverflowG.marks[g]--; closureOverflowG.marks[g] <= 0 {
			delete(closureOverflowG.marks, g)
		}
		closureOverflowG.Unlock()
	}
	closureOverflow.Add(-1)
}

// inClosure says whether the calling goroutine runs inside an attempt's
// closure.
func inClosure() bool {
	g := curG()
	if g != 0 {
		i := closureSlot(g)
		for k := uintptr(0); k < closureProbe; k++ {
			if closureSlots[(i+k)%closureSlotCount].Load() == g {
				return true
			}
		}
	}
	if closureOverflow.Load() == 0 {
		return false
	}
	if g != 0 {
		closureOverflowG.RLock()
		n := closureOverflowG.marks[g]
		closureOverflowG.RUnlock()
		return n > 0
	}
	return nestedInAttempt()
}

// noteCommit is called when a RunInTx that found no outer attempt in its
// context has committed: if it ran inside another attempt's closure, that
// attempt must not be replayed.
func noteCommit() {
	if inClosure() {
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
	if nestedSeq.Load() == seq || inClosure() {
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
