#!/usr/bin/env bash
# Pending flood (issue 18.2): the bench in store/tests/flood_bench.rs on
# revision REV (default ab0cd88, before 18.2) in a temporary worktree,
# where the store has no sources and the bench calls `apply_events`
# ("before"), then on this checkout ("after"). XE_FLOOD_N events,
# spread over XE_FLOOD_SOURCES sources (default 1).
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
target=${CARGO_TARGET_DIR:-/work/target-ready}
n=${XE_FLOOD_N:-120000}
export XE_FLOOD_SOURCES=${XE_FLOOD_SOURCES:-1}
run() {
  (cd "$1" && XE_FLOOD_N=$n CARGO_TARGET_DIR=$target nice -n 10 cargo test --release -q \
     -p xe-store --test flood_bench -- --ignored --nocapture 2>&1 | grep '^flood of')
}
rev=${REV:-ab0cd88}
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp" >/dev/null 2>&1 || true' EXIT
git -C "$root" worktree add --detach "$tmp" "$rev" >/dev/null 2>&1
sed -e 's/s.apply_events_from(evs, &Source::Peer(from.into()))/{ let _ = from; s.apply_events(evs) }/' \
  "$root/store/tests/flood_bench.rs" > "$tmp/store/tests/flood_bench.rs"
echo "before: $(run "$tmp")"
# Both checkouts build into one target directory, where cargo names a
# workspace member's artifacts without its path: make it rebuild ours.
touch "$root"/store/src/*.rs "$root"/store/tests/*.rs
echo "after:  $(run "$root")"
