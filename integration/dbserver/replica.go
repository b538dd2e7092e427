package dbserver

import (
	"context"
	"database/sql"
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

// MariaDBSemiSyncPair is a MariaDB primary with semi-synchronous replication
// on (rpl_semi_sync_master_enabled, a 60 s rpl_semi_sync_master_timeout,
// the wait point left at its default) and one semi-synchronous replica, both
// from the local binaries. The replica can be frozen (SIGSTOP), so that
// every COMMIT on the primary waits for its ACK until it is thawed.
type MariaDBSemiSyncPair struct {
	Primary    *Server
	ReplicaDSN string // database test
	replica    *Server
	replicaPid func() int
	frozen     bool
}

// StartMariaDBSemiSyncPair starts the pair; Stop removes both.
func StartMariaDBSemiSyncPair() (*MariaDBSemiSyncPair, error) {
	p := &MariaDBSemiSyncPair{}
	var err error
	// Semi-sync is turned on once the replica is there: until then every
	// COMMIT would wait for an ACK.
	p.Primary, _, err = startMariaDBWith("--log-bin=bin", "--server-id=1", "--binlog-format=ROW")
	if err != nil {
		return nil, err
	}
	p.replica, p.replicaPid, err = startMariaDBWith("--server-id=2", "--rpl-semi-sync-slave-enabled=ON", "--skip-slave-start", "--read-only=ON")
	if err != nil {
		p.Primary.Stop()
		return nil, err
	}
	p.ReplicaDSN = p.replica.DSN
	ok := false
	defer func() {
		if !ok {
			p.Stop()
		}
	}()
	replica, err := sql.Open("mysql", p.replica.DSN)
	if err != nil {
		return nil, err
	}
	defer replica.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second) // generous: a loaded machine
	defer cancel()
	if _, err := replica.ExecContext(ctx, fmt.Sprintf("CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%d, MASTER_USER='root', MASTER_USE_GTID=slave_pos", mariaDBPort(p.Primary.DSN))); err != nil {
		return nil, fmt.Errorf("CHANGE MASTER: %v", err)
	}
	if _, err := replica.ExecContext(ctx, "START SLAVE"); err != nil {
		return nil, fmt.Errorf("START SLAVE: %v", err)
	}
	primary, err := sql.Open("mysql", p.Primary.DSN)
	if err != nil {
		return nil, err
	}
	defer primary.Close()
	for _, q := range []string{"SET GLOBAL rpl_semi_sync_master_timeout = 60000", "SET GLOBAL rpl_semi_sync_master_enabled = ON"} {
		if _, err := primary.ExecContext(ctx, q); err != nil {
			return nil, fmt.Errorf("%s: %v", q, err)
		}
	}
	// The replica registers as semi-synchronous when its IO thread connects.
	for _, q := range []string{"STOP SLAVE IO_THREAD", "START SLAVE IO_THREAD"} {
		if _, err := replica.ExecContext(ctx, q); err != nil {
			return nil, fmt.Errorf("%s: %v", q, err)
		}
	}
	for {
		var name, clients string
		err := primary.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_clients'").Scan(&name, &clients)
		if err == nil && clients == "1" {
			break
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("the replica did not become semi-synchronous (clients %q, %v)", clients, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ok = true
	return p, nil
}

func mariaDBPort(dsn string) int {
	i := strings.Index(dsn, "tcp(127.0.0.1:")
	if i < 0 {
		return 0
	}
	rest := dsn[i+len("tcp(127.0.0.1:"):]
	n, _ := strconv.Atoi(rest[:strings.Index(rest, ")")])
	return n
}

// FreezeReplica stops (SIGSTOP) the replica's server: the primary's COMMITs
// then wait for a semi-sync ACK.
func (p *MariaDBSemiSyncPair) FreezeReplica() error {
	if p.frozen {
		return nil
	}
	pid := p.replicaPid()
	if pid <= 0 {
		return errors.New("the replica is not running")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return err
	}
	p.frozen = true
	return nil
}

// ThawReplica lets the replica run again.
func (p *MariaDBSemiSyncPair) ThawReplica() error {
	if !p.frozen {
		return nil
	}
	p.frozen = false
	return syscall.Kill(p.replicaPid(), syscall.SIGCONT)
}

// Stop thaws, stops and removes both servers. It is safe to call twice.
func (p *MariaDBSemiSyncPair) Stop() {
	p.ThawReplica()
	if p.replica != nil {
		p.replica.Stop()
	}
	if p.Primary != nil {
		p.Primary.Stop()
	}
}

// startMariaDBWith is startMariaDB with binary logging left to extra (the
// default one skips it), and the server's pid.
func startMariaDBWith(extra ...string) (*Server, func() int, error) {
	mariadbd, err := exec.LookPath("mariadbd")
	if err != nil {
		if mariadbd, err = exec.LookPath("/usr/sbin/mariadbd"); err != nil {
			return nil, nil, errors.New("no mariadbd binary found")
		}
	}
	dir, err := tempDirFor("mysql")
	if err != nil {
		return nil, nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	data := filepath.Join(dir, "data")
	install := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+data, "--auth-root-authentication-method=normal", "--skip-test-db")
	if os.Geteuid() == 0 {
		install.Args = append(install.Args, "--user=mysql")
	}
	if out, err := install.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, nil, fmt.Errorf("mariadb-install-db: %v: %s", err, out)
	}
	args := []string{"--no-defaults", "--datadir=" + data, fmt.Sprintf("--port=%d", port), "--bind-address=127.0.0.1",
		"--socket=" + filepath.Join(dir, "sock"), "--pid-file=" + filepath.Join(dir, "pid"), "--log-error=" + filepath.Join(dir, "err.log"),
		"--innodb-flush-log-at-trx-commit=2", "--innodb-buffer-pool-size=64M", "--max-connections=100"}
	args = append(args, extra...)
	if os.Geteuid() == 0 {
		args = append(args, "--user=mysql")
	}
	cmd := exec.Command(mariadbd, args...)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	stop := func() {
		cmd.Process.Signal(syscall.SIGCONT)
		cmd.Process.Kill()
		cmd.Wait()
		os.RemoveAll(dir)
	}
	root := fmt.Sprintf("root@tcp(127.0.0.1:%d)/", port)
	if err := waitMariaDB(root, 30*time.Second); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "err.log"))
		stop()
		return nil, nil, fmt.Errorf("mariadbd did not answer: %v\n%s", err, log)
	}
	return &Server{Kind: MariaDB, DSN: root + "test", Source: "local binaries", stop: stop}, func() int { return cmd.Process.Pid }, nil
}
