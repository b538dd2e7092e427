package dbserver

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// PgBouncer is a PgBouncer in transaction mode in front of one PostgreSQL
// server, from Debian's pgbouncer package, on a loopback port of its own,
// run as the postgres system user when we are root (it refuses to run as
// root). Clients log in as postgres without a password (auth_type trust)
// to the database postgres.
type PgBouncer struct {
	DSN  string // pgx URL through the pooler, database postgres
	Port int
	bin  string
	dir  string
	conf string
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// PgBouncerBinary is the pgbouncer executable, or "" when none is installed.
func PgBouncerBinary() string {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/pgbouncer"); err == nil {
		return "/usr/sbin/pgbouncer"
	}
	return ""
}

// StartPgBouncer starts a pooler in front of the PostgreSQL server at
// 127.0.0.1:pgPort; Stop ends it and removes its files.
func StartPgBouncer(pgPort int) (*PgBouncer, error) {
	bin := PgBouncerBinary()
	if bin == "" {
		return nil, errors.New("no pgbouncer binary found (Debian package pgbouncer)")
	}
	dir, err := tempDirFor("postgres")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	b := &PgBouncer{Port: port, bin: bin, dir: dir, conf: filepath.Join(dir, "pgbouncer.ini"),
		DSN: fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)}
	users := filepath.Join(dir, "userlist.txt")
	ini := fmt.Sprintf(`[databases]
postgres = host=127.0.0.1 port=%d dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = transaction
default_pool_size = 20
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
logfile = %s
pidfile = %s
admin_users = postgres
`, pgPort, port, users, filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"))
	for name, text := range map[string]string{b.conf: ini, users: `"postgres" ""` + "\n"} {
		if err := os.WriteFile(name, []byte(text), 0o644); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	if err := b.Start(); err != nil {
		b.Stop()
		return nil, err
	}
	return b, nil
}

// Start starts the pooler (again, after Kill) on its port and waits until
// it accepts connections.
func (b *PgBouncer) Start() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd != nil {
		return errors.New("dbserver: pgbouncer is running")
	}
	os.Remove(filepath.Join(b.dir, "pgbouncer.pid")) // left by a kill
	cmd := exec.Command(b.bin, b.conf)
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return err
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	b.cmd, b.done = cmd, done
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", b.Port), time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-done:
			b.cmd = nil
			return fmt.Errorf("pgbouncer exited at start:\n%s", b.Log())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pgbouncer did not listen on %d: %v\n%s", b.Port, err, b.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Kill kills the pooler (SIGKILL) and waits until it is gone: its clients'
// and its server connections are cut.
func (b *PgBouncer) Kill() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return nil
	}
	err := b.cmd.Process.Kill()
	<-b.done
	b.cmd = nil
	return err
}

// Log is the pooler's log so far.
func (b *PgBouncer) Log() string {
	out, _ := os.ReadFile(filepath.Join(b.dir, "pgbouncer.log"))
	return string(out)
}

// Stop kills the pooler and removes its files. It is safe to call twice.
func (b *PgBouncer) Stop() {
	b.Kill()
	if b.dir != "" {
		os.RemoveAll(b.dir)
		b.dir = ""
	}
}
