#!/usr/bin/env bash
# User-space instructions per call of hangar's gateway and of nginx as the same reverse
# proxy, counted by valgrind's callgrind: repeatable to the thousand on a noisy machine,
# where calls per second and CPU time are not. Both proxy the static-nginx example's
# runner on a `--sandbox none` server; callgrind's instrumentation is switched on for
# CALLS calls of `oha -c 8` (after 2,000 to warm up) and off again.
#
#   bench/callgrind.sh [CALLS]      (default 20000; needs a release build, bench/run.sh's
#                                    oha, valgrind and nginx)
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-20000}
oha=$(command -v oha || echo target/bench-tools/bin/oha)
nginx=$(command -v nginx || echo /usr/sbin/nginx)
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

work=$(mktemp -d /tmp/hangar-callgrind-XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return; sleep 0.2; done; echo "nothing answered at $1" >&2; cat "$work"/*.log >&2; exit 1; }

# Counts `calls` calls to `url` in the callgrind run of `pid` whose output is `out`, and
# prints the instructions per call.
count() {
  local pid=$1 url=$2 out=$3 name=$4
  "$oha" --no-tui -n 2000 -c 8 "$url" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  local summary
  summary=$("$oha" --no-tui -n "$calls" -c 8 "$url")
  grep -q "Success rate:.*100.00%" <<<"$summary" || { echo "$name: calls failed: $summary" >&2; exit 1; }
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  local total
  total=$(callgrind_annotate "$out".1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "$name: $((total / calls)) instructions per call ($total for $calls calls)"
}

api=$(free_port) gw=$(free_port)
mkdir -p "$work/data"
export HANGAR_DATA_DIR=$work/data HANGAR_URL=http://127.0.0.1:$api
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/hangar.out" \
  target/release/hangar server --sandbox none --api-addr "127.0.0.1:$api" --gateway-addr "127.0.0.1:$gw" \
  >"$work/server.log" 2>&1 &
pids+=($!)
server=$!
wait_for "http://127.0.0.1:$api/healthz"
target/release/hangar deploy examples/static-nginx --auth public >/dev/null 2>&1
target/release/hangar apps scale static-nginx --min-concurrency 1 --keep-alive 3600 >/dev/null
url=http://127.0.0.1:$gw/default/static-nginx/
runner=$(curl -sf "${url}port")
count "$server" "$url" "$work/hangar.out" hangar

proxy=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 1; master_process off; daemon off;
error_log $work/nginx/error.log warn; pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/nginx/body; proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi; uwsgi_temp_path $work/nginx/uwsgi; scgi_temp_path $work/nginx/scgi;
  upstream runner { server 127.0.0.1:$runner; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$proxy;
    location / { proxy_pass http://runner; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/nginx.out" \
  "$nginx" -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx.log" 2>&1 &
pids+=($!)
proxy_pid=$!
wait_for "http://127.0.0.1:$proxy/"
count "$proxy_pid" "http://127.0.0.1:$proxy/" "$work/nginx.out" "nginx (one process)"
