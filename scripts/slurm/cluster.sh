#!/usr/bin/env bash
# A private, throw-away Slurm cluster on this one machine, for hangar's tests.
#
#   scripts/slurm/cluster.sh install     # only install the missing Debian packages (root)
#   scripts/slurm/cluster.sh start DIR   # install them too, build + start it in DIR, wait until idle
#   scripts/slurm/cluster.sh stop DIR    # kill exactly the PIDs in DIR/pids
#
# One private munged, one slurmctld and three slurmd (Slurm's MULTIPLE_SLURMD:
# n1..n3 on this host, each on its own loopback port, with fake GPUs as GRES).
# Everything lives in DIR; nothing of the system's munge/slurm is used or touched.
# See scripts/slurm/README.md.
set -euo pipefail

# --- tunables (environment) --------------------------------------------------
START_TIMEOUT=${HANGAR_SLURM_START_TIMEOUT:-90}  # seconds until all nodes idle
STOP_TIMEOUT=${HANGAR_SLURM_STOP_TIMEOUT:-15}    # seconds between TERM and KILL
CANCEL_TIMEOUT=${HANGAR_SLURM_CANCEL_TIMEOUT:-5} # seconds for scancel'd jobs to end on stop
PORT_MIN=${HANGAR_SLURM_PORT_MIN:-20000}         # below the kernel's ephemeral range
PORT_MAX=${HANGAR_SLURM_PORT_MAX:-32000}
# Global lock held while choosing ports and until the daemons have bound them,
# so two clusters started at the same time never pick the same ports.
PORT_LOCK=${HANGAR_SLURM_PORT_LOCK:-/tmp/hangar-slurm-ports.lock}
# 1: a node DOWN for not responding comes back when its slurmd registers again,
#    but one set DOWN by `scontrol update state=down` stays DOWN until resumed.
# 2: any DOWN node comes back on registration, which makes an admin DOWN last
#    only milliseconds while its slurmd is alive (see README).
RETURN_TO_SERVICE=${HANGAR_SLURM_RETURN_TO_SERVICE:-1}
# Step credential lifetime; Slurm also holds a requeued job this long (+1s)
# before it may start again (default 120s).
CRED_EXPIRE=${HANGAR_SLURM_CRED_EXPIRE:-10}
# A node that stops answering is DOWN roughly SlurmdTimeout + MessageTimeout
# (+ a ping period) later; see README for measured values.
SLURMD_TIMEOUT=${HANGAR_SLURM_SLURMD_TIMEOUT:-5}
MESSAGE_TIMEOUT=${HANGAR_SLURM_MESSAGE_TIMEOUT:-5}

NODES=(n1 n2 n3)
declare -A NODE_GPUS=([n1]=2 [n2]=1 [n3]=1)
PARTITION=hangar

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
    sleep 0.2
  done
}

port_listening() { [[ -n $(ss -Hltn "sport = :$1") ]]; }
port_busy() { [[ -n $(ss -Hatn "sport = :$1") ]]; }

# pid_is_ours PID NAME DIR: PID is alive, is NAME, and was started for DIR
# (guards against PID reuse after the daemon died).
pid_is_ours() {
  local pid=$1 name=$2 dir=$3 comm cmdline
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$name" ]] || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1  # zombie
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$dir/"* ]]
}

# --- start -------------------------------------------------------------------

