#!/usr/bin/env bash
# Run every fuzz target (or those named) for SECONDS each, one at a time,
# after building them all once; fail if any target crashes, leaks past
# the RSS limit, or hangs past the per-input timeout. Prints the executions
# and coverage of each. Used by .ci/run and for the long runs in FUZZING.md.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Environment: XE_FUZZ_TARGET_DIR (build dir; default fuzz/target),
# XE_FUZZ_SANITIZER (address|none; default: address if nightly ships the
# ASan runtime, else none), XE_FUZZ_WORK (new corpus entries and crash
# artifacts; default a temp dir). The committed corpus is only read.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
shift || true

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: no nightly toolchain (rustup toolchain list):" >&2
  rustup toolchain list >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
  exit 1
fi
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
asan_rt="$(rustc +nightly --print sysroot)/lib/rustlib/$host/lib/librustc-nightly_rt.asan.a"
if [ -z "${XE_FUZZ_SANITIZER:-}" ]; then
  if [ -f "$asan_rt" ]; then XE_FUZZ_SANITIZER=address; else XE_FUZZ_SANITIZER=none; fi
fi
target_dir=${XE_FUZZ_TARGET_DIR:-$PWD/fuzz/target}
work=${XE_FUZZ_WORK:-$(mktemp -d)}
mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^xe-fuzz$')
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

echo "fuzz: sanitizer $XE_FUZZ_SANITIZER, ${seconds}s per target, build in $target_dir, work in $work"
start=$(date +%s)
# All targets at once: they share every dependency.
if ! cargo +nightly fuzz build -s "$XE_FUZZ_SANITIZER" --target-dir "$target_dir" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log"
  echo "fuzz: build failed" >&2
  exit 1
fi
echo "fuzz: built in $(( $(date +%s) - start ))s"

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  log="$work/$t/log"
  # First corpus dir gets new inputs; the committed one is read only.
  # Leak checks off: the harnesses keep a runtime, a node and a store in
  # statics for the whole process.
  if cargo +nightly fuzz run -s "$XE_FUZZ_SANITIZER" --target-dir "$target_dir" "$t" \
      "$work/$t/corpus" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -timeout=30 -rss_limit_mb=3072 -detect_leaks=0 \
      -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/" >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
  corpus=$(find "$work/$t/corpus" -type f | wc -l)
  line=$(printf '%-14s %-6s execs %-9s exec/s %-6s %s new-corpus %s' "$t" "$status" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$corpus")
  echo "fuzz: $line"
  summary+=("$line")
  if [ "$status" = FAILED ]; then
    echo "---- $t log (last 60 lines); crash inputs in $work/$t/artifacts/"
    tail -n 60 "$log"
    ls -l "$work/$t/artifacts/" || true
  fi
done
echo "fuzz: done in $(( $(date +%s) - start ))s"
printf 'fuzz: %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
