#!/usr/bin/env bash
# A private, throw-away PostgreSQL cluster on this one machine, for hangar's tests.
#
#   scripts/pg/cluster.sh install     # only install the missing Debian packages (root)
#   scripts/pg/cluster.sh start DIR   # install them too, initdb + start it in DIR, wait until ready
#   scripts/pg/cluster.sh stop DIR    # stop exactly the PIDs in DIR/pids
#
# One postgres (the postmaster and its children) with its data in DIR/data, on
# 127.0.0.1 and a unix socket in DIR, trust auth, superuser `postgres`. Nothing of
# the system's PostgreSQL cluster (/etc/postgresql, /var/lib/postgresql, port
# 5432, /run/postgresql) is used or touched. See scripts/pg/README.md.
set -euo pipefail

# --- tunables (environment) --------------------------------------------------
START_TIMEOUT=${HANGAR_PG_START_TIMEOUT:-60} # seconds until pg_isready answers
STOP_TIMEOUT=${HANGAR_PG_STOP_TIMEOUT:-15}   # seconds between INT (fast shutdown) and KILL
PORT_MIN=${HANGAR_PG_PORT_MIN:-10000}        # below Slurm's 20000-32000 and the ephemeral range
PORT_MAX=${HANGAR_PG_PORT_MAX:-19999}
# Global lock held while choosing a port and until postgres has bound it, so two
# clusters started at the same time never pick the same port.
PORT_LOCK=${HANGAR_PG_PORT_LOCK:-/tmp/hangar-pg-ports.lock}
MAX_CONNECTIONS=${HANGAR_PG_MAX_CONNECTIONS:-200}
# The OS user that runs postgres when this script runs as root (postgres refuses
# to run as root).
PG_OS_USER=${HANGAR_PG_OS_USER:-postgres}
SUPERUSER=postgres  # the database superuser's role name, whoever runs the server

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }
now_ms() { date +%s%3N; }

usage() {
  echo "usage: $0 install | start DIR | stop DIR" >&2
  exit 2
}

# wait_until SECONDS WHAT CMD...: poll CMD until it succeeds or the deadline passes.
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$(($(date +%s) + timeout))
  until "$@"; do
    if [[ -n ${WAIT_GUARD:-} ]] && ! "$WAIT_GUARD"; then
      log "gave up waiting for: $what"
      return 1
    fi
    if (($(date +%s) >= deadline)); then
      log "timed out after ${timeout}s waiting for: $what"
      return 1
    fi
    sleep 0.1
  done
}

port_listening() { [[ -n $(ss -Hltn "sport = :$1") ]]; }
port_busy() { [[ -n $(ss -Hatn "sport = :$1") ]]; }

# pid_is_ours PID DIR: PID is a live postgres started for DIR (guards against PID
# reuse after the server died). The postmaster keeps its command line; its
# children rewrite theirs ("postgres: checkpointer"), so only it matches.
pid_is_ours() {
  local pid=$1 dir=$2 comm cmdline
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == postgres ]] || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1  # zombie
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$dir/"* ]]
}

