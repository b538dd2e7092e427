package sqlretry

import "time"

// electionReprobeShare is the share of the breaker's OpenTimeout after
// which an open breaker probes again when the last dial failed only
// because no host was of the kind the DSN asks for yet (a standby answered
// "read only connection" while a read-write host is wanted): 1/8, so with
// the default OpenTimeout of 1 s a probe every 125-150 ms. The hosts are up
// and answering, so probing them eight times a second costs little, and
// write service comes back within that of a promotion instead of within a
// whole OpenTimeout (the first probe) or ProbeInterval (200 ms by default,
// after a failed probe; it only ever brings a probe forward). Callers still
// wait for the single probe (no dial storm, no retry budget spent while
// they wait).
const electionReprobeShare = 8

// reprobeSoon brings an open breaker's next probe forward to within
// OpenTimeout/electionReprobeShare (jittered like the open time).
func (b *breaker) reprobeSoon() {
	if b == nil {
		return
	}
	s := b.settings.Load()
	b.mu.Lock()
	defer b.mu.Unlock()
	if BreakerState(b.state.Load()) != BreakerOpen {
		return
	}
	d := float64(s.OpenTimeout) / electionReprobeShare * (1 + s.OpenJitter*b.rnd())
	if until := b.clock.Now().Add(time.Duration(d)).UnixNano(); until < b.openUntil.Load() {
		b.openUntil.Store(until)
	}
}
