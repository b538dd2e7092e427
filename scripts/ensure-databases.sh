#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, trust auth, database test) and
# MariaDB (127.0.0.1:3306, root with an empty password, database test) are
# up: starts them, and installs them from Debian's packages when absent.
# Installs PgBouncer, Patroni, etcd and Galera for the cluster test beds. Idempotent; needs
# root for a first install.
set -euo pipefail

log() { echo "ensure-databases: $*"; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then apt-get update -q >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
wait_for() { # command, what
  for _ in $(seq 1 60); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "$2 did not come up"; return 1
}

# --- PostgreSQL
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing postgresql"
    apt_install postgresql postgresql-client
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    sed -i '1i local all all trust' "$hba"
  fi
  log "starting postgresql $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_for "pg_isready -q -h 127.0.0.1 -p 5432" postgresql
fi
for db in test root; do
  psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE $db" >/dev/null
done

# --- MariaDB
if ! mariadb-admin -h 127.0.0.1 -uroot ping >/dev/null 2>&1; then
  if ! command -v mariadbd >/dev/null 2>&1; then
    log "installing mariadb-server"
    apt_install mariadb-server mariadb-client
  fi
  log "starting mariadb"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_for "mariadb-admin ping" mariadb
  # A fresh Debian install lets root in through the unix socket only.
  mariadb -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
    CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
    GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;" || true
  wait_for "mariadb-admin -h 127.0.0.1 -uroot ping" "mariadb on 127.0.0.1"
fi
mariadb -h 127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS test"
# --- Cluster test beds: only the binaries; the tests start their own
# PgBouncer, Patroni cluster (etcd + PostgreSQL nodes) and Galera cluster on
# free loopback ports in temp directories.
need=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
command -v patroni >/dev/null 2>&1 || need+=(patroni python3-psycopg2)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
[ -e /usr/lib/galera/libgalera_smm.so ] || need+=(galera-4)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt_install "${need[@]}"
fi
# A package's own etcd service is not ours: the tests start private ones.
log "postgresql and mariadb are up; pgbouncer, patroni, etcd and galera are installed"