gone() {  # gone PID...: none of the PIDs is alive (a zombie has exited)
  local p
  for p in "$@"; do
    [[ -e /proc/$p ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && return 1
  done
  return 0
}

# The directory of PostgreSQL's server binaries: where initdb is on PATH, or the
# newest /usr/lib/postgresql/N/bin (Debian keeps initdb and postgres off PATH).
pg_bindir() {
  local d
  if d=$(command -v initdb 2>/dev/null); then
    d=$(dirname "$(readlink -f "$d")")
    [[ -x $d/postgres ]] && { echo "$d"; return 0; }
  fi
  d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  [[ -n $d && -x $d/initdb && -x $d/postgres ]] && { echo "$d"; return 0; }
  return 1
}

# --- install -----------------------------------------------------------------

install_missing() {
  local need=() bin
  if bin=$(pg_bindir); then
    [[ -x $bin/psql && -x $bin/pg_isready ]] || need+=(postgresql-client)
  else
    need+=(postgresql postgresql-client)
  fi
  command -v ss >/dev/null || need+=(iproute2)
  command -v setpriv >/dev/null || need+=(util-linux)
  ((${#need[@]} == 0)) && return 0
  log "installing: ${need[*]}"
  [[ $(id -u) == 0 ]] || die "need root to apt-get install ${need[*]}"
  # Installing must not start the system's PostgreSQL service: policy-rc.d exit
  # 101 tells invoke-rc.d not to; only added if there is none already. (Debian's
  # postinst still creates its `main` cluster in /var/lib/postgresql; it stays
  # stopped and unused.)
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  } >&2 || rc=$?
  ((added_policy)) && rm -f "$policy"
  ((rc == 0)) || die "apt-get install ${need[*]} failed (rc=$rc)"
  pg_bindir >/dev/null || die "installed ${need[*]} but found no initdb and postgres"
}

# --- start -------------------------------------------------------------------

# Pick a free port at random in [PORT_MIN, PORT_MAX]; caller holds PORT_LOCK.
pick_port() {
  local p tries=0
  while ((tries++ < 1000)); do
    p=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % (PORT_MAX - PORT_MIN + 1)))
    port_busy "$p" && continue
    PORT=$p
    return 0
  done
  die "could not find a free port in $PORT_MIN-$PORT_MAX"
}

# as_pg_user CMD...: CMD as the user that owns the cluster. As root that is
# PG_OS_USER; setpriv execs CMD in place (no fork), so a PID taken from `$!`
# is the PID of CMD itself.
as_pg_user() {
  if [[ $(id -u) == 0 ]]; then
    setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups -- "$@"
  else
    "$@"
  fi
}

# As root, the user that runs postgres; Debian's package creates `postgres`.
ensure_os_user() {
  getent passwd "$PG_OS_USER" >/dev/null && return 0
  log "creating system user $PG_OS_USER"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$PG_OS_USER" || die "cannot create user $PG_OS_USER"
}

POSTGRES_PID=  # set once this run has started postgres, for cleanup on failure

# Start `postgres -D DIR/data` in its own session, detached from our stdio (so a
# caller reading our output is not held open), and record its PID in DIR/pids.
spawn_postgres() {
  local drop=()
  [[ $(id -u) == 0 ]] && drop=(setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups --)
  # setsid and setpriv exec what follows them, so $! is the postmaster's PID.
  setsid "${drop[@]}" "$PG_BIN/postgres" -D "$DIR/data" </dev/null >>"$DIR/log/postgres.log" 2>&1 &
  POSTGRES_PID=$!
  echo "$POSTGRES_PID postgres" >>"$DIR/pids"
  # Until setsid and setpriv have exec'd postgres, /proc/PID shows the forked shell.
  exec_done() { [[ $(cat "/proc/$POSTGRES_PID/comm" 2>/dev/null) == postgres ]] || gone "$POSTGRES_PID"; }
  WAIT_GUARD='' wait_until 10 "postgres (pid $POSTGRES_PID) to exec" exec_done
}

postgres_alive() {
  if ! pid_is_ours "$POSTGRES_PID" "$DIR"; then
    log "postgres (pid $POSTGRES_PID) exited during start; see $DIR/log/postgres.log"
    return 1
  fi
}

stop_pid() {  # stop_pid PID: fast shutdown (INT), then KILL with its children.
  local pid=$1 kids=()
  pid_is_ours "$pid" "$DIR" || return 0
  kill -INT "$pid" 2>/dev/null || true
  WAIT_GUARD='' wait_until "$STOP_TIMEOUT" "postgres (pid $pid) to exit after INT" gone "$pid" && return 0
  # A killed postmaster leaves its children to notice by themselves; kill them too.
  mapfile -t kids < <(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ')
  log "sending KILL to postgres (pid $pid) and its children ${kids[*]}"
  kill -KILL "$pid" "${kids[@]}" 2>/dev/null || true
  WAIT_GUARD='' wait_until 10 "postgres (pid $pid) to exit after KILL" gone "$pid" "${kids[@]}" ||
    die "postgres (pid $pid) is still alive"
}

on_start_exit() {
  local rc=$?
  ((rc == 0)) && return 0
  log "start failed (rc=$rc); stopping what it started"
  [[ -n $POSTGRES_PID ]] && { stop_pid "$POSTGRES_PID" || true; }
  local f
  for f in "$DIR"/log/*.log; do
    [[ -s $f ]] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 20 "$f" >&2
  done
  exit "$rc"
}

write_configs() {
  local data=$1 port=$2
  # Only local connections, and no password for them: a test cluster on loopback.
  cat >"$data/pg_hba.conf" <<EOF
# Private test cluster written by scripts/pg/cluster.sh; do not edit by hand.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  trust
EOF
  cat >>"$data/postgresql.conf" <<EOF

# --- Private test cluster: written by scripts/pg/cluster.sh ---
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
max_connections = $MAX_CONNECTIONS
# Speed over durability: the cluster is thrown away after the test.
fsync = off
synchronous_commit = off
full_page_writes = off
# Logs go to stderr, which is DIR/log/postgres.log.
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
EOF
}

pg_ready() {  # over TCP, as a test's URL connects, and over the socket
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U "$SUPERUSER" -d postgres -t 2 &&
    "$PG_BIN/pg_isready" -q -h "$DIR" -p "$PORT" -U "$SUPERUSER" -d postgres -t 2
}

cmd_start() {
  local t0
  t0=$(now_ms)
  install_missing
  PG_BIN=$(pg_bindir) || die "no initdb and postgres found"
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd -P)
  [[ $DIR =~ ^[A-Za-z0-9_./+-]+$ ]] || die "DIR must be a plain path (no spaces or special characters): $DIR"
  # The socket is DIR/.s.PGSQL.PORT and a unix socket's path has at most 107 bytes.
  ((${#DIR} <= 80)) || die "DIR is too long for a unix socket path: $DIR"
  [[ ! -e $DIR/pids ]] || die "$DIR/pids exists: a cluster may be running there (run: $0 stop $DIR)"
  [[ ! -e $DIR/data ]] || die "$DIR already holds a cluster; use an empty directory"
  mkdir -p "$DIR/log"
  : >"$DIR/pids"
  if [[ $(id -u) == 0 ]]; then
    ensure_os_user
    chown -R "$PG_OS_USER:" "$DIR"
  fi
  # Clients of other users reach the socket in DIR; mktemp -d (or Rust's tempfile)
  # makes DIR 0700, and a+x lets them pass, not list.
  chmod a+x "$DIR"
  cd "$DIR"  # postgres inherits this cwd: one its user can enter, not the caller's
  trap on_start_exit EXIT

  as_pg_user "$PG_BIN/initdb" -D "$DIR/data" -U "$SUPERUSER" --auth=trust \
    --encoding=UTF8 --locale=C --no-sync --no-instructions >"$DIR/log/initdb.log" 2>&1 ||
    die "initdb failed (see below)"

  # flock needs only a readable fd, so a lock file made by another user will do.
  [[ -e $PORT_LOCK ]] || : >>"$PORT_LOCK"
  exec 9<"$PORT_LOCK"
  WAIT_GUARD='' wait_until 120 "port lock $PORT_LOCK" flock -n 9
  pick_port
  write_configs "$DIR/data" "$PORT"
  # Its own session, detached from our stdio (so a caller reading our output is
  # not held open).
  spawn_postgres
  WAIT_GUARD=postgres_alive
  wait_until 30 "postgres to listen on 127.0.0.1:$PORT" port_listening "$PORT"
  flock -u 9
  exec 9>&-
  wait_until "$START_TIMEOUT" "pg_isready on 127.0.0.1:$PORT and $DIR" pg_ready

  cat >"$DIR/env" <<EOF
export HANGAR_PG_URL=postgres://$SUPERUSER@127.0.0.1:$PORT/postgres
export HANGAR_PG_PORT=$PORT
export HANGAR_PG_HOST=$DIR
export HANGAR_PG_DIR=$DIR
export HANGAR_PG_BIN=$PG_BIN
export PGHOST=$DIR
export PGPORT=$PORT
export PGUSER=$SUPERUSER
EOF
  trap - EXIT
  echo "postgres $("$PG_BIN/postgres" --version | awk '{print $3}') up in $DIR: 127.0.0.1:$PORT" \
    "and $DIR/.s.PGSQL.$PORT, pid $POSTGRES_PID, $(($(now_ms) - t0))ms; use: . $DIR/env"
}

# --- stop --------------------------------------------------------------------

cmd_stop() {
  [[ -d $DIR ]] || die "no such directory: $DIR"
  DIR=$(cd "$DIR" && pwd -P)
  if [[ ! -f $DIR/pids && -f $DIR/pids.stopped ]]; then
    echo "postgres cluster in $DIR already stopped"
    return 0
  fi
  [[ -f $DIR/pids ]] || die "$DIR/pids not found: nothing to stop"
  local pid name count=0
  while read -r pid name; do
    [[ $pid =~ ^[0-9]+$ && $name == postgres ]] || continue
    stop_pid "$pid"
    count=$((count + 1))
  done <"$DIR/pids"
  mv "$DIR/pids" "$DIR/pids.stopped"
  echo "postgres cluster in $DIR stopped ($count server)"
}

# --- main --------------------------------------------------------------------

DIR=${2:-}
case ${1:-}:$# in
  install:1) install_missing ;;
  start:2) cmd_start ;;
  stop:2) cmd_stop ;;
  *) usage ;;
esac
