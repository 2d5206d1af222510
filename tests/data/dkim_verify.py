"""Verifies every DKIM-Signature of stored messages with dkimpy, an independent verifier. DNS
is not asked: the key records come from the command line.

Usage: python3 dkim_verify.py KEYS_FILE MESSAGE...
KEYS_FILE has lines `selector._domainkey.domain TXT-VALUE`.
Prints one JSON object a message: {"file": ..., "signatures": N, "results": [bool, ...],
"domains": [...]}.
"""
import json
import sys

import dkim


def main():
    keys = {}
    with open(sys.argv[1], encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if line:
                name, value = line.split(" ", 1)
                keys[name.lower().rstrip(".")] = value.encode("ascii")

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii")
        return keys.get(name.lower().rstrip("."))

    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            message = f.read()
        d = dkim.DKIM(message, minkey=1024)
        sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
        results, domains = [], []
        for i in range(len(sigs)):
            try:
                ok = bool(d.verify(idx=i, dnsfunc=dnsfunc))
            except Exception as e:  # a verifier error is a failed signature, with its reason
                print(f"{path}: signature {i}: {e}", file=sys.stderr)
                ok = False
            results.append(ok)
            domains.append(d.domain.decode() if d.domain else None)
        print(json.dumps({"file": path, "signatures": len(sigs), "results": results,
                          "domains": domains}), flush=True)


if __name__ == "__main__":
    main()
