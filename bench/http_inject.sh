#!/usr/bin/env bash
# HTTP injection throughput: REQUESTS requests of RCPTS recipients each (a built message with
# per-recipient substitutions) posted to POST /api/inject/v1 by CLIENTS concurrent clients
# (Python's http.client, keep-alive), delivered to the loadgen sink. Each answer comes only
# once every message of the request is durable, so this measures messages generated and
# fdatasync'd per second. Three runs; prints each and the median. Loopback only, every process
# stopped and every file removed at the end.
#
# Usage: bench/http_inject.sh   Knobs: RCPTS=1000 REQUESTS=20 CLIENTS=2 SHARDS=2 NO_BUILD=1
#        EPOXI=path/to/epoxi (default target/release/epoxi)
set -euo pipefail
cd "$(dirname "$0")/.."
RCPTS=${RCPTS:-1000}
REQUESTS=${REQUESTS:-20}
CLIENTS=${CLIENTS:-2}
SHARDS=${SHARDS:-2}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p epoxi -p epoxi-loadgen
EPOXI=${EPOXI:-target/release/epoxi}
LOADGEN=${LOADGEN:-$(dirname "$EPOXI")/epoxi-loadgen}
work=$(mktemp -d "${TMPDIR:-/tmp}/epoxi-http-inject.XXXXXX")
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
printf '[queue]\nmessages_max = 1000000\n' >"$work/epoxi.toml"
eport=$(free_port)
hport=$(free_port)
"$EPOXI" serve --config "$work/epoxi.toml" --listen "127.0.0.1:$eport" --shards "$SHARDS" \
  --http "127.0.0.1:$hport" --spool "$work/spool" --log-dir "$work/log" \
  --route "*.test=127.0.0.1:$sport" 2>"$work/epoxi.err" &
pids+=($!)
for _ in $(seq 400); do grep -q "listening on" "$work/epoxi.err" && break; sleep 0.05; done

python3 - "$hport" "$RCPTS" "$REQUESTS" "$CLIENTS" <<'PY'
import http.client, json, statistics, sys, threading, time
port, rcpts, requests, clients = map(int, sys.argv[1:5])

def body(run, req):
    return json.dumps({
        "envelope_sender": "bench@sender.test",
        "content": {"subject": "Order {{ n }} for {{ name }}",
                    "text_body": "Dear {{ name }},\nyour order {{ n }} ships today.\n",
                    "html_body": "<p>Dear {{ name }}, order <b>{{ n }}</b></p>",
                    "from": {"email": "shop@sender.test", "name": "Shop"}},
        "recipients": [{"email": f"u{run}-{req}-{i}@d{i % 50}.test", "name": f"User {i}",
                        "substitutions": {"n": i}} for i in range(rcpts)],
    }).encode()

def run(n):
    bodies = [body(n, r) for r in range(requests)]
    done, errors = [0], []
    lock = threading.Lock()
    def client(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for r in range(k, requests, clients):
            c.request("POST", "/api/inject/v1", bodies[r], {"Content-Type": "application/json"})
            resp = c.getresponse()
            answer = json.loads(resp.read())
            with lock:
                if resp.status != 200 or answer.get("fail_count"):
                    errors.append((resp.status, answer.get("errors", answer)[:3]))
                done[0] += answer.get("success_count", 0)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.monotonic()
    for t in threads: t.start()
    for t in threads: t.join()
    secs = time.monotonic() - start
    if errors:
        sys.exit(f"run {n}: failures: {errors[:3]}")
    rate = done[0] / secs
    print(f"run {n}: {done[0]} messages in {secs:.2f} s: {rate:,.0f} messages/s injected")
    return rate

rates = [run(n) for n in range(3)]
print(f"median of 3: {statistics.median(rates):,.0f} messages/s "
      f"({rcpts} recipients per request, {requests} requests, {clients} clients)")
PY
