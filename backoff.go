package sqlretry

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// Clock is where sqlretry reads the time and sleeps. Tests replace it so
// that backoff, breaker and budget run without sleeping.
type Clock interface {
	Now() time.Time
	// Sleep waits for d or until ctx is done, and then returns ctx.Err().
	Sleep(ctx context.Context, d time.Duration) error
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Jitter chooses how a backoff delay is randomised.
type Jitter uint8

const (
	// FullJitter sleeps a uniform random time in [0, min(Max, Initial*Multiplier^n)].
	FullJitter Jitter = iota
	// DecorrelatedJitter sleeps a uniform random time in [Initial, 3*previous], capped at Max.
	DecorrelatedJitter
	// NoJitter sleeps exactly min(Max, Initial*Multiplier^n); for tests and demos.
	NoJitter
)

// Backoff is the retry pacing. The zero value of a field means its default.
// Durations are at most 24h and Multiplier is a finite number: other
// values are errors from Open, OpenDB, Wrap and WithBackoff.
type Backoff struct {
	Initial     time.Duration // first delay; default 5ms
	Max         time.Duration // largest single delay; default 1s
	Multiplier  float64       // growth per attempt; default 2
	Jitter      Jitter        // default FullJitter
	MaxAttempts int           // attempts in all, the first included; default 30
	MaxElapsed  time.Duration // stop retrying after this long since the first attempt; default 30s
}

// DefaultBackoff is what Open uses when no WithBackoff option is given.
var DefaultBackoff = Backoff{
	Initial:     5 * time.Millisecond,
	Max:         time.Second,
	Multiplier:  2,
	Jitter:      FullJitter,
	MaxAttempts: 30,
	MaxElapsed:  30 * time.Second,
}

func (b Backoff) withDefaults() Backoff {
	if b.Initial == 0 {
		b.Initial = DefaultBackoff.Initial
	}
	if b.Max == 0 {
		b.Max = DefaultBackoff.Max
	}
	if b.Multiplier == 0 {
		b.Multiplier = DefaultBackoff.Multiplier
	}
	if b.MaxAttempts == 0 {
		b.MaxAttempts = DefaultBackoff.MaxAttempts
	}
	if b.MaxElapsed == 0 {
		b.MaxElapsed = DefaultBackoff.MaxElapsed
	}
	return b
}

func (b Backoff) validate() error {
	switch {
	case b.Initial < 0, b.Max < 0, b.MaxElapsed < 0:
		return errors.New("durations must not be negative")
	case b.Initial > maxOptionDuration, b.Max > maxOptionDuration, b.MaxElapsed > maxOptionDuration:
		return errDurationTooLong
	case !finite(b.Multiplier):
		return errors.New("the field Multiplier must be a finite number")
	case b.Multiplier != 0 && b.Multiplier < 1:
		return errors.New("the field Multiplier must be at least 1")
	case b.MaxAttempts < 0:
		return errors.New("the field MaxAttempts must not be negative")
	case b.Jitter > NoJitter:
		return errors.New("unknown Jitter")
	case b.Max != 0 && b.Initial > b.Max:
		return errors.New("the field Initial must not exceed Max")
	}
	return nil
}

// delay returns the pause before attempt+1, given the previous pause.
func (b Backoff) delay(attempt int, prev time.Duration, rnd func() float64) time.Duration {
	ceiling := float64(b.Initial)
	for i := 1; i < attempt && ceiling < float64(b.Max); i++ {
		ceiling *= b.Multiplier
	}
	ceiling = min(ceiling, float64(b.Max))
	switch b.Jitter {
	case NoJitter:
		return time.Duration(ceiling)
	case DecorrelatedJitter:
		lo, hi := float64(b.Initial), float64(max(prev, b.Initial))*3
		return time.Duration(min(lo+rnd()*(hi-lo), float64(b.Max)))
	}
	return time.Duration(rnd() * ceiling)
}

// stopReason says why pacing ended, for the observer.
const (
	stopMaxAttempts = "max attempts reached"
	stopMaxElapsed  = "max elapsed time reached"
	stopDeadline    = "next attempt would end after the caller's deadline"
)

// pacer walks one call through its retries.
type pacer struct {
	b     Backoff
	clock Clock
	rnd   func() float64
	start time.Time
	prev  time.Duration
}

func newPacer(b Backoff, clock Clock, rnd func() float64) pacer {
	return pacer{b: b, clock: clock, rnd: rnd, start: clock.Now()}
}

// next returns the delay before the next attempt after attempt failed, or
// a reason to stop: the attempts are used up, the elapsed time is spent, or
// the delay would end after the caller's deadline (never sleep past it).
func (p *pacer) next(ctx context.Context, attempt int) (time.Duration, string) {
	if attempt >= p.b.MaxAttempts {
		return 0, stopMaxAttempts
	}
	d := p.b.delay(attempt, p.prev, p.rnd)
	now := p.clock.Now()
	if now.Add(d).Sub(p.start) > p.b.MaxElapsed {
		return 0, stopMaxElapsed
	}
	if dl, ok := ctx.Deadline(); ok && !now.Add(d).Before(dl) {
		return 0, stopDeadline
	}
	p.prev = d
	return d, ""
}

func defaultRand() float64 { return rand.Float64() }