install_missing() {
  local need=()
  command -v munged >/dev/null || need+=(munge)
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v ss >/dev/null || need+=(iproute2)
  ((${#need[@]} == 0)) && return 0
  log "installing: ${need[*]}"
  [[ $(id -u) == 0 ]] || die "need root to apt-get install ${need[*]}"
  # Installing must not start the system's munge/slurm services: policy-rc.d
  # exit 101 tells invoke-rc.d not to; only added if there is none already.
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
}

# Pick PORT_COUNT distinct free ports at random in [PORT_MIN, PORT_MAX]; caller holds PORT_LOCK.
pick_ports() {
  local count=$1 p tries=0
  PORTS=()
  while ((${#PORTS[@]} < count)); do
    ((tries++ < 1000)) || die "could not find $count free ports in $PORT_MIN-$PORT_MAX"
    p=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % (PORT_MAX - PORT_MIN + 1)))
    [[ " ${PORTS[*]} " == *" $p "* ]] && continue
    port_busy "$p" && continue
    PORTS+=("$p")
  done
}

STARTED=()  # "pid name" of every daemon this run started, for cleanup on failure

# spawn NAME LOGFILE CMD...: start a foreground daemon in its own session, detached
# from our stdio (so a caller reading our output is not held open), record its PID.
spawn() {
  local name=$1 out=$2
  shift 2
  setsid "$@" </dev/null >>"$out" 2>&1 &
  local pid=$!
  STARTED+=("$pid $name")
  echo "$pid $name" >>"$DIR/pids"
  # Until setsid has exec'd the daemon, /proc/PID still shows the forked shell.
  exec_done() { [[ $(cat "/proc/$pid/comm" 2>/dev/null) != bash && $(cat "/proc/$pid/comm" 2>/dev/null) != setsid ]]; }
  WAIT_GUARD='' wait_until 10 "$name (pid $pid) to exec" exec_done
}

# All daemons this start spawned are still running (WAIT_GUARD while starting).
started_alive() {
  local entry pid name
  for entry in "${STARTED[@]}"; do
    read -r pid name <<<"$entry"
    if ! pid_is_ours "$pid" "$name" "$DIR"; then
      log "$name (pid $pid) exited during start; see $DIR/log/"
      return 1
    fi
  done
}

kill_pids() {  # kill_pids DIR "pid name"...: TERM, wait, KILL; only our processes.
  local dir=$1 entry pid name live=()
  shift
  for entry in "$@"; do
    read -r pid name <<<"$entry"
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if pid_is_ours "$pid" "$name" "$dir"; then
      kill -TERM "$pid" 2>/dev/null || true
      live+=("$pid")
    fi
  done
  ((${#live[@]})) || return 0
  all_gone() {
    local p
    for p in "${live[@]}"; do [[ -e /proc/$p ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && return 1; done
    return 0
  }
  if ! wait_until "$STOP_TIMEOUT" "PIDs ${live[*]} to exit after TERM" all_gone; then
    log "sending KILL to ${live[*]}"
    kill -KILL "${live[@]}" 2>/dev/null || true
    wait_until 10 "PIDs ${live[*]} to exit after KILL" all_gone || die "PIDs still alive: ${live[*]}"
  fi
}

on_start_exit() {
  local rc=$?
  ((rc == 0)) && return 0
  log "start failed (rc=$rc); stopping what it started"
  # Slurm daemons first, munged last (reverse start order).
  local rev=() i
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do rev+=("${STARTED[i]}"); done
  if ((${#rev[@]})); then kill_pids "$DIR" "${rev[@]}" || true; fi
  local f
  for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
    [[ -s $f ]] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 15 "$f" >&2
  done
  exit "$rc"
}

write_configs() {
  local host=$1 ctld_port=$2
  shift 2
  local -a node_ports=("$@")
  local i n g cluster
  cluster="hangar$(printf '%04x' $((RANDOM % 65536)))"

  cat >"$DIR/slurm.conf" <<EOF
# Private test cluster written by scripts/slurm/cluster.sh; do not edit by hand.
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
CredType=cred/munge
# Listen only on the configured (loopback) addresses, not on INADDR_ANY.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
TmpFS=$DIR/tmp

SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
GresTypes=gpu
# Trust the CPU counts below even though three slurmd share this machine's cores.
SlurmdParameters=config_overrides

# Short timeouts for tests.
ReturnToService=$RETURN_TO_SERVICE
SlurmdTimeout=$SLURMD_TIMEOUT
SlurmctldTimeout=5
MessageTimeout=$MESSAGE_TIMEOUT
MinJobAge=5
KillWait=2
InactiveLimit=0
WaitTime=0
TCPTimeout=2
SchedulerParameters=sched_interval=1,bf_interval=1

EOF
  : >"$DIR/gres.conf"
  local dev=0 files
  for i in "${!NODES[@]}"; do
    n=${NODES[i]}
    g=${NODE_GPUS[$n]}
    echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[i]} CPUs=4 RealMemory=1000 Gres=gpu:$g State=UNKNOWN" >>"$DIR/slurm.conf"
    files=()
    for ((j = 0; j < g; j++)); do
      mknod "$DIR/dev/nvidia$dev" c 1 3  # /dev/null's numbers, standing in for a GPU
      files+=("$DIR/dev/nvidia$dev")
      dev=$((dev + 1))
    done
    for f in "${files[@]}"; do
      echo "NodeName=$n Name=gpu File=$f" >>"$DIR/gres.conf"
    done
  done
  local nodelist
  nodelist=$(IFS=,; echo "${NODES[*]}")
  echo "PartitionName=$PARTITION Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP" >>"$DIR/slurm.conf"

  # No cgroups are used (proctrack/linuxproc, task/none); keep slurmd from
  # mounting or constraining anything.
  cat >"$DIR/cgroup.conf" <<EOF
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  : >"$DIR/plugstack.conf"  # no SPANK plugins (do not read /etc/slurm/plugstack.conf)
}

all_nodes_idle() {
  local out
  out=$(SLURM_CONF=$DIR/slurm.conf sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null) || return 1
  [[ $(grep -c ' idle$' <<<"$out") == "${#NODES[@]}" ]]
}

munge_up() {
  [[ -S $DIR/munge/munge.socket ]] && munge --socket="$DIR/munge/munge.socket" -n </dev/null >/dev/null 2>&1
}

cmd_start() {
  local t0
  t0=$(now_ms)
  install_missing
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd -P)
  [[ $DIR =~ ^[A-Za-z0-9_./+-]+$ ]] || die "DIR must be a plain path (no spaces or special characters): $DIR"
  ((${#DIR} <= 80)) || die "DIR is too long for a unix socket path: $DIR"
  [[ ! -e $DIR/pids ]] || die "$DIR/pids exists: a cluster may be running there (run: $0 stop $DIR)"
  [[ ! -e $DIR/slurm.conf ]] || die "$DIR already holds a cluster; use an empty directory"
  # munged refuses a socket in a directory that others cannot traverse, and
  # mktemp -d (or Rust's tempfile) makes DIR 0700; a+x lets all pass, not list.
  chmod a+x "$DIR"
  mkdir -p "$DIR"/{munge,state,spool,run,log,dev,tmp}
  local n
  for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
  chmod 755 "$DIR/munge"  # munged requires o+x on its socket's directory
  : >"$DIR/pids"
  cd "$DIR"  # daemons (and slurmstepd) inherit this cwd; do not pin the caller's
  trap on_start_exit EXIT
  WAIT_GUARD=started_alive

  # munge: own key, socket, pid, seed and log.
  mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  chmod 600 "$DIR/munge/munge.key"
  spawn munged "$DIR/log/munged.out" munged --foreground \
    --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/log/munged.log"
  wait_until 20 "munged to answer on $DIR/munge/munge.socket" munge_up

  local host
  host=$(hostname -s)
  exec 9>>"$PORT_LOCK"
  wait_until 120 "port lock $PORT_LOCK" flock -n 9
  pick_ports $((1 + ${#NODES[@]}))
  local ctld_port=${PORTS[0]} node_ports=("${PORTS[@]:1}")
  write_configs "$host" "$ctld_port" "${node_ports[@]}"

  export SLURM_CONF=$DIR/slurm.conf
  spawn slurmctld "$DIR/log/slurmctld.out" slurmctld -D -i -f "$DIR/slurm.conf"
  wait_until 30 "slurmctld to listen on 127.0.0.1:$ctld_port" port_listening "$ctld_port"
  local i
  for i in "${!NODES[@]}"; do
    spawn slurmd "$DIR/log/slurmd-${NODES[i]}.out" slurmd -D -N "${NODES[i]}" -f "$DIR/slurm.conf"
  done
  for i in "${!NODES[@]}"; do
    wait_until 30 "slurmd ${NODES[i]} to listen on 127.0.0.1:${node_ports[i]}" port_listening "${node_ports[i]}"
  done
  flock -u 9
  exec 9>&-

  cat >"$DIR/env" <<EOF
export SLURM_CONF=$DIR/slurm.conf
export HANGAR_SLURM_DIR=$DIR
export HANGAR_SLURM_MUNGE_SOCKET=$DIR/munge/munge.socket
export HANGAR_SLURM_PARTITION=$PARTITION
export HANGAR_SLURM_CTLD_PORT=$ctld_port
export HANGAR_SLURM_NODES=$(IFS=,; echo "${NODES[*]}")
EOF

  wait_until "$START_TIMEOUT" "all ${#NODES[@]} nodes idle in sinfo" all_nodes_idle
  trap - EXIT
  local gres=() n
  for n in "${NODES[@]}"; do gres+=("$n:gpu:${NODE_GPUS[$n]}"); done
  echo "slurm cluster up in $DIR: slurmctld 127.0.0.1:$ctld_port, nodes ${gres[*]}," \
    "partition $PARTITION, $(($(now_ms) - t0))ms; use: . $DIR/env"
}

# --- stop --------------------------------------------------------------------

no_jobs_left() { [[ -z $(SLURM_CONF=$DIR/slurm.conf squeue -h -o %i 2>/dev/null) ]]; }

# slurmstepd processes (one per running job step) of this cluster: they detach
# from slurmd, so they are not in DIR/pids; recognised by SLURM_CONF=DIR/slurm.conf.
cluster_stepds() {
  local p
  for p in /proc/[0-9]*; do
    [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
    tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF "SLURM_CONF=$DIR/slurm.conf" &&
      echo "${p#/proc/} slurmstepd"
  done
  return 0
}

descendants() {  # descendants PID: all live descendants of PID, deepest first
  local kids k
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null) || true
  for k in $kids; do
    descendants "$k"
    echo "$k"
  done
}

cmd_stop() {
  [[ -d $DIR ]] || die "no such directory: $DIR"
  DIR=$(cd "$DIR" && pwd -P)
  if [[ ! -f $DIR/pids && -f $DIR/pids.stopped ]]; then
    echo "slurm cluster in $DIR already stopped"
    return 0
  fi
  [[ -f $DIR/pids ]] || die "$DIR/pids not found: nothing to stop"
  local entries=() line
  while IFS= read -r line; do
    [[ -n $line ]] && entries+=("$line")
  done <"$DIR/pids"
  local slurmds=() ctld=() munge=() e ctld_alive=0 pid name
  for e in "${entries[@]}"; do
    read -r pid name <<<"$e"
    case $name in
      slurmd) slurmds+=("$e") ;;
      munged) munge+=("$e") ;;
      *) ctld+=("$e") ;;
    esac
    [[ $name == slurmctld ]] && pid_is_ours "$pid" "$name" "$DIR" && ctld_alive=1
  done
  # Cancel jobs through Slurm first, so slurmstepd and job processes end too.
  if ((ctld_alive)) && ! no_jobs_left; then
    SLURM_CONF=$DIR/slurm.conf scancel --quiet --partition="$PARTITION" 2>/dev/null || true
    wait_until "$CANCEL_TIMEOUT" "jobs to leave squeue after scancel" no_jobs_left || true
  fi
  # slurmd, then slurmctld, then munged (Slurm needs munge to shut down cleanly).
  ((${#slurmds[@]})) && kill_pids "$DIR" "${slurmds[@]}"
  ((${#ctld[@]})) && kill_pids "$DIR" "${ctld[@]}"
  local strays=()
  mapfile -t strays < <(cluster_stepds)
  if ((${#strays[@]})); then
    # Left behind when a slurmd died under a running job. Kill each with its
    # job processes (its descendants), children first.
    local s victims=()
    for s in "${strays[@]}"; do
      mapfile -t -O "${#victims[@]}" victims < <(descendants "${s%% *}")
      victims+=("${s%% *}")
    done
    log "killing leftover slurmstepd of this cluster and their job processes: ${victims[*]}"
    kill -KILL "${victims[@]}" 2>/dev/null || true
  fi
  ((${#munge[@]})) && kill_pids "$DIR" "${munge[@]}"
  mv "$DIR/pids" "$DIR/pids.stopped"
  echo "slurm cluster in $DIR stopped (${#entries[@]} daemons)"
}

# --- main --------------------------------------------------------------------

DIR=${2:-}
case ${1:-}:$# in
  install:1) install_missing ;;
  start:2) cmd_start ;;
  stop:2) cmd_stop ;;
  *) usage ;;
esac
