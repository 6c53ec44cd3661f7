#!/usr/bin/env bash
# A check of hangar on a machine with NVIDIA GPUs, in one run of a few minutes: builds
# hangar (release), starts a server that finds the GPUs through NVML, deploys a small
# torch model (scripts/gpu-check/app) on a machine type with one GPU, checks that its
# runner sees exactly its GPU (torch's device count and UUID, CUDA_VISIBLE_DEVICES, the
# runner's GPUs, its /dev), and that a command run in it by `hangar runners exec` sees the
# same, and measures the cold start and calls per second through the
# gateway against the same app started directly on the host. It prints a markdown summary
# and writes it to $OUT/gpu-check.md (else target/gpu-check.md), with its logs beside it.
#
# It needs no network: torch must already be installed, for python3 or for the Python
# (or virtualenv directory) given in GPU_CHECK_PYTHON. Run it as root (the sandbox hands
# out uids), with bubblewrap, util-linux and slirp4netns installed; where the sandbox
# cannot work, it falls back to --sandbox none and says so.
#
# Settings (environment):
#   GPU_CHECK_PYTHON       the Python, or virtualenv, with torch (default: python3)
#   HANGAR_BIN             a hangar binary to use instead of building one
#   GPU_CHECK_SANDBOX      auto (bwrap, else none), bwrap or none (default auto)
#   GPU_CHECK_SECONDS      seconds of each load measurement (default 10)
#   GPU_CHECK_CONCURRENCY  connections of the load (default 16)
#   GPU_CHECK_OHA          the oha load generator (default: oha on PATH, else Python's)
#   GPU_CHECK_COLD_TIMEOUT seconds a cold call may take to answer (default 180)
#   GPU_CHECK_KEEP=1       keep the temporary directory (data dir, logs)
#   GPU_CHECK_ALLOW_CPU=1  for testing this script without a GPU only: a fake GPU
#                          (--gpus with a stand-in device file) and the model on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tool=$root/scripts/gpu-check/tool.py
seconds=${GPU_CHECK_SECONDS:-10}
concurrency=${GPU_CHECK_CONCURRENCY:-16}
allow_cpu=${GPU_CHECK_ALLOW_CPU:-0}
sandbox=${GPU_CHECK_SANDBOX:-auto}
if [ -n "${OUT:-}" ]; then out_dir=$OUT; else out_dir=$root/target; fi
summary_file=$out_dir/gpu-check.md
logs_dir=$out_dir/gpu-check-logs
app=gpu-check
body='{"x": [0.1, 0.2, 0.3, 0.4]}'
cold_timeout=${GPU_CHECK_COLD_TIMEOUT:-180}

log() { printf '%s gpu-check: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() {
  log "FAILED: $*"
  [ -z "${work:-}" ] || printf '%s\n' "$*" >>"$work/errors.txt"
  exit 1
}
now_ns() { date +%s%N; }
seconds_since() { # seconds_since START_NS: elapsed seconds, 3 decimals
  local ms=$((($(now_ns) - $1) / 1000000))
  printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}
