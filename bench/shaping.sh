#!/usr/bin/env bash
# What traffic shaping costs: bench/e2e.sh (1 KiB, relay through a static route) with a
# realistic shaping configuration against the same egress without one, alternated, RUNS
# times each; prints every run and the medians.
#
# The realistic configuration (written to a temporary file):
#   - 5 egress sources (127.0.0.2-6) in one pool, both runs;
#   - 100 [[site]] rules (99 for other sites, one for the bench route's host with a
#     message rate per source and a site rate high enough not to throttle: the credit path
#     runs for every message) and the built-in providers;
#   - 3 priority classes (weights 16, 4, 1; the injected mail is all of one class);
#   - a tenant rate and 4 adaptive rules (matching nothing the sink answers);
# against: the same sources and pool, `provider_defaults = false`, nothing else.
#
# Usage: bench/shaping.sh   Knobs: RUNS=3 MESSAGES_1024=60000 NO_BUILD=1 SHARDS=2
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p epoxi -p epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-shaping.XXXXXX")
trap 'rm -rf "$work"' EXIT

sources() {
  for i in 2 3 4 5 6; do
    printf '[[source]]\nname = "ip%s"\naddress = "127.0.0.%s"\n' "$i" "$i"
  done
  printf '[[pool]]\nname = "main"\nsources = ["ip2", "ip3", "ip4", "ip5", "ip6"]\n'
  printf '[egress]\ndefault_pool = "main"\n'
}

{
  sources
  printf '[shaping]\nprovider_defaults = false\n'
} >"$work/none.toml"

{
  sources
  printf '[queue]\npriority_weights = [16, 4, 1]\n'
  for i in $(seq 1 99); do
    printf '[[site]]\nmx = "*.mx%s.example"\nconnections_max = %s\nmessage_rate = "%s/s"\n' "$i" $((i % 20 + 1)) $((i * 10))
  done
  printf '[[site]]\nmx = "127.0.0.1"\nmessage_rate = "200000/s"\nsite_message_rate = "500000/s"\nconnections_max = 16\n'
  printf '[[tenant]]\nname = "acme"\nmessage_rate = "1000/s"\n'
  for i in 1 2 3 4; do
    printf '[[adaptive]]\nname = "rule%s"\nregex = "^4%s1 4\\\\.7\\\\.%s .*rate limited"\nthreshold = "5/60s"\naction = "suspend"\nduration = "5m"\n' "$i" "$i" "$i"
  done
} >"$work/shaped.toml"

target/release/epoxi check-config --config "$work/shaped.toml" >/dev/null
target/release/epoxi check-config --config "$work/none.toml" >/dev/null

declare -A rates cpus
for run in $(seq 1 "$RUNS"); do
  for mode in shaped none; do
    out=$(NO_BUILD=1 SIZES=1024 EPOXI_ARGS="--config $work/$mode.toml" bench/e2e.sh 2>&1 | tail -3)
    echo "run $run $mode: $(echo "$out" | grep -E '^ *1024' || echo "$out")"
    line=$(echo "$out" | grep -E '^ *1024' | head -1)
    rates[$mode]+="$(echo "$line" | awk '{print $4}') "
    cpus[$mode]+="$(echo "$line" | awk '{print $6}') "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for mode in shaped none; do
  echo "median $mode: relay $(echo "${rates[$mode]}" | median) msg/s, $(echo "${cpus[$mode]}" | median) us CPU/msg"
done
