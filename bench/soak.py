#!/usr/bin/env python3
"""Soak: N minutes of mixed traffic from several tenants through callgate to the simulator with
injected upstream faults and gateway restarts, then a call-by-call check that the state store's
slots, holds and spend equal what the simulator says happened.

    cargo build --release
    bash bench/soak.sh                 # 10 minutes (MINUTES=2 for a short run)

Everything runs on loopback in a temp dir: `callgate simulator` (standalone, with
`[faults]`), `callgate serve` on SQLite (`synchronous = "full"`), and this script's worker
threads. Not run in CI. Exit status 0 only when every check holds.

The faults (shares of requests or events, chosen at random by the simulator):
- errors: `POST /v1/calls` answered 500, nothing placed: the gateway must release at once;
- resets: the connection closed with no answer, nothing placed: the gateway cannot know, so the
  reservation is kept and its lease ends it at the full hold (the documented rule);
- hangs: the call placed, its answer held past the gateway's timeout: the call's events (they
  carry its relay token) must bind it and it is charged its real duration;
- lost events: never sent: the reconciler (`GET /v1/calls/{id}`, itself failing at random)
  must settle what the final event would have;
- restarts: the gateway stopped every RESTART_EVERY seconds, alternately SIGTERM (graceful)
  and SIGKILL (`kill -9`), and started again at once.

The check, after the traffic stops and every call and lease has run out:
1. no live slot and no hold is left, in the counters (admin usage) or in the file;
2. the counters equal the file (spend = sum of charges), again after one more restart;
3. every call the simulator placed is in the store under the reservation that placed it
   (read from its relay URL) and is charged exactly its started increments of the simulator's
   duration (or, only for a call the gateway could not learn of, its full hold);
4. every other row is a request the simulator dropped with no answer (a reset) or one cut off
   by a `kill -9` before it reached the simulator, charged its hold; nothing else;
5. the audit trail's hash chain verifies.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCOUNT_KEY = "sk_soak_account_key"
ADMIN_TOKEN = "soak-admin-token"
MAX_DURATION = 20
UPSTREAM_TIMEOUT_MS = 1500
LEASE_GRACE = 5
INF = float("inf")

# id, key, policy additions. Prices differ so that every charge rule is exercised.
TENANTS = [
    ("soak-a", "soak-key-a", "[limits]\nmax_concurrent_calls = 40\n"
     "[budget]\ncredits = 100000000\nperiod = \"none\"\nprice_per_increment = 1\nincrement_secs = 1\n"),
    ("soak-b", "soak-key-b", "[limits]\nmax_concurrent_calls = 15\n"
     "[budget]\ncredits = 100000000\nperiod = \"none\"\nprice_per_increment = 2\nincrement_secs = 5\n"),
    # A small budget: runs out part-way, so refusals for credit are in the mix.
    ("soak-c", "soak-key-c", "[limits]\nmax_concurrent_calls = 8\n"
     "[budget]\ncredits = 4000\nperiod = \"none\"\nprice_per_increment = 1\nincrement_secs = 1\n"),
]
IDEMPOTENT = {"soak-b"}  # sends an Idempotency-Key and retries a 5xx or a reset once with it


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, within=30):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def sha256_hex(text):
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


def charge_for(duration, increment, price, hold):
    increments = (max(duration, 0) + increment - 1) // increment
    return min(increments * price, hold)


def request(port, method, path, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Soak:
    def __init__(self, args):
        self.args = args
        self.bin = args.bin
        self.dir = tempfile.mkdtemp(prefix="callgate-soak-")
        self.sim_port, self.gw_port, self.admin_port = free_port(), free_port(), free_port()
        self.gateway = None
        self.gateway_lock = threading.Lock()
        self.stop = threading.Event()
        self.stats = defaultdict(Counter)
        self.stats_lock = threading.Lock()
        self.restarts = Counter()
        self.ids = defaultdict(list)

    # --- set-up -----------------------------------------------------------------------------

    def write_files(self):
        d = self.dir
        policies = os.path.join(d, "policies")
        shutil.copytree(os.path.join(REPO, "policies"), policies)
        for f in os.listdir(os.path.join(policies, "tenants")):
            os.remove(os.path.join(policies, "tenants", f))
        for tid, key, extra in TENANTS:
            with open(os.path.join(policies, "tenants", f"{tid}.toml"), "w") as f:
                f.write(f'id = "{tid}"\nkey_sha256 = ["{sha256_hex(key)}"]\n'
                        '[numbers]\nfrom_allow = ["+18005551234"]\nfrom_default = "+18005551234"\n'
                        '[agents]\nallow = ["agent_abc123"]\n'
                        f'[calls]\nmax_duration = {MAX_DURATION}\n'
                        '[redaction]\n[[redaction.patterns]]\nkind = "email"\naction = "mask"\n'
                        + extra)
        a = self.args
        with open(os.path.join(d, "sim.toml"), "w") as f:
            f.write(f"""queue_ms = 100
