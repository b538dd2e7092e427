package dbserver

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// CrashPrimary stops the pair's primary at once (pg_ctl -m immediate), like
// a crash of its postmaster.
func (p *PostgresSyncPair) CrashPrimary() error {
	return p.pgctl(p.primary, "-m", "immediate", "stop")
}

// RestartPrimaryAsStandby starts the crashed primary again in standby mode
// (standby.signal, no upstream): it comes back read-only, as a cluster
// manager (Patroni) restarts a failed leader before it decides who leads.
func (p *PostgresSyncPair) RestartPrimaryAsStandby() error {
	signal := filepath.Join(p.primary, "standby.signal")
	if err := os.WriteFile(signal, nil, 0o600); err != nil {
		return err
	}
	if os.Geteuid() == 0 {
		if out, err := exec.Command("chown", "postgres:postgres", signal).CombinedOutput(); err != nil {
			return fmt.Errorf("chown: %v: %s", err, out)
		}
	}
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50 -c wal_level=replica -c max_wal_senders=5 -c hot_standby=on",
		portOf(p.Primary.DSN), p.dir)
	return p.pgctl(p.primary, "-w", "-l", filepath.Join(p.dir, "primary.log"), "-o", opts, "start")
}

// PromoteStandby promotes the standby and waits until it takes writes.
func (p *PostgresSyncPair) PromoteStandby() error {
	return p.pgctl(p.standby, "-w", "promote")
}

// PromotePrimary promotes the pair's primary after RestartPrimaryAsStandby
// (what Patroni does with a crashed leader that kept its lock: a new
// timeline) and waits until it takes writes.
func (p *PostgresSyncPair) PromotePrimary() error {
	return p.pgctl(p.primary, "-w", "promote")
}