alive() { # alive PID: the process exists and is not a zombie
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
stop_pid() { # stop_pid PID NAME SECONDS: TERM, then KILL after SECONDS
  local pid=$1 name=$2 deadline=$((SECONDS + $3))
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  while alive "$pid"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name (pid $pid) still running after $3 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  wait "$pid" 2>/dev/null || true
}

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
chmod 0755 "$work"
server_pid=
direct_pid=
cold_pid=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -z "$cold_pid" ] || stop_pid "$cold_pid" "the cold call" 5
  [ -z "$direct_pid" ] || stop_pid "$direct_pid" "the direct app" 15
  [ -z "$server_pid" ] || stop_pid "$server_pid" "the server" 45
  mkdir -p "$out_dir" "$logs_dir"
  if [ -n "${py:-}" ]; then
    fact total_s "$SECONDS" || true
    "$py" "$tool" summary "$work" "$summary_file" || log "cannot write the summary"
  else
    printf '## GPU check\n\nResult: **FAILED**: %s\n\n' "$(cat "$work/errors.txt" 2>/dev/null)" >"$summary_file"
  fi
  for f in "$work"/*.log "$work"/*.json "$work"/*.txt "$work/app/hangar.toml"; do
    [ ! -f "$f" ] || cp "$f" "$logs_dir/"
  done
  if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
  if [ "$rc" = 0 ]; then log "passed; summary in $summary_file"; else log "FAILED (exit $rc); summary in $summary_file, logs in $logs_dir"; fi
  exit "$rc"
}
trap cleanup EXIT
on_error() { # on_error STATUS LINE COMMAND: what set -e stopped at, for the summary
  printf 'line %s: "%s" failed (exit %s)\n' "$2" "$3" "$1" >>"$work/errors.txt"
  log "FAILED: line $2: \"$3\" exited $1"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM
rm -rf "$logs_dir"
fact() { "$py" "$tool" set "$work/facts.json" "$1" "$2"; }

# --- The Python with torch ------------------------------------------------------------
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py=$GPU_CHECK_PYTHON
  [ ! -d "$py" ] || py=$py/bin/python
  [ -x "$py" ] || { py=; fail "GPU_CHECK_PYTHON=$GPU_CHECK_PYTHON: no Python there (give a python executable or a virtualenv directory)"; }
else
  py=$(command -v python3 || true)
  [ -n "$py" ] || fail "no python3 on PATH: set GPU_CHECK_PYTHON to the Python (or virtualenv) that has torch"
fi
log "probing $py and its torch"
"$py" "$tool" probe >"$work/probe.json" || fail "$py cannot run $tool"
py=$("$py" "$tool" get "$work/probe.json" 'd["executable"]') # the interpreter itself, not a shim
torch_error=$("$py" "$tool" get "$work/probe.json" 'd.get("torch_error", "")')
if [ -n "$torch_error" ]; then
  [ "$allow_cpu" = 1 ] || fail "$py cannot import torch ($torch_error): set GPU_CHECK_PYTHON to the Python or virtualenv that has it (pip may not be reachable here)"
  log "no torch ($torch_error); GPU_CHECK_ALLOW_CPU=1: the app runs its model in plain Python"
fi
cuda=$("$py" "$tool" get "$work/probe.json" 'd.get("cuda_available", False)')
if [ "$cuda" != true ]; then
  [ "$allow_cpu" = 1 ] || fail "torch $("$py" "$tool" get "$work/probe.json" 'd.get("torch")') (CUDA $("$py" "$tool" get "$work/probe.json" 'd.get("cuda_version")')) cannot use a GPU on this host: $("$py" "$tool" get "$work/probe.json" 'd.get("cuda_error", "torch.cuda.is_available() is False")')"
  log "torch sees no GPU; GPU_CHECK_ALLOW_CPU=1: going on with a fake one"
fi
log "python $("$py" "$tool" get "$work/probe.json" 'd["version"]') at $py, torch $("$py" "$tool" get "$work/probe.json" 'd.get("torch")'), CUDA devices: $("$py" "$tool" get "$work/probe.json" 'd.get("devices")')"
unreadable=$("$py" "$tool" get "$work/probe.json" '" ".join(d["unreadable"])')
[ -z "$unreadable" ] || log "WARNING: the sandbox's unprivileged uid may not read these: $unreadable"
ro_args=()
while IFS= read -r path; do
  [ -z "$path" ] || ro_args+=(--sandbox-ro-path "$path")
done < <("$py" "$tool" get "$work/probe.json" '"\n".join(d["ro_paths"])')
log "host paths the sandbox reads: $("$py" "$tool" get "$work/probe.json" '" ".join(d["ro_paths"]) or "(none: all in the system paths)"')"
fact date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
if commit=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || commit="$commit with changes"
else
  commit=unknown
fi
fact commit "$commit"
fact cpus "$(nproc)"
fact kernel "$(uname -sr)"
fact allow_cpu "$allow_cpu"
fact concurrency "$concurrency"

# --- hangar ---------------------------------------------------------------------------
if [ -n "${HANGAR_BIN:-}" ]; then
  hangar=$HANGAR_BIN
  log "using HANGAR_BIN=$hangar"
elif command -v cargo >/dev/null 2>&1; then
  log "building hangar (release)"
  started=$(now_ns)
  if cargo build --release --locked -p cli -p testkit; then
    log "built in $(seconds_since "$started") s"
  elif [ -x target/release/hangar ]; then
    log "WARNING: the build failed; using target/release/hangar as built before ($(date -r target/release/hangar))"
  else
    fail "cargo build --release --locked -p cli -p testkit failed"
  fi
  hangar=$root/target/release/hangar
elif [ -x target/release/hangar ]; then
  log "WARNING: no cargo here; using target/release/hangar as built before ($(date -r target/release/hangar))"
  hangar=$root/target/release/hangar
else
  fail "no cargo to build hangar with, and no target/release/hangar: set HANGAR_BIN"
fi
[ -x "$hangar" ] || fail "$hangar is not an executable"
"$hangar" gpus --help >/dev/null 2>&1 || fail "$hangar has no 'gpus' command: it was built before hangar had GPUs"
fact hangar "$("$hangar" --version)"

# --- The server -----------------------------------------------------------------------
read -r api_port gateway_port direct_port < <("$py" "$tool" ports 3)
api=http://127.0.0.1:$api_port
gateway=http://127.0.0.1:$gateway_port
cat >"$work/config.toml" <<'EOF'
[machine_types.gpu]
capacity = 1
gpus = 1
EOF
gpu_args=()
if [ "$allow_cpu" = 1 ]; then
  # A stand-in GPU: an id that looks like NVML's, and a file for its device node.
  mkdir -p "$work/fake-dev"
  touch "$work/fake-dev/nvidia0" "$work/fake-dev/nvidiactl" "$work/fake-dev/nvidia-uvm"
  gpu_args=(--gpus "GPU-00000000-0000-4000-8000-00000000fa4e=$work/fake-dev/nvidia0")
  log "GPU_CHECK_ALLOW_CPU=1: a fake GPU (${gpu_args[1]})"
fi
if [ "$sandbox" = auto ]; then
  if [ "$(id -u)" = 0 ] && command -v bwrap >/dev/null && command -v setpriv >/dev/null; then
    sandbox_try=(bwrap none)
  else
    log "WARNING: not root, or no bwrap/setpriv: the server runs without its sandbox (--sandbox none)"
    sandbox_try=(none)
  fi
else
  sandbox_try=("$sandbox")
fi
start_server() { # start_server SANDBOX: the server up and answering (its data dir its own), or 1
  data=$work/data-$1
  "$hangar" server --data-dir "$data" --api-addr "127.0.0.1:$api_port" \
    --gateway-addr "127.0.0.1:$gateway_port" --config "$work/config.toml" --sandbox "$1" \
    "${ro_args[@]}" "${gpu_args[@]}" >>"$work/server.log" 2>&1 &
  server_pid=$!
  "$py" "$tool" wait "$api/healthz" 60 "$server_pid"
}
gpus_logged() { # what the server's log says of GPUs: what it found, and any warning
  grep 'GPUs' "$work/server.log" | tail -n 2 | tr '\n' ' ' || echo 'no "GPUs" line in its log'
}
serve() { # serve MODE...: the server started with the first sandbox mode that works
  local mode
  for mode; do
    log "starting the server (--sandbox $mode) on $api, gateway $gateway"
    printf '=== hangar server --sandbox %s\n' "$mode" >>"$work/server.log"
    if start_server "$mode"; then
      sandbox=$mode
      break
    fi
    log "the server did not start with --sandbox $mode; its log ends:"
    tail -n 20 "$work/server.log" >&2
    printf 'the server did not start with --sandbox %s: %s\n' "$mode" "$(grep -v '^===' "$work/server.log" | tail -n 1)" >>"$work/errors.txt"
    stop_pid "$server_pid" "the server" 20
    server_pid=
  done
  [ -n "$server_pid" ] || fail "the server did not start (see server.log)"
  [ "$sandbox" = bwrap ] || log "WARNING: runners are not sandboxed (--sandbox none): the /dev check sees the host's /dev"
  fact sandbox "$sandbox"
  "$py" "$tool" call GET "$api/healthz" "$work/healthz.json"
  fact limits "$("$py" "$tool" get "$work/healthz.json" 'd["body"].get("limits", "?")')"
  HANGAR_URL=$api
  HANGAR_KEY=$(cat "$data/admin.key")
  export HANGAR_URL HANGAR_KEY
  log "server: $(gpus_logged)"
  "$hangar" gpus --json >"$work/gpus.json"
  gpu_count=$("$py" "$tool" get "$work/gpus.json" 'len(d)')
  [ "$gpu_count" -ge 1 ] || fail "the server found no GPU; it logged: $(gpus_logged)"
  "$hangar" gpus >&2
}

# --- Deploy, and the cold start -------------------------------------------------------
mkdir "$work/app"
cp scripts/gpu-check/app/server.py "$work/app/"
"$py" "$tool" manifest "$work/probe.json" "$allow_cpu" >"$work/app/hangar.toml"
chmod -R a+rX "$work/app"
deploy() {
  log "deploying $app (--strategy recreate: the first call starts its runner)"
  local started
  started=$(now_ns)
  timeout 180 "$hangar" deploy "$work/app" --auth public --strategy recreate --message "scripts/gpu-check.sh" \
    >"$work/deploy.log" 2>&1 || { cat "$work/deploy.log" >&2; fail "the deploy failed (deploy.log)"; }
  deploy_s=$(seconds_since "$started")
  fact deploy_s "$deploy_s"
  log "deployed in $deploy_s s"
  local live
  live=$("$hangar" apps runners "$app" --json | "$py" "$tool" get - 'len(d)')
  [ "$live" = 0 ] || fail "$app has $live runners after a recreate deploy; expected none before the first call"
}
runner_logs() { # runner_logs [ID...]: their output (default: the app's runners) in runner-logs.txt
  local ids=("$@") id
  if [ "${#ids[@]}" = 0 ]; then
    "$hangar" apps runners "$app" --json --since 1h >"$work/runners-all.json" 2>/dev/null || return 0
    read -r -a ids < <("$py" "$tool" get "$work/runners-all.json" '" ".join(r["id"] for r in d)')
  fi
  : >"$work/runner-logs.txt"
  for id in "${ids[@]}"; do
    printf '=== runner %s\n' "$id" >>"$work/runner-logs.txt"
    "$hangar" runners logs "$id" -n 200 >>"$work/runner-logs.txt" 2>&1 || true
  done
  tail -n 40 "$work/runner-logs.txt" >&2
}
cold_start() { # cold_start NAME: a call that starts a runner, timed in NAME.json; or 1, why in cold_error
  local name=$1 before now seen=() states id state
  before=$("$hangar" apps runners "$app" --json --since 1h | "$py" "$tool" get - '" ".join(r["id"] for r in d)')
  "$py" "$tool" call POST "$gateway/default/$app/" "$work/$name.json" --body "$body" \
    --timeout "$cold_timeout" --header "X-Hangar-Request-Timeout:$cold_timeout" &
  cold_pid=$!
  # While it waits, a new runner that crashed will not answer it: give up at once, with why.
  while alive "$cold_pid"; do
    # The new runners, as "ID STATE" lines (a crashed one leaves the listing soon).
    now=$("$hangar" apps runners "$app" --json --since 1h | "$py" "$tool" get - \
      "\"\\n\".join(r[\"id\"] + \" \" + r[\"state\"] for r in d if r[\"id\"] not in \"$before\")") || now=
    states=
    while read -r id state; do
      [ -n "$id" ] || continue
      case " ${seen[*]} " in *" $id "*) ;; *) seen+=("$id") ;; esac
      states+=" $state"
    done <<<"$now"
    case "$states " in
      *" crash_backoff "* | *" terminated "*)
        log "a runner of $app ended before answering (states:$states); its output:"
        stop_pid "$cold_pid" "the cold call" 5
        cold_pid=
        runner_logs "${seen[@]}"
        cold_error="the runner of $app did not start (runner-logs.txt): $(grep -v '^===' "$work/runner-logs.txt" | tail -n 1)"
        return 1
        ;;
    esac
    sleep 0.5
  done
  if ! wait "$cold_pid"; then
    cold_pid=
    runner_logs "${seen[@]}"
    cold_error="the call that starts a runner got no 200 within $cold_timeout s ($name.json, runner-logs.txt)"
    return 1
  fi
  cold_pid=
  log "cold start: $("$py" "$tool" get "$work/$name.json" '"%.2f" % d["seconds"]') s to the first 200"
}

serve "${sandbox_try[@]}"
deploy
log "cold start: the first call (no runner yet)"
cold_error=
if ! cold_start cold; then
  if [ "$sandbox" != bwrap ] || [ "${#sandbox_try[@]}" = 1 ]; then fail "$cold_error"; fi
  # The sandbox keeps CUDA from working: say so, and measure what can be without it.
  printf 'with --sandbox bwrap: %s; the rest is measured with --sandbox none\n' "$cold_error" >>"$work/errors.txt"
  log "FAILED with --sandbox bwrap: $cold_error; going on with --sandbox none"
  mv "$work/runner-logs.txt" "$work/runner-logs-bwrap.txt" 2>/dev/null || true
  stop_pid "$server_pid" "the server" 45
  server_pid=
  serve none
  fact sandbox "none (bwrap: the runner did not start)"
  deploy
  cold_start cold || fail "$cold_error"
fi

# --- The runner sees exactly its GPU --------------------------------------------------
"$py" "$tool" call GET "$gateway/default/$app/whoami" "$work/whoami.json"
fact app_load_s "$("$py" "$tool" get "$work/whoami.json" 'd["body"].get("load_seconds")')"
"$hangar" apps runners "$app" --json >"$work/runners.json"
"$hangar" gpus --json >"$work/gpus.json"
runner_gpu=$("$py" "$tool" get "$work/runners.json" \
  'next((r["gpus"][0] for r in d if r.get("gpus")), "")')
[ -n "$runner_gpu" ] || runner_gpu=$("$py" "$tool" get "$work/gpus.json" 'd[0]["id"]')

# The same app on the host: the baseline of the calls, and its view of the same GPU.
log "starting the app directly on 127.0.0.1:$direct_port with CUDA_VISIBLE_DEVICES=$runner_gpu"
(cd "$work/app" && exec env PORT="$direct_port" CUDA_VISIBLE_DEVICES="$runner_gpu" \
  NVIDIA_VISIBLE_DEVICES="$runner_gpu" GPU_CHECK_ALLOW_CPU="$allow_cpu" PYTHONUNBUFFERED=1 \
  "$py" server.py) >"$work/direct.log" 2>&1 &
direct_pid=$!
"$py" "$tool" wait "http://127.0.0.1:$direct_port/health" 120 "$direct_pid" ||
  { tail -n 30 "$work/direct.log" >&2; fail "the app started directly did not get healthy (direct.log)"; }
"$py" "$tool" call GET "http://127.0.0.1:$direct_port/whoami" "$work/direct_whoami.json"

# A command run in the runner by `hangar runners exec` sees what the runner sees.
exec_runner=$("$py" "$tool" get "$work/whoami.json" 'd["headers"].get("x-hangar-runner-id", "")')
log "runners exec $exec_runner -- $py server.py --whoami"
"$hangar" runners exec "$exec_runner" -- "$py" server.py --whoami >"$work/exec.json" 2>"$work/exec.log" ||
  log "WARNING: runners exec exited $? (exec.log): $(tail -n 3 "$work/exec.log")"

log "checks:"
checks_ok=1
"$py" "$tool" check "$work" || checks_ok=0

# --- Calls per second: direct and through the gateway ---------------------------------
oha=${GPU_CHECK_OHA:-$(command -v oha || true)}
[ -n "$oha" ] || [ ! -x target/bench-tools/bin/oha ] || oha=$root/target/bench-tools/bin/oha
measure() { # measure NAME URL SECONDS: the load's summary in load_NAME.json
  local name=$1 url=$2 secs=$3
  if [ -n "$oha" ]; then
    timeout $((secs + 60)) "$oha" -z "${secs}s" -c "$concurrency" --no-tui -w --output-format json \
      -m POST -H 'content-type: application/json' -d "$body" "$url" >"$work/oha_$name.json" ||
      fail "oha against $url failed"
    "$py" "$tool" oha "$work/oha_$name.json" "$work/load_$name.json"
  else
    timeout $((secs + 60)) "$py" "$tool" load "$url" "$secs" "$concurrency" "$body" "$work/load_$name.json"
  fi
}
log "load: ${seconds} s each, $concurrency connections, by ${oha:-Python (no oha on PATH)}"
log "warming up (2 s each)"
measure warmup_direct "http://127.0.0.1:$direct_port/" 2 >/dev/null
measure warmup_gateway "$gateway/default/$app/" 2 >/dev/null
rm -f "$work/load_warmup_"*.json "$work/oha_warmup_"*.json
log "direct:"
measure direct "http://127.0.0.1:$direct_port/" "$seconds"
log "through the gateway:"
measure gateway "$gateway/default/$app/" "$seconds"
"$hangar" apps runners "$app" --json >"$work/runners-after.json"
runners_after=$("$py" "$tool" get "$work/runners-after.json" 'len(d)')
[ "$runners_after" = 1 ] || log "WARNING: $app has $runners_after runners after the load (expected its one)"

stop_pid "$direct_pid" "the direct app" 15
direct_pid=

# --- A second cold start, its files in the page cache now ------------------------------
runner_id=$("$py" "$tool" get "$work/runners-after.json" 'd[0]["id"] if d else ""')
if [ -n "$runner_id" ]; then
  log "killing runner $runner_id for a second cold start"
  "$hangar" runners kill "$runner_id" >/dev/null
  deadline=$((SECONDS + 60))
  while :; do
    live=$("$hangar" apps runners "$app" --json | "$py" "$tool" get - 'len(d)')
    gpus_held=$("$hangar" gpus --json | "$py" "$tool" get - 'sum(1 for g in d if g.get("held"))')
    [ "$live" != 0 ] || [ "$gpus_held" != 0 ] || break
    [ "$SECONDS" -lt "$deadline" ] || fail "runner $runner_id still listed ($live live, $gpus_held GPUs held) 60 s after it was killed"
    sleep 0.2
  done
  cold_start cold2 || printf 'second cold start: %s\n' "$cold_error" >>"$work/errors.txt"
fi

log "total $SECONDS s"
[ "$checks_ok" = 1 ] || fail "some GPU checks failed (see the table)"
[ ! -s "$work/errors.txt" ] || { log "FAILED: $(cat "$work/errors.txt")"; exit 1; }