ring_ms = 400
talk_ms = 2000
talk_jitter_ms = 8000
max_concurrent_calls = 100000
keep_calls = 2000000

[faults]
error_rate = {a.error_rate}
reset_rate = {a.reset_rate}
hang_rate = {a.hang_rate}
hang_ms = {UPSTREAM_TIMEOUT_MS + 1500}
lost_event_rate = {a.lost_event_rate}
lookup_error_rate = {a.lookup_error_rate}
""")
        for name, value in (("upstream_api_key", ACCOUNT_KEY), ("admin_token", ADMIN_TOKEN),
                            ("hash_key", "soak-hash-key")):
            with open(os.path.join(d, name), "w") as f:
                f.write(value + "\n")
        with open(os.path.join(d, "callgate.toml"), "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{self.gw_port}"
shutdown_grace_ms = 3000

[upstream]
url = "http://127.0.0.1:{self.sim_port}"
api_key_file = "upstream_api_key"
connect_timeout_ms = 1000
request_timeout_ms = {UPSTREAM_TIMEOUT_MS}

[policies]
dir = "policies"

[redaction]
hash_key_file = "hash_key"

[log]
format = "json"
level = "info"

[audit]
path = "audit.jsonl"

[admission]
account_max_concurrent_calls = 1000
lease_grace_secs = {LEASE_GRACE}

[state]
backend = "sqlite"
path = "state/callgate.db"
synchronous = "full"
sweep_interval_ms = 1000

[relay]
public_url = "http://127.0.0.1:{self.gw_port}"

[reconcile]
enabled = true
interval_ms = 2000
quiet_after_secs = 5
refresh_on_read = true

[admin]
listen = "127.0.0.1:{self.admin_port}"
token_file = "admin_token"
""")

    def start_simulator(self):
        self.sim_log = open(os.path.join(self.dir, "simulator.log"), "w")
        self.sim = subprocess.Popen(
            [self.bin, "simulator", "--listen", f"127.0.0.1:{self.sim_port}",
             "--api-key", ACCOUNT_KEY, "--settings", "sim.toml"],
            cwd=self.dir, stdout=self.sim_log, stderr=subprocess.STDOUT)
        if not wait_port(self.sim_port):
            raise SystemExit("the simulator did not start")

    def start_gateway(self):
        log = open(os.path.join(self.dir, "gateway.log"), "a")
        proc = subprocess.Popen([self.bin, "serve", "--config", "callgate.toml"],
                                cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        if not (wait_port(self.gw_port) and wait_port(self.admin_port)):
            raise SystemExit("the gateway did not start: see " + os.path.join(self.dir, "gateway.log"))
        self.gateway = proc

    def restart_gateway(self, sig):
        with self.gateway_lock:
            started = time.monotonic()
            self.gateway.send_signal(sig)
            self.gateway.wait(timeout=30)
            self.start_gateway()
            self.restarts[signal.Signals(sig).name] += 1
            return time.monotonic() - started

    # --- traffic ----------------------------------------------------------------------------

    def count(self, tenant, what):
        with self.stats_lock:
            self.stats[tenant][what] += 1

    def worker(self, tenant, key):
        rng = random.Random()
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        n = 0
        while not self.stop.is_set():
            n += 1
            roll = rng.random()
            try:
                if roll < 0.80:
                    body = json.dumps({
                        "phone_number": f"+1415555{rng.randrange(10000):04d}",
                        "agent_id": "agent_abc123",
                        "max_duration": rng.choice([10, 15, MAX_DURATION]),
                        "metadata": {"note": f"reach me at user{n}@example.com"},
                    })
                    headers = dict(auth)
                    if tenant in IDEMPOTENT:
                        headers["Idempotency-Key"] = f"{tenant}-{threading.get_ident()}-{n}"
                    tries = 2 if tenant in IDEMPOTENT else 1
                    for attempt in range(tries):
                        try:
                            status, data = request(self.gw_port, "POST", "/v1/calls", body, headers)
                        except OSError:
                            status, data = "reset", b""
                        label = f"POST {status}"
                        if status not in (200, "reset") and data:
                            try:
                                label += " " + json.loads(data)["error"]["code"]
                            except (ValueError, KeyError, TypeError):
                                pass
                        if attempt:
                            label = "retry " + label
                        self.count(tenant, label)
                        if status == 200:
                            self.ids[tenant].append(json.loads(data)["id"])
                            break
                        if status != "reset" and (not isinstance(status, int) or status < 500):
                            break
                elif roll < 0.88:
                    body = json.dumps({"phone_number": "+1415", "agent_id": "agent_abc123"})
                    status, _ = request(self.gw_port, "POST", "/v1/calls", body, auth)
                    self.count(tenant, f"bad POST {status}")
                elif roll < 0.95:
                    status, _ = request(self.gw_port, "GET", "/v1/calls?limit=10", None, auth)
                    self.count(tenant, f"GET list {status}")
                else:
                    ids = self.ids[tenant]
                    if ids:
                        status, _ = request(self.gw_port, "GET", f"/v1/calls/{rng.choice(ids)}",
                                            None, auth)
                        self.count(tenant, f"GET one {status}")
            except OSError:
                self.count(tenant, "connection error")
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.15))

    # --- the check --------------------------------------------------------------------------

    def usage(self, tenant):
        status, data = request(self.admin_port, "GET", f"/admin/tenants/{tenant}/usage", None,
                               {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if status != 200:
            raise SystemExit(f"usage of {tenant}: {status} {data!r}")
        return json.loads(data)

    def ledger(self):
        status, data = request(self.sim_port, "GET", "/_sim/ledger", None,
                               {"Authorization": f"Bearer {ACCOUNT_KEY}"}, timeout=60)
        if status != 200:
            raise SystemExit(f"simulator ledger: {status}")
        return json.loads(data)

    def rows(self):
        db = sqlite3.connect(f"file:{os.path.join(self.dir, 'state', 'callgate.db')}?mode=ro",
                             uri=True)
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute(
            "SELECT reservation_id, tenant, call_id, status, live, hold, charged, price, "
            "increment_secs, duration, max_duration, updated_at FROM calls")]
        for r in rows:
            # `hold` is what a live call holds now (0 once settled); a call's hold at admission
            # is its max_duration's started increments at its price.
            r["held"] = charge_for(r["max_duration"], r["increment_secs"], r["price"], 1 << 62)
        spent = {r["tenant"]: r["spent"] for r in db.execute("SELECT tenant, spent FROM budgets")}
        db.close()
        return rows, spent

    def check(self, ledger):
        failures = []
        rows, file_spent = self.rows()
        by_reservation = {r["reservation_id"]: r for r in rows}
        placed = {c["reservation"]: c for c in ledger["calls"] if c.get("reservation")}
        dropped = {d["reservation"]: d["fault"] for d in ledger["dropped"] if d.get("reservation")}
        kills = self.restarts.get("SIGKILL", 0)
        kinds = Counter()

        # 1 and 2: counters against the file.
        for tid, _, _ in TENANTS:
            u = self.usage(tid)
            mine = [r for r in rows if r["tenant"] == tid]
            live = [r for r in mine if r["live"]]
            sums = (len(live), sum(r["hold"] for r in live), sum(r["charged"] for r in mine))
            counters = (u["slots"], u["holds"], u["spent"])
            if counters != sums:
                failures.append(f"{tid}: counters (slots, holds, spent) {counters} != file {sums}")
            if counters[:2] != (0, 0):
                failures.append(f"{tid}: {counters[0]} slots and {counters[1]} credits still held")
            if file_spent.get(tid, 0) != u["spent"]:
                failures.append(f"{tid}: budget row spent {file_spent.get(tid)} != counter {u['spent']}")

        # 3: every placed call, in the store, charged what the simulator says.
        for reservation, call in placed.items():
            row = by_reservation.get(reservation)
            trail = call["trail"]
            if row is None:
                failures.append(f"credit slipped: call {call['id']} (reservation {reservation}) "
                                f"was placed and is not in the store")
                kinds["slipped"] += 1
                continue
            if call["status"] not in ("completed", "failed"):
                failures.append(f"call {call['id']} still {call['status']} at the simulator")
                continue
            if row["call_id"] == call["id"] and row["status"] != "expired":
                want = charge_for(call.get("duration") or 0, row["increment_secs"], row["price"],
                                  row["held"])
                if row["charged"] != want or row["status"] != call["status"]:
                    failures.append(f"call {call['id']}: store {row['status']} charged "
                                    f"{row['charged']}, simulator {call['status']} "
                                    f"{call.get('duration')} s = {want}")
                kinds["placed: charged its duration" + (" (answer lost)" if trail["answer"] == "withheld" else "")] += 1
            elif (row["call_id"] == call["id"] and row["status"] == "expired"
                  and row["charged"] == row["held"]
                  and min(trail["final_delivered_at"] or INF,
                          trail["first_final_lookup_at"] or INF) > row["updated_at"] // 1000):
                # Bound, its final event lost, and no look-up answered that it had ended before
                # its lease did (each failed, or none came in time): the gateway could not know,
                # and the documented rule charges the hold.
                kinds["placed, final event lost, no look-up answered in time: charged its hold"] += 1
            elif row["call_id"] is None and row["status"] == "expired" and row["charged"] == row["held"]:
                # The gateway never learned of it: no answer reached it and no event did.
                if trail["events_delivered"] == 0 and (trail["answer"] == "withheld" or kills):
                    kinds["placed, never learned of: charged its hold"] += 1
                else:
                    failures.append(f"call {call['id']}: answered or evented ({trail}) yet "
                                    f"never bound; expired at the hold")
            else:
                failures.append(f"call {call['id']}: store row {row}; simulator: {call}")

        # 4: every other row.
        for row in rows:
            if row["reservation_id"] in placed:
                continue
            fault = dropped.get(row["reservation_id"])
            held = row["status"] == "expired" and row["charged"] == row["held"] and not row["live"]
            if fault == "reset" and held:
                kinds["reset, nothing placed: charged its hold"] += 1
            elif fault is None and held and kills:
                kinds["cut off by kill -9 before the simulator: charged its hold"] += 1
            else:
                failures.append(f"row {row} (simulator: {fault or 'never saw it'})")
        for reservation, fault in dropped.items():
            if fault == "error" and reservation in by_reservation:
                failures.append(f"reservation {reservation}: answered 500 yet kept")
        kinds["error, nothing placed: released"] = sum(1 for f in dropped.values() if f == "error")
        return failures, kinds

    # --- the run ----------------------------------------------------------------------------

    def run(self):
        a = self.args
        self.write_files()
        self.start_simulator()
        self.start_gateway()
        print(f"soak: {a.minutes} min in {self.dir}; simulator :{self.sim_port}, "
              f"gateway :{self.gw_port}, admin :{self.admin_port}", flush=True)
        threads = [threading.Thread(target=self.worker, args=(tid, key), daemon=True)
                   for tid, key, _ in TENANTS for _ in range(a.workers)]
        started = time.monotonic()
        for t in threads:
            t.start()
        end = started + a.minutes * 60
        next_restart = started + a.restart_every
        sig = signal.SIGTERM
        peak_rss = 0
        downtime = []
        while time.monotonic() < end:
            time.sleep(1)
            try:
                with open(f"/proc/{self.gateway.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            peak_rss = max(peak_rss, int(line.split()[1]))
            except OSError:
                pass
            if a.restart_every and time.monotonic() >= next_restart and time.monotonic() < end - 5:
                took = self.restart_gateway(sig)
                downtime.append(took)
                print(f"  {time.monotonic() - started:6.0f} s: restarted ({signal.Signals(sig).name}, "
                      f"{took:.2f} s)", flush=True)
                sig = signal.SIGKILL if sig == signal.SIGTERM else signal.SIGTERM
                next_restart += a.restart_every
        self.stop.set()
        for t in threads:
            t.join(timeout=30)
        traffic_secs = time.monotonic() - started
        print(f"  traffic stopped after {traffic_secs:.0f} s; waiting for calls and leases to end",
              flush=True)
        # Every call ends within max_duration; every lease within max_duration + upstream
        # timeout + grace; the reconciler then needs quiet_after + an interval.
        deadline = time.monotonic() + MAX_DURATION + UPSTREAM_TIMEOUT_MS / 1000 + LEASE_GRACE + 60
        while time.monotonic() < deadline:
            time.sleep(2)
            ledger = self.ledger()
            live_sim = sum(1 for c in ledger["calls"] if c["status"] not in ("completed", "failed"))
            held = sum(self.usage(t)["slots"] for t, _, _ in TENANTS)
            if live_sim == 0 and held == 0:
                break
        time.sleep(3)  # let the last commits land
        ledger = self.ledger()
        with open(os.path.join(self.dir, "ledger.json"), "w") as f:
            json.dump(ledger, f)
        failures, kinds = self.check(ledger)
        # The counters rebuilt from the file at start must agree too.
        self.restart_gateway(signal.SIGTERM)
        failures2, _ = self.check(ledger)
        failures += [f"after a restart: {f}" for f in failures2 if f not in failures]
        audit = subprocess.run([self.bin, "audit", "verify", os.path.join(self.dir, "audit.jsonl")],
                               capture_output=True, text=True)
        if audit.returncode != 0:
            failures.append(f"audit verify: {audit.stdout.strip()} {audit.stderr.strip()}")
        self.gateway.send_signal(signal.SIGTERM)
        self.gateway.wait(timeout=30)
        self.sim.send_signal(signal.SIGINT)
        self.sim.wait(timeout=10)

        # --- the report -------------------------------------------------------------------
        print("\n## Traffic (client side)\n")
        print("| tenant | answer | count |\n|---|---|---|")
        for tid, _, _ in TENANTS:
            for what, n in sorted(self.stats[tid].items()):
                print(f"| {tid} | {what} | {n} |")
        total = sum(sum(c.values()) for c in self.stats.values())
        print(f"\n{total} requests in {traffic_secs:.0f} s ({total / traffic_secs:.0f}/s); "
              f"restarts: {dict(self.restarts)}, each {min(downtime, default=0):.2f} to "
              f"{max(downtime, default=0):.2f} s; gateway peak RSS {peak_rss / 1024:.1f} MiB")
        print("\n## Faults injected (simulator)\n")
        print(json.dumps(ledger["faults"]))
        calls = ledger["calls"]
        print(f"\n{len(calls)} calls placed; {sum(c['trail']['events'] for c in calls)} events, "
              f"{sum(c['trail']['events_delivered'] for c in calls)} delivered, "
              f"{sum(1 for c in calls if not c['trail']['final_delivered'])} calls whose final "
              f"event never arrived")
        print("\n## Store against simulator\n")
        print("| outcome | calls |\n|---|---|")
        for what, n in sorted(kinds.items()):
            print(f"| {what} | {n} |")
        spent = {r: 0 for r, _, _ in TENANTS}
        for row in self.rows()[0]:
            spent[row["tenant"]] = spent.get(row["tenant"], 0) + row["charged"]
        print(f"\nspend in the store by tenant: {spent}")
        if failures:
            print(f"\nFAILED: {len(failures)} mismatches")
            for f in failures[:50]:
                print("  - " + f)
            print(f"(files kept in {self.dir})")
            return 1
        print("\nOK: slots, holds and spend in the store equal what the simulator says happened")
        if not a.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "callgate"))
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--workers", type=int, default=4, help="threads per tenant")
    ap.add_argument("--restart-every", type=float, default=60, help="seconds; 0: never")
    ap.add_argument("--error-rate", type=float, default=0.03)
    ap.add_argument("--reset-rate", type=float, default=0.02)
    ap.add_argument("--hang-rate", type=float, default=0.03)
    ap.add_argument("--lost-event-rate", type=float, default=0.10)
    ap.add_argument("--lookup-error-rate", type=float, default=0.20)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        raise SystemExit(f"{args.bin} not found: cargo build --release first")
    sys.exit(Soak(args).run())


if __name__ == "__main__":
    main()
