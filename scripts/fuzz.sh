#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each fuzz target of fuzz/ (all of them by default: manifest, unpack,
# unpack_entries) for SECONDS seconds (default 60) on the stable toolchain,
# without a sanitizer (which needs nightly). Each run starts from the seeds in
# fuzz/seeds/TARGET plus whatever earlier runs added to the corpus kept in
# the target directory, so the repository is never modified. Exits non-zero
# if any target crashes (a panic, a failed check, or an input that takes over
# 10 s), after printing the panic and the path of the crashing input, which
# `cargo +stable fuzz run --sanitizer none TARGET PATH` in fuzz/ reruns.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(manifest unpack unpack_entries)
case $seconds in
  '' | *[!0-9]*)
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 2
    ;;
esac
for target in "${targets[@]}"; do
  if [ ! -d "fuzz/seeds/$target" ]; then
    echo "fuzz: no target $target (there are: $(ls fuzz/seeds | tr '\n' ' '))" >&2
    exit 2
  fi
done

if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13\.'; then
  # A debug build of cargo-fuzz takes a third of the time of a release one
  # and is just as fast at launching the fuzzer.
  cargo install cargo-fuzz --version '^0.13' --locked --debug
fi

target_dir=${CARGO_TARGET_DIR:-$root/target}
work=$target_dir/fuzz-work
mkdir -p "$work"
# The unpack targets make and remove one directory per input; a tmpfs keeps
# that off the disk. Whatever a crashed run leaves there is removed on exit.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  scratch=$(mktemp -d /dev/shm/hangar-fuzz.XXXXXX)
else
  scratch=$(mktemp -d)
fi
trap 'rm -rf "$scratch"' EXIT
export HANGAR_FUZZ_SCRATCH=$scratch

cd fuzz
# Coverage-instrumented release build, with debug assertions and overflow
# checks, of every target at once.
cargo +stable fuzz build --sanitizer none --target-dir "$target_dir/fuzz"

failed=()
for target in "${targets[@]}"; do
  corpus=$work/corpus/$target
  artifacts=$work/artifacts/$target
  mkdir -p "$corpus" "$artifacts"
  cp "$root/fuzz/seeds/$target"/* "$corpus"/
  dict=()
  [ "$target" != manifest ] || dict=(-dict="$root/fuzz/manifest.dict")
  log=$work/$target.log
  echo "fuzz: $target for ${seconds}s"
  if cargo +stable fuzz run --sanitizer none --target-dir "$target_dir/fuzz" "$target" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz: $target: ${runs:-?} runs, no crash"
  else
    # The panic and libFuzzer's report, without the stack frames.
    report=$(sed -n '/panicked at\|ERROR: libFuzzer/,/Test unit written/p' "$log" | grep -v '^ *[0-9]*: \|^ *at ' | head -n 40)
    if [ -n "$report" ]; then echo "$report" >&2; else tail -n 40 "$log" >&2; fi
    input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    echo "fuzz: $target FAILED; crashing input: ${input:-none written, see $log}" >&2
    [ -z "$input" ] || echo "fuzz: rerun it with: (cd fuzz && cargo +stable fuzz run --sanitizer none $target $input)" >&2
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]}" >&2
  exit 1
fi
