#!/usr/bin/env python3
"""A bounded load run against a gateway on loopback: N POST /v1/calls at concurrency C.

Reports status counts, throughput and latency percentiles. Loopback only, bounded in count and
time; it stops by itself.

    python3 scripts/load.py --url http://127.0.0.1:8080 --key demo-acme-key -n 500 -c 8
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse
from collections import Counter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key", default="demo-acme-key")
    ap.add_argument("-n", type=int, default=500, help="requests in all (at most 100000)")
    ap.add_argument("-c", type=int, default=8, help="concurrent connections (at most 64)")
    ap.add_argument("--timeout", type=float, default=60.0, help="stop after this many seconds")
    args = ap.parse_args()
    target = urllib.parse.urlparse(args.url)
    if target.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load runs against loopback only")
    n, c = min(args.n, 100_000), max(1, min(args.c, 64))
    body = json.dumps({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 60})
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    lock = threading.Lock()
    remaining = [n]
    latencies, statuses = [], Counter()
    deadline = time.monotonic() + args.timeout

    def worker():
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/calls", body, headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except Exception:
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
                status = "error"
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0

    print(f"requests {len(latencies)} in {wall:.2f}s: {len(latencies) / wall:.0f}/s at concurrency {c}")
    print(f"status {dict(statuses)}")
    print(f"latency ms p50 {pct(0.50):.2f} p90 {pct(0.90):.2f} p99 {pct(0.99):.2f} max {pct(1.0):.2f}")


if __name__ == "__main__":
    main()
