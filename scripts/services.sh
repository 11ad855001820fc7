#!/usr/bin/env bash
# Install (once per machine) and start (whenever down) every service the tests talk to:
# PostgreSQL :5432, MariaDB :3306, Redis :6379, RabbitMQ :5672, NATS JetStream :4222.
#
# Idempotent: on a machine where a service already answers on its port it is left alone
# ("already up"); a missing Debian package is installed with one apt-get call for all of them;
# a service that is down is configured and started, then waited on by its port (never by a
# fixed sleep). One line per service; a service that does not come up fails the script with
# the tail of its own log.
set -uo pipefail

WAIT_S=${ZEROLOSS_SERVICES_WAIT_S:-90}
LOGDIR=${ZEROLOSS_SERVICES_LOGDIR:-/var/log/zeroloss-services}
NATS_STORE=${ZEROLOSS_NATS_STORE:-/var/lib/nats-server}

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port seconds -> 0 once it answers
  local port=$1 deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    up "$port" && return 0
    sleep 0.2
  done
  up "$port"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

# --- install what is missing (Debian packages, one apt-get for all) --------------------------
declare -A PACKAGE_OF=(
  [postgresql]=postgresql [mariadb]=mariadb-server [redis]=redis-server
  [rabbitmq]=rabbitmq-server [nats]=nats-server
)
declare -A PORT_OF=([postgresql]=5432 [mariadb]=3306 [redis]=6379 [rabbitmq]=5672 [nats]=4222)
ORDER=(postgresql mariadb redis rabbitmq nats)
declare -A INSTALLED=()

missing=()
for svc in "${ORDER[@]}"; do
  up "${PORT_OF[$svc]}" && continue  # answering already: whatever runs it is good enough
  dpkg-query -W -f='${Status}' "${PACKAGE_OF[$svc]}" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("${PACKAGE_OF[$svc]}")
done

if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "services: missing ${missing[*]} and no apt-get to install them; install them and re-run" >&2
    exit 1
  fi
  echo "services: installing ${missing[*]} (apt-get, once per machine)"
  # Packages must not start their daemons from postinst (no init system here): we start them.
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  if ((!had_policy)); then printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null; as_root chmod +x "$policy"; fi
  export DEBIAN_FRONTEND=noninteractive
  aptlog=$(mktemp)
  if ! { as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$aptlog" 2>&1; then
    ((had_policy)) || as_root rm -f "$policy"
    echo "services: apt-get failed installing ${missing[*]}:" >&2
    tail -n 30 "$aptlog" >&2
    exit 1
  fi
  ((had_policy)) || as_root rm -f "$policy"
  rm -f "$aptlog"
  for svc in "${ORDER[@]}"; do
    for p in "${missing[@]}"; do [ "$p" = "${PACKAGE_OF[$svc]}" ] && INSTALLED[$svc]=1; done
  done
fi

as_root mkdir -p "$LOGDIR"

# --- one start function per service: configure what the tests assume, start, name its log ---
declare -A LOG_OF

start_postgresql() {
  local ver conf
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$ver" ]; then
    as_root pg_createcluster --start-conf=manual "$(ls /usr/lib/postgresql | sort -V | tail -n 1)" main >/dev/null
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  fi
  conf=/etc/postgresql/$ver/main
  LOG_OF[postgresql]=/var/log/postgresql/postgresql-$ver-main.log
  # Trust on loopback TCP (the tests connect as postgres@127.0.0.1 without a password).
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start >/dev/null 2>&1 \
    || as_root pg_ctlcluster "$ver" main start
}

configure_postgresql() {  # after the port answers: the databases the tests use
  local db
  for db in test postgres; do
    psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
      || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db" >/dev/null
  done
}

start_mariadb() {
  LOG_OF[mariadb]=$LOGDIR/mariadb.log
  as_root install -d -o mysql -g mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    as_root mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGDIR/mariadb-install.log" 2>&1
  fi
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- \
    --user=mysql --bind-address=127.0.0.1 --port=3306 --log-error="$LOGDIR/mariadb.log"
}

configure_mariadb() {  # root with an empty password over TCP, and the test database
  local sock=/run/mysqld/mysqld.sock i
  for i in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
  if mariadb -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS test' 2>/dev/null; then return 0; fi
  # Debian's root authenticates by unix socket only: add an empty password for TCP clients.
  as_root mariadb --protocol=socket -u root <<'SQL'
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
FLUSH PRIVILEGES;
SQL
}

start_redis() {
  LOG_OF[redis]=$LOGDIR/redis.log
  as_root mkdir -p /var/lib/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile "$LOGDIR/redis.log"
}

start_rabbitmq() {
  LOG_OF[rabbitmq]=$LOGDIR/rabbitmq.log
  # Debian's wrapper drops to the rabbitmq user; its own logs go to /var/log/rabbitmq.
  as_root env RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    rabbitmq-server -detached >"$LOGDIR/rabbitmq.log" 2>&1
}

log_tail_rabbitmq() { tail -n 30 /var/log/rabbitmq/*.log 2>/dev/null; }

start_nats() {
  LOG_OF[nats]=$LOGDIR/nats.log
  as_root mkdir -p "$NATS_STORE"
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd "$NATS_STORE" -l "$LOGDIR/nats.log"
}

# --- start what is down, all at once (RabbitMQ alone takes ~10 s), then wait on each port ----
declare -A STARTED=()
for svc in "${ORDER[@]}"; do
  up "${PORT_OF[$svc]}" && continue
  "start_$svc" >>"$LOGDIR/$svc-start.log" 2>&1 || echo "services: starting $svc returned $? (see below)" >&2
  STARTED[$svc]=1
done

failed=0
for svc in "${ORDER[@]}"; do
  port=${PORT_OF[$svc]}
  if [ -z "${STARTED[$svc]:-}" ]; then
    [ "$svc" = postgresql ] && configure_postgresql 2>/dev/null  # databases may be missing
    echo "services: $svc already up on :$port"
    continue
  fi
  if wait_port "$port" "$WAIT_S"; then
    if declare -F "configure_$svc" >/dev/null && ! "configure_$svc" >>"$LOGDIR/$svc-start.log" 2>&1; then
      echo "services: $svc started on :$port but configuring it failed:" >&2
      tail -n 20 "$LOGDIR/$svc-start.log" >&2
      failed=1
      continue
    fi
    how=started; [ -n "${INSTALLED[$svc]:-}" ] && how="installed and started"
    echo "services: $svc $how on :$port"
  else
    echo "services: $svc did not answer on :$port within ${WAIT_S}s; its log:" >&2
    tail -n 20 "$LOGDIR/$svc-start.log" >&2 2>/dev/null
    if declare -F "log_tail_$svc" >/dev/null; then "log_tail_$svc" >&2; else tail -n 30 "${LOG_OF[$svc]:-/dev/null}" >&2; fi
    failed=1
  fi
done
exit $failed
