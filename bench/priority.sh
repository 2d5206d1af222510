#!/usr/bin/env bash
# Priorities under a backlog, at the issue's scale: BULK (100,000) bulk messages queued to a
# site throttled to RATE (500/s) messages a second, then one transactional message. Prints
# how long the transactional one took from acceptance to delivery, and how many bulk messages
# were delivered meanwhile and in the 10 s after (bulk keeps going). Loopback only, every
# process stopped and every file removed at the end.
#
# Usage: bench/priority.sh     Knobs: BULK=100000 RATE=500 SHARDS=2 NO_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."
BULK=${BULK:-100000}
RATE=${RATE:-500}
SHARDS=${SHARDS:-2}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=target/release/epoxi
LOADGEN=target/release/epoxi-loadgen
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-priority.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

sport=$(free_port)
"$LOADGEN" sink --listen "127.0.0.1:$sport" >"$work/sink.json" 2>"$work/sink.err" &
pids+=($!)
printf '[[site]]\nmx = "127.0.0.1"\nmessage_rate = "%s/s"\n' "$RATE" >"$work/epoxi.toml"
eport=$(free_port)
"$EPOXI" serve --config "$work/epoxi.toml" --listen "127.0.0.1:$eport" --shards "$SHARDS" \
  --spool "$work/spool" --log-dir "$work/log" --route "*.test=127.0.0.1:$sport" 2>"$work/epoxi.err" &
pids+=($!)
for _ in $(seq 200); do grep -q "listening on" "$work/epoxi.err" && break; sleep 0.05; done

"$LOADGEN" inject --target "127.0.0.1:$eport" --messages "$BULK" --connections 32 --size 1024 \
  --domains 50 --header "X-Priority-Class: bulk" >"$work/bulk.json"
"$LOADGEN" inject --target "127.0.0.1:$eport" --messages 1 --size 1024 --domains 1 \
  --from tx@loadgen.test --header "X-Priority-Class: transactional" >"$work/tx.json"
# Wait up to 60 s for the transactional message's delivery, then 10 s more for bulk.
python3 - "$work/log" <<'PY'
import glob, json, sys, time
log = sys.argv[1]
def events():
    out = []
    for f in sorted(glob.glob(f"{log}/shard-*.jsonl")):
        with open(f) as fh:
            for line in fh:
                if line.endswith("\n"):
                    out.append(json.loads(line))
    return out
deadline = time.time() + 60
tx = None
while time.time() < deadline and tx is None:
    for e in events():
        if e.get("type") == "Delivery" and e.get("sender") == "tx@loadgen.test":
            tx = e
    time.sleep(0.2)
if tx is None:
    sys.exit("the transactional message was not delivered within 60 s")
time.sleep(10)
ev = events()
bulk = [e for e in ev if e.get("type") == "Delivery" and e.get("sender") != "tx@loadgen.test"]
received = [e for e in ev if e.get("type") == "Reception" and e.get("sender") == "tx@loadgen.test"]
accepted_at = tx["received_ms"]
before = sum(1 for e in bulk if e["ts_ms"] <= tx["ts_ms"])
after = sum(1 for e in bulk if tx["ts_ms"] < e["ts_ms"] <= tx["ts_ms"] + 10_000)
print(f"transactional delivered {tx['ts_ms'] - accepted_at} ms after acceptance; "
      f"bulk delivered before it: {before}, in the 10 s after: {after}, "
      f"still queued: about {len([1 for e in ev if e.get('type') == 'Reception']) - 1 - len(bulk)}")
PY
