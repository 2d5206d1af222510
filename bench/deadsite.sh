#!/usr/bin/env bash
# A destination that is down: the issue's new-user run. N messages for one site that answers
# every connection with a 421 greeting, epoxi retrying every 2 s (retry_base_ms = 2000,
# retry_factor = 1.0), for SECS seconds; once with the dead-site backoff (default) and once
# without it (delivery.site_failures_max = 0). Reports, per run: connections the site got per
# second, reception rate, delivery attempts (TransientFailure lines) per message, and event log
# bytes. Loopback only, bounded counts; everything started here is stopped and deleted here.
#
# Usage: bench/deadsite.sh     Knobs: MESSAGES=100000 SECS=60 SHARDS=2 NO_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-100000}
SECS=${SECS:-60}
SHARDS=${SHARDS:-2}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=${EPOXI_BIN:-target/release/epoxi}
LOADGEN=target/release/epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-deadsite.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
json() { python3 -c "import json,sys; d=json.loads(sys.stdin.readline()); print(d$1)"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

printf '%-9s %9s %12s %14s %18s %12s\n' backoff messages conn_per_s inject_msg_s attempts_per_msg log_mb
for failures in 5 0; do
  rm -rf "$work/spool" "$work/log"
  sport=$(free_port)
  "$LOADGEN" sink --listen "127.0.0.1:$sport" --greet-421-secs 100000 >"$work/sink.json" 2>"$work/sink.err" &
  spid=$!; pids+=($spid)
  cat >"$work/epoxi.toml" <<CONF
[queue]
retry_base_ms = 2000
retry_factor = 1.0
retry_cap_ms = 2000
[delivery]
site_failures_max = $failures
CONF
  eport=$(free_port)
  "$EPOXI" serve --config "$work/epoxi.toml" --listen "127.0.0.1:$eport" --shards "$SHARDS" \
    --spool "$work/spool" --log-dir "$work/log" --route "*.test=127.0.0.1:$sport" 2>"$work/epoxi.err" &
  epid=$!; pids+=($epid)
  for _ in $(seq 200); do grep -q "listening on" "$work/epoxi.err" && break; sleep 0.05; done
  start=$(date +%s.%N)
  "$LOADGEN" inject --target "127.0.0.1:$eport" --messages "$MESSAGES" --connections 64 \
    --size 1024 --domains 50 >"$work/inject.json"
  rest=$(python3 -c "print(max(0, $SECS - ($(date +%s.%N) - $start)))")
  sleep "$rest"
  kill -TERM "$epid"; wait "$epid" || true
  kill -TERM "$spid"; wait "$spid" || true
  conns=$(json "['greeting_refused']" <"$work/sink.json" 2>/dev/null || echo 0)
  rate=$(json "['msgs_per_s']" <"$work/inject.json")
  attempts=$(cat "$work"/log/* | grep -c '"TransientFailure"' || true)
  bytes=$(cat "$work"/log/* | wc -c)
  printf '%-9s %9s %12s %14s %18s %12s\n' "$([ "$failures" = 0 ] && echo off || echo on)" "$MESSAGES" \
    "$(python3 -c "print(round($conns / $SECS, 1))")" "$rate" \
    "$(python3 -c "print(round($attempts / $MESSAGES, 2))")" "$(python3 -c "print(round($bytes / 1e6, 1))")"
done
