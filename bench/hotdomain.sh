#!/usr/bin/env bash
# One hot recipient domain: how the shards share the work, with and without spreading it
# ([[domain]] shards = N). Relays MESSAGES x SIZE to one domain (d0.test) through epoxi to the
# loadgen sink and reports each shard thread's CPU share. Loopback only, bounded; every process
# started here is stopped here.
#
# Usage: bench/hotdomain.sh    Knobs: MESSAGES=50000 SIZE=1024 SHARDS=2 CONNECTIONS=64
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-50000}
SIZE=${SIZE:-1024}
SHARDS=${SHARDS:-2}
CONNECTIONS=${CONNECTIONS:-64}
cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=${EPOXI_BIN:-target/release/epoxi}
LOADGEN=target/release/epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-hot.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_pid() { for _ in $(seq $(( $2 * 20 ))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done; return 1; }
# Ticks (user + system) of each shard thread of process $1, as "shard-0 N shard-1 M ...".
shard_ticks() {
  for t in /proc/"$1"/task/*; do
    name=$(cat "$t/comm")
    case "$name" in shard-*) echo "$name $(awk '{print $14 + $15}' "$t/stat")";; esac
  done | sort
}
run() { # $1: spread (1 = off)
  local spread=$1 sink_port port sink epid
  sink_port=$(free_port); port=$(free_port)
  "$LOADGEN" sink --listen "127.0.0.1:$sink_port" --exit-after "$MESSAGES" --idle-exit 60 >"$work/sink.json" 2>"$work/sink.err" &
  sink=$!; pids+=("$sink")
  for _ in $(seq 100); do grep -q "listening on" "$work/sink.err" 2>/dev/null && break; sleep 0.05; done
  printf '[shards]\npin = false\n[[domain]]\nname = "d0.test"\nshards = %s\n' "$spread" >"$work/epoxi.toml"
  rm -rf "$work/spool" "$work/log"
  "$EPOXI" serve --config "$work/epoxi.toml" --listen "127.0.0.1:$port" --shards "$SHARDS" \
    --spool "$work/spool" --log-dir "$work/log" --route "*.test=127.0.0.1:$sink_port" \
    </dev/null >/dev/null 2>"$work/epoxi.err" &
  epid=$!; pids+=("$epid")
  for _ in $(seq 200); do grep -q "listening on" "$work/epoxi.err" && break; sleep 0.05; done
  shard_ticks "$epid" >"$work/before"
  "$LOADGEN" inject --target "127.0.0.1:$port" --messages "$MESSAGES" --connections "$CONNECTIONS" \
    --size "$SIZE" --domains 1 >"$work/inject.json"
  wait_pid "$sink" 120
  shard_ticks "$epid" >"$work/after"
  kill -TERM "$epid"; wait_pid "$epid" 30
  python3 - "$spread" "$work/before" "$work/after" "$(cat "$work/sink.json")" <<'PY'
import json, sys
spread = sys.argv[1]
def read(p):
    out = {}
    for line in open(p):
        name, ticks = line.split()
        out[name] = out.get(name, 0) + int(ticks)
    return out
b, a = read(sys.argv[2]), read(sys.argv[3])
used = {k: a[k] - b.get(k, 0) for k in a}
total = sum(used.values()) or 1
sink = json.loads(sys.argv[4])
print(json.dumps({"domain_shards": int(spread), "ticks": used,
                  "busiest_share": round(max(used.values()) / total, 3),
                  "unique": sink["unique"], "duplicates": sink["duplicates"]}))
PY
}
run 1
run "$SHARDS"
