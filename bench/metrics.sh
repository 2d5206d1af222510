#!/usr/bin/env bash
# What scraping costs the hot path: relay throughput (1 KiB, inject -> epoxi -> sink through a
# static route, release build) while a client scrapes /metrics every second, against the same
# relay with nobody scraping; alternated in one run, RUNS times each. Prints every run, the
# medians and their ratio, and how long the scrapes took (curl's time_total, median and max).
#
# Usage: bench/metrics.sh   Knobs: RUNS=3 MESSAGES=60000 CONNECTIONS=64 DOMAINS=50 SHARDS=2
#                           SCRAPE_EVERY_S=1 NO_BUILD=1 EPOXI_ARGS="" (extra serve flags)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-60000}
CONNECTIONS=${CONNECTIONS:-64}
DOMAINS=${DOMAINS:-50}
SHARDS=${SHARDS:-2}
SCRAPE_EVERY_S=${SCRAPE_EVERY_S:-1}
EPOXI_ARGS=${EPOXI_ARGS:-}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=target/release/epoxi
LOADGEN=target/release/epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-metrics.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

json() { python3 -c "import json,sys; d=json.loads(sys.stdin.readline()); print(d$1)"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
wait_pid() { # wait for pid $1 up to $2 seconds
  for _ in $(seq $(( $2 * 20 ))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
  echo "timeout waiting for pid $1" >&2; return 1
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# One relay run; $1 = scrape | none. Prints "rate scrapes scrape_median_ms scrape_max_ms".
relay_run() {
  local mode=$1 n=$MESSAGES
  local sport eport hport
  sport=$(free_port); eport=$(free_port); hport=$(free_port)
  "$LOADGEN" sink --listen "127.0.0.1:$sport" --exit-after "$n" --idle-exit 60 \
    >"$work/sink.json" 2>"$work/sink.err" &
  local sink_pid=$!; pids+=("$sink_pid")
  for _ in $(seq 100); do grep -q "listening on" "$work/sink.err" 2>/dev/null && break; sleep 0.05; done
  rm -rf "$work/spool" "$work/log"
  # shellcheck disable=SC2086
  "$EPOXI" serve --listen "127.0.0.1:$eport" --http "127.0.0.1:$hport" --shards "$SHARDS" \
    --spool "$work/spool" --log-dir "$work/log" --route "*.test=127.0.0.1:$sport" $EPOXI_ARGS \
    2>"$work/epoxi.err" &
  local epid=$!; pids+=("$epid")
  for _ in $(seq 200); do grep -q "listening on" "$work/epoxi.err" && break; sleep 0.05; done
  : >"$work/scrapes"
  local scraper=""
  if [ "$mode" = scrape ]; then
    ( while :; do
        curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$hport/metrics" >>"$work/scrapes" || true
        sleep "$SCRAPE_EVERY_S"
      done ) &
    scraper=$!; pids+=("$scraper")
  fi
  local t0 t1
  t0=$(now)
  "$LOADGEN" inject --target "127.0.0.1:$eport" --messages "$n" --connections "$CONNECTIONS" \
    --size 1024 --domains "$DOMAINS" >"$work/inject.json"
  wait_pid "$sink_pid" 120
  t1=$(now)
  [ -z "$scraper" ] || { kill "$scraper" 2>/dev/null || true; wait "$scraper" 2>/dev/null || true; }
  # The last scrape, after the run: the figures are there (and the endpoint answers).
  local delivered
  delivered=$(curl -s "http://127.0.0.1:$hport/metrics" | awk '$1 == "epoxi_delivered_total{shard=\"all\"}" {print $2}')
  kill -TERM "$epid"; wait_pid "$epid" 30
  local unique
  unique=$(json "['unique']" <"$work/sink.json")
  [ "$unique" = "$n" ] && [ "$delivered" = "$n" ] || {
    echo "run lost messages or counts: sink unique=$unique, /metrics delivered=$delivered" >&2; exit 1; }
  local rate scrapes smed smax
  rate=$(python3 -c "print(round($n / ($t1 - $t0)))")
  scrapes=$(grep -c . "$work/scrapes" || true)
  if [ "$scrapes" -gt 0 ]; then
    smed=$(awk '{print $1 * 1000}' "$work/scrapes" | tr '\n' ' ' | median)
    smax=$(awk '{print $1 * 1000}' "$work/scrapes" | sort -g | tail -1)
  else
    smed=-; smax=-
  fi
  echo "$rate $scrapes $smed $smax"
}

declare -A rates
printf '%-4s %-7s %12s %8s %16s %13s\n' run mode relay_msg_s scrapes scrape_p50_ms scrape_max_ms
for run in $(seq 1 "$RUNS"); do
  for mode in scrape none; do
    read -r rate scrapes smed smax < <(relay_run "$mode")
    printf '%-4s %-7s %12s %8s %16s %13s\n' "$run" "$mode" "$rate" "$scrapes" "$smed" "$smax"
    rates[$mode]+="$rate "
  done
done
s=$(echo "${rates[scrape]}" | median)
x=$(echo "${rates[none]}" | median)
echo "median scrape: $s msg/s, none: $x msg/s, ratio scrape/none: $(python3 -c "print(f'{$s / $x:.3f}')")"
