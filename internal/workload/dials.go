package workload

import (
	"context"
	"net"
	"sync"
	"time"
)

// DialLog records dial attempts, what the database sees of a client: put
// its Dial under the driver (pgx's ConnConfig.DialFunc,
// go-sql-driver/mysql's Config.DialFunc).
type DialLog struct {
	mu    sync.Mutex
	times []time.Time
}

// Dial records the attempt and dials.
func (d *DialLog) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.times = append(d.times, time.Now())
	d.mu.Unlock()
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

// Between counts the attempts in [from, to).
func (d *DialLog) Between(from, to time.Time) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, t := range d.times {
		if !t.Before(from) && t.Before(to) {
			n++
		}
	}
	return n
}
