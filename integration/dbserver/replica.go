package dbserver

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// PostgresSyncPair is a PostgreSQL primary with one synchronous streaming
// standby (application_name s1, synchronous_standby_names 'FIRST 1 (s1)'),
// both from the local binaries, on loopback ports of their own. The
// standby's WAL receiver can be frozen, so that every COMMIT on the primary
// waits in SyncRep until it is thawed.
type PostgresSyncPair struct {
	Primary    *Server
	StandbyDSN string // hot standby, read-only
	bin        string
	dir        string
	primary    string // data directories
	standby    string
	frozen     int // pid of the stopped WAL receiver, or 0
}

// StartPostgresSyncPair starts the pair; Stop removes both.
func StartPostgresSyncPair() (*PostgresSyncPair, error) {
	bin := pgBinDir()
	if bin == "" {
		return nil, errors.New("no PostgreSQL server binaries (initdb) found")
	}
	dir, err := tempDirFor("postgres")
	if err != nil {
		return nil, err
	}
	p := &PostgresSyncPair{bin: bin, dir: dir, primary: filepath.Join(dir, "primary"), standby: filepath.Join(dir, "standby")}
	ok := false
	defer func() {
		if !ok {
			p.Stop()
		}
	}()
	pport, err := freePort()
	if err != nil {
		return nil, err
	}
	sport, err := freePort()
	if err != nil {
		return nil, err
	}
	if out, err := asUser("postgres", filepath.Join(bin, "initdb"), "-D", p.primary, "-A", "trust", "-U", "postgres", "--no-sync").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	common := fmt.Sprintf("-k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50 -c wal_level=replica -c max_wal_senders=5 -c hot_standby=on", dir)
	if err := p.pgctl(p.primary, "-w", "-l", filepath.Join(dir, "primary.log"), "-o", fmt.Sprintf("-p %d %s", pport, common), "start"); err != nil {
		return nil, err
	}
	p.Primary = &Server{Kind: Postgres, Source: "local binaries",
		DSN: fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", pport)}
	conn := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres application_name=s1", pport)
	if out, err := asUser("postgres", filepath.Join(bin, "pg_basebackup"), "-D", p.standby, "-R", "-X", "stream", "--no-sync", "-d", conn).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("pg_basebackup: %v: %s", err, out)
	}
	// -R writes primary_conninfo; name the standby explicitly all the same.
	auto := filepath.Join(p.standby, "postgresql.auto.conf")
	f, err := os.OpenFile(auto, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	_, err = fmt.Fprintf(f, "primary_conninfo = '%s'\n", conn)
	f.Close()
	if err != nil {
		return nil, err
	}
	if err := p.pgctl(p.standby, "-w", "-l", filepath.Join(dir, "standby.log"), "-o", fmt.Sprintf("-p %d %s", sport, common), "start"); err != nil {
		return nil, err
	}
	p.StandbyDSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", sport)
	if err := p.psql(pport, "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (s1)'"); err != nil {
		return nil, err
	}
	if err := p.psql(pport, "SELECT pg_reload_conf()"); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := p.psqlOut(pport, "SELECT count(*) FROM pg_stat_replication WHERE application_name = 's1' AND state = 'streaming' AND sync_state = 'sync'")
		if err == nil && out == "1" {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "standby.log"))
			return nil, fmt.Errorf("the standby did not become synchronous (%q, %v)\n%s", out, err, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.Primary.stop = p.Stop
	ok = true
	return p, nil
}

func (p *PostgresSyncPair) pgctl(data string, args ...string) error {
	out, err := asUser("postgres", filepath.Join(p.bin, "pg_ctl"), append([]string{"-D", data}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl %v: %v: %s", args, err, out)
	}
	return nil
}

func (p *PostgresSyncPair) psqlOut(port int, sql string) (string, error) {
	out, err := exec.Command(filepath.Join(p.bin, "psql"), "-X", "-q", "-t", "-A", "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-U", "postgres", "-d", "postgres", "-c", sql).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("psql %q: %v: %s", sql, err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

func (p *PostgresSyncPair) psql(port int, sql string) error {
	_, err := p.psqlOut(port, sql)
	return err
}

func portOf(dsn string) int {
	i := strings.LastIndex(dsn, ":")
	j := strings.Index(dsn[i:], "/")
	n, _ := strconv.Atoi(dsn[i+1 : i+j])
	return n
}

// FreezeStandby stops (SIGSTOP) the standby's WAL receiver: the primary's
// synchronous COMMITs then wait in SyncRep.
func (p *PostgresSyncPair) FreezeStandby() error {
	if p.frozen != 0 {
		return nil
	}
	out, err := p.psqlOut(portOf(p.StandbyDSN), "SELECT pid FROM pg_stat_wal_receiver")
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(out)
	if err != nil || pid <= 0 {
		return fmt.Errorf("no WAL receiver on the standby (%q)", out)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return err
	}
	p.frozen = pid
	return nil
}

// ThawStandby lets the WAL receiver run again.
func (p *PostgresSyncPair) ThawStandby() error {
	if p.frozen == 0 {
		return nil
	}
	err := syscall.Kill(p.frozen, syscall.SIGCONT)
	p.frozen = 0
	return err
}

// Stop thaws, stops and removes both servers. It is safe to call twice.
func (p *PostgresSyncPair) Stop() {
	if p.dir == "" {
		return
	}
	p.ThawStandby()
	for _, d := range []string{p.standby, p.primary} {
		if _, err := os.Stat(filepath.Join(d, "postmaster.pid")); err == nil {
			p.pgctl(d, "-m", "immediate", "stop")
		}
	}
	os.RemoveAll(p.dir)
	p.dir = ""
}

// PrimaryLog is the primary's server log so far.
func (p *PostgresSyncPair) PrimaryLog() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "primary.log"))
	return string(b)
}
