#!/usr/bin/env bash
# Memory and recovery with a big queue: N messages (default 1,000,000 x 1 KiB) for a destination
# that is down (nothing listens), then RSS per queued message, a restart, the recovery time and
# RSS again. Loopback only; the spool (about 1.5 GB for 1M) and the event log are written to a
# temporary directory and deleted at the end; every process started here is stopped here.
#
# Usage: bench/memory.sh      Knobs: MESSAGES=1000000 SIZE=1024 SHARDS=2 CONNECTIONS=64
#                            EPOXI_BIN=path (another build) NO_QUEUE_LIMIT=1 (builds before it)
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-1000000}
SIZE=${SIZE:-1024}
SHARDS=${SHARDS:-2}
CONNECTIONS=${CONNECTIONS:-64}
cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=${EPOXI_BIN:-target/release/epoxi}
LOADGEN=target/release/epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-mem.XXXXXX")
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
dead=$(free_port)
port=$(free_port)
# NO_QUEUE_LIMIT=1 leaves queue.messages_max out (for builds from before it existed).
if [ "${NO_QUEUE_LIMIT:-0}" = 1 ]; then
  printf '[shards]\npin = false\n' >"$work/epoxi.toml"
else
  printf '[queue]\nmessages_max = %s\n[shards]\npin = false\n' $(( MESSAGES + 1000 )) >"$work/epoxi.toml"
fi
start() { # start epoxi; sets pid and started_s (seconds until it listens)
  local t0 t1
  t0=$(date +%s.%N)
  "$EPOXI" serve --config "$work/epoxi.toml" --listen "127.0.0.1:$port" --shards "$SHARDS" \
    --spool "$work/spool" --log-dir "$work/log" --route "*.test=127.0.0.1:$dead" \
    </dev/null >/dev/null 2>"$work/epoxi.err" &
  pid=$!
  for _ in $(seq 6000); do
    grep -q "listening on" "$work/epoxi.err" && break
    kill -0 "$pid" 2>/dev/null || { echo "epoxi did not start: $(cat "$work/epoxi.err")" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(date +%s.%N)
  started_s=$(python3 -c "print(round($t1 - $t0, 2))")
}
start
sleep 1
idle=$(rss_kb "$pid")
"$LOADGEN" inject --target "127.0.0.1:$port" --messages "$MESSAGES" --connections "$CONNECTIONS" \
  --size "$SIZE" --domains 50 >"$work/inject.json"
# Let the first (refused) attempts settle: every message deferred.
sleep 5
queued=$(rss_kb "$pid")
kill -TERM "$pid"; wait "$pid" || true; pid=""
spool_mb=$(du -sm "$work/spool" | cut -f1)
start
recovery_s=$started_s
# RSS right after recovery holds the freed segment buffers until the allocator returns them;
# the figure that counts is once it settled.
sleep 2
restarted_early=$(rss_kb "$pid")
sleep 10
restarted=$(rss_kb "$pid")
recovered=$(grep -o "[0-9]* messages pending" "$work/epoxi.err" | awk '{s+=$1} END{print s}')
kill -TERM "$pid"; wait "$pid" || true; pid=""
python3 - "$MESSAGES" "$idle" "$queued" "$restarted" "$recovery_s" "$recovered" "$spool_mb" "$(cat "$work/inject.json")" "$restarted_early" <<'PY'
import json, sys
n, idle, queued, restarted = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
inject = json.loads(sys.argv[8])
early = int(sys.argv[9])
print(json.dumps({
    "messages": n, "accepted": inject["accepted"], "inject_msgs_per_s": inject["msgs_per_s"],
    "rss_idle_mb": round(idle / 1024, 1), "rss_queued_mb": round(queued / 1024, 1),
    "bytes_per_message": round((queued - idle) * 1024 / n, 1),
    "rss_2s_after_restart_mb": round(early / 1024, 1),
    "rss_after_restart_mb": round(restarted / 1024, 1),
    "bytes_per_message_after_restart": round((restarted - idle) * 1024 / n, 1),
    "recovery_s": float(sys.argv[5]), "recovered_pending": int(sys.argv[6]),
    "spool_mb": int(sys.argv[7]),
}))
PY
