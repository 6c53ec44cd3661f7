#!/usr/bin/env bash
# hangar's reliability runs, against the real server built from this tree:
#   reliability/run.sh crash [--trials N] [--seed S]   SIGKILL trials under mixed traffic
#   reliability/run.sh soak [--seconds N] [--rate N]   load with rollouts and set-revs
# The fuzzing and the hostile-input and fault tests are part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: reliability/run.sh crash|soak [flags]}
shift
case "$what" in
  crash)
    # A debug build: what is tested is what survives a crash, not speed.
    cargo build --locked -p cli -p testkit -p reliability --bins
    exec target/debug/hangar-crash-trials --hangar target/debug/hangar "$@"
    ;;
  soak)
    # The release build, as users run it: its memory is what should stay flat.
    cargo build --release --locked -p cli -p testkit -p reliability --bins
    exec target/release/hangar-soak --hangar target/release/hangar "$@"
    ;;
  *)
    echo "unknown run $what: crash or soak" >&2
    exit 2
    ;;
esac
