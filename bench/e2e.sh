#!/usr/bin/env bash
# End-to-end benchmark: in one run, for each message size, the direct path (inject -> sink) and
# the relay path (inject -> epoxi -> sink), both rates, their ratio, and the CPU time epoxi spent
# per relayed message. Loopback only, bounded counts; every process started here is stopped here.
#
# Usage: bench/e2e.sh            (builds release binaries first)
# Knobs (environment): SIZES="1024 102400"  MESSAGES_1024=60000  MESSAGES_102400=10000
#                      CONNECTIONS=64  DOMAINS=50  SHARDS=2  EPOXI_ARGS="" (extra serve flags)
#                      MX=1: relay through epoxi's MX path instead of a static route. A fresh
#                      `epoxi-loadgen dns` per size serves '*.test MX 10 mx.bench.test' (the
#                      recipient domains and the sender's, loadgen.test) and
#                      'mx.bench.test A 127.0.0.1', and epoxi runs with --resolver (that
#                      server) and --delivery-port (the sink's). The dns_queries column is the
#                      queries epoxi sent it; with its cache, one MX query per domain and the MX
#                      host's A and AAAA once per shard (54 for 50 domains on 2 shards).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"1024 102400"}
CONNECTIONS=${CONNECTIONS:-64}
DOMAINS=${DOMAINS:-50}
SHARDS=${SHARDS:-2}
EPOXI_ARGS=${EPOXI_ARGS:-}
MX=${MX:-0}

[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=${EPOXI_BIN:-target/release/epoxi}
LOADGEN=target/release/epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-e2e.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

json() { python3 -c "import json,sys; d=json.loads(sys.stdin.readline()); print(d$1)"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_s=$(getconf CLK_TCK)

# Start a sink that exits after $1 unique messages; sets sink_port and sink_pid.
start_sink() {
  local n=$1 out=$2
  sink_port=$(free_port)
  "$LOADGEN" sink --listen "127.0.0.1:$sink_port" --exit-after "$n" --idle-exit 60 >"$out" 2>"$out.err" &
  sink_pid=$!
  pids+=("$sink_pid")
  for _ in $(seq 100); do grep -q "listening on" "$out.err" 2>/dev/null && break; sleep 0.05; done
}

# Start the DNS server of MX mode, on a port it picks; sets dns_port and dns_pid. It prints its
# report to $1 when stopped.
start_dns() {
  local out=$1
  "$LOADGEN" dns --listen 127.0.0.1:0 --mx '*.test=10:mx.bench.test' \
    --a 'mx.bench.test=127.0.0.1' >"$out" 2>"$out.err" &
  dns_pid=$!
  pids+=("$dns_pid")
  for _ in $(seq 100); do grep -q "listening on" "$out.err" 2>/dev/null && break; sleep 0.05; done
  dns_port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$out.err")
  [ -n "$dns_port" ] || { echo "the DNS server did not start: $(cat "$out.err")" >&2; exit 1; }
}

wait_pid() { # wait for pid $1 up to $2 seconds
  for _ in $(seq $(( $2 * 20 ))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
  echo "timeout waiting for pid $1" >&2; return 1
}

row='%-8s %-9s %12s %12s %8s %14s %10s %10s'
header=(size messages direct_msg_s relay_msg_s ratio epoxi_cpu_us_msg accept_p50 accept_p99)
if [ "$MX" = 1 ]; then row+=' %11s'; header+=(dns_queries); fi
# shellcheck disable=SC2059
printf "$row\n" "${header[@]}"
for size in $SIZES; do
  var="MESSAGES_$size"; n=${!var:-$([ "$size" -le 4096 ] && echo 60000 || echo 10000)}

  # Direct path.
  start_sink "$n" "$work/direct.json"; sport=$sink_port
  t0=$(now)
  "$LOADGEN" inject --target "127.0.0.1:$sport" --messages "$n" --connections "$CONNECTIONS" \
    --size "$size" --domains "$DOMAINS" >"$work/direct-inject.json"
  wait_pid "$sink_pid" 60
  t1=$(now)
  direct=$(python3 -c "print(round($n / ($t1 - $t0)))")

  # Relay path, on a fresh spool.
  start_sink "$n" "$work/relay.json"; sport=$sink_port
  eport=$(free_port)
  rm -rf "$work/spool" "$work/log"
  if [ "$MX" = 1 ]; then
    start_dns "$work/dns.json"
    delivery=(--resolver "127.0.0.1:$dns_port" --delivery-port "$sport")
  else
    delivery=(--route "*.test=127.0.0.1:$sport")
  fi
  # shellcheck disable=SC2086
  "$EPOXI" serve --listen "127.0.0.1:$eport" --shards "$SHARDS" --spool "$work/spool" \
    --log-dir "$work/log" "${delivery[@]}" $EPOXI_ARGS 2>"$work/epoxi.err" &
  epid=$!; pids+=($epid)
  for _ in $(seq 200); do grep -q "listening on" "$work/epoxi.err" && break; sleep 0.05; done
  c0=$(cpu_ticks "$epid")
  t0=$(now)
  "$LOADGEN" inject --target "127.0.0.1:$eport" --messages "$n" --connections "$CONNECTIONS" \
    --size "$size" --domains "$DOMAINS" >"$work/relay-inject.json"
  wait_pid "$sink_pid" 120
  t1=$(now)
  c1=$(cpu_ticks "$epid")
  kill -TERM "$epid"; wait_pid "$epid" 30
  cols=()
  if [ "$MX" = 1 ]; then
    kill -TERM "$dns_pid"; wait_pid "$dns_pid" 30
    cols+=("$(json "['queries']" <"$work/dns.json")")
  fi
  accepted=$(json "['accepted']" <"$work/relay-inject.json")
  unique=$(json "['unique']" <"$work/relay.json")
  [ "$accepted" = "$n" ] && [ "$unique" = "$n" ] || { echo "relay lost messages: accepted=$accepted unique=$unique" >&2; exit 1; }
  relay=$(python3 -c "print(round($n / ($t1 - $t0)))")
  ratio=$(python3 -c "print(f'{$relay / $direct:.3f}')")
  cpu_us=$(python3 -c "print(round(($c1 - $c0) / $ticks_per_s * 1e6 / $n, 1))")
  p50=$(json "['latency_ms']['p50']" <"$work/relay-inject.json")
  p99=$(json "['latency_ms']['p99']" <"$work/relay-inject.json")
  # shellcheck disable=SC2059
  printf "$row\n" "$size" "$n" "$direct" "$relay" "$ratio" "$cpu_us" "$p50" "$p99" "${cols[@]}"
done
