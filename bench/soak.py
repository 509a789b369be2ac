#!/usr/bin/env python3
"""Soak test: mixed load through gatehouse for a long time while its config is reloaded every
10 s and one of its two upstreams is killed and restarted every minute. Reports RSS and open
file descriptors over time and the requests that failed, by cause, at the end.

    bench/soak                      # 30 minutes (builds release binaries first)
    bench/soak --minutes 2          # a short run

It passes when RSS and fds are flat (the last sample within 20% / 16 fds of the one after the
warm-up minute), wrk saw no socket error, and every failed answer was one the stopped upstream
caused (502/503/504); anything else — a 4xx, a 500, a reset connection — is the gateway's.
"""
import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
GATEHOUSE = ROOT / "target/release/gatehouse"
UPSTREAM = ROOT / "target/release/examples/bench_upstream"
GH, ADMIN, UP1, UP2 = 19180, 19181, 19182, 19183

MIXED_LUA = r"""
-- Mixed load: small GETs, 16 KiB POSTs, 1 MiB downloads, static answers, 404s.
local reqs = {}
math.randomseed(os.time())
init = function(args)
  reqs[1] = wrk.format("GET", "/api/json")
  reqs[2] = wrk.format("POST", "/api/post", {["Content-Type"] = "application/octet-stream"}, string.rep("a", 16384))
  reqs[3] = wrk.format("GET", "/api/1m")
  reqs[4] = wrk.format("GET", "/ping")
  reqs[5] = wrk.format("GET", "/nowhere")
end
request = function()
  local r = math.random(100)
  if r <= 70 then return reqs[1] elseif r <= 85 then return reqs[2]
  elseif r <= 88 then return reqs[3] elseif r <= 97 then return reqs[4] else return reqs[5] end
end
"""

ROUTES = """
[frontend]
name = "soak"

[[route]]
name = "ping"
path = "/ping"
respond = {{ body = "pong", content_type = "text/plain" }}

[[route]]
name = "api"
path = "/api/{{*rest}}"
timeout = "{timeout}"
proxy = {{ service = "up", path = "/{{rest}}" }}
"""


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics():
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5) as r:
        return r.read().decode()


def statuses(text):
    out = {}
    for m in re.finditer(r'^gatehouse_requests_total\{[^}]*status="(\d+)"[^}]*\} (\d+)', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
    return out


def start_upstream(port):
    return subprocess.Popen([str(UPSTREAM), f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    for b in (GATEHOUSE, UPSTREAM):
        if not b.exists():
            sys.exit(f"{b} is missing: run bench/soak (it builds them) or cargo build --release --example bench_upstream")
    work = pathlib.Path(tempfile.mkdtemp(prefix="gatehouse-soak-"))
    (work / "routes").mkdir()
    (work / "gateway.toml").write_text(f"""
[server]
listen = "127.0.0.1:{GH}"
[admin]
listen = "127.0.0.1:{ADMIN}"
[log]
filter = "warn"
access_log = false
[services.up]
endpoints = ["http://127.0.0.1:{UP1}", "http://127.0.0.1:{UP2}"]
load_balancing = "least_request"
[services.up.retry]
attempts = 2
retry_on = ["connect-failure", "reset"]
[services.up.outlier_detection]
consecutive_failures = 3
base_ejection_time = "5s"
""")
    (work / "routes" / "soak.toml").write_text(ROUTES.format(timeout="10s"))
    (work / "mixed.lua").write_text(MIXED_LUA)
    ups = {UP1: start_upstream(UP1), UP2: start_upstream(UP2)}
    gw = subprocess.Popen([str(GATEHOUSE), "run", "--config", str(work / "gateway.toml")],
                          stdout=subprocess.DEVNULL, stderr=open(work / "gatehouse.log", "w"))
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/readyz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    total = int(args.minutes * 60)
    wrk = subprocess.Popen(["wrk", "-t2", f"-c{args.connections}", f"-d{total}s", "--timeout", "15s",
                            "-s", str(work / "mixed.lua"), f"http://127.0.0.1:{GH}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, reloads, restarts = [], 0, 0
    start = time.time()
    next_reload, next_restart, next_sample = start + 10, start + 60, start
    victim = UP1
    try:
        while wrk.poll() is None:
            now = time.time()
            if now >= next_sample:
                samples.append((int(now - start), rss_kib(gw.pid), fds(gw.pid)))
                next_sample += 10
            if now >= next_reload:
                (work / "routes" / "soak.toml").write_text(ROUTES.format(timeout=f"{10 + reloads % 2}s"))
                reloads += 1
                next_reload += 10
            if now >= next_restart:
                ups[victim].kill()
                ups[victim].wait()
                time.sleep(2)
                ups[victim] = start_upstream(victim)
                restarts += 1
                victim = UP2 if victim == UP1 else UP1
                next_restart += 60
            time.sleep(0.2)
        out = wrk.stdout.read()
        final = metrics()
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=40)
        for p in ups.values():
            p.kill()
    print(out)
    print(f"reloads: {reloads}, upstream restarts: {restarts}")
    print("\n| t (s) | RSS (MiB) | open fds |\n|---:|---:|---:|")
    for t, rss, n in samples:
        print(f"| {t} | {rss / 1024:.1f} | {n} |")
    by_status = statuses(final)
    print("\nanswers by status:", dict(sorted(by_status.items())))
    socket_errors = re.search(r"Socket errors: (.*)", out)
    upstream_caused = sum(v for k, v in by_status.items() if k in ("502", "503", "504"))
    own = sum(v for k, v in by_status.items() if k not in ("200", "404", "502", "503", "504"))
    warm = [s for s in samples if s[0] >= 60] or samples
    rss_ok = warm[-1][1] <= warm[0][1] * 1.2 + 2048
    fds_ok = warm[-1][2] <= warm[0][2] + 16
    print(f"failed answers the upstream restarts caused (502/503/504): {upstream_caused}")
    print(f"failed answers of the gateway's own (anything else but 200 and the 404s asked for): {own}")
    print(f"wrk socket errors: {socket_errors.group(1) if socket_errors else 'none'}")
    print(f"RSS flat: {rss_ok} ({warm[0][1] / 1024:.1f} -> {warm[-1][1] / 1024:.1f} MiB); "
          f"fds flat: {fds_ok} ({warm[0][2]} -> {warm[-1][2]})")
    ok = rss_ok and fds_ok and own == 0 and not socket_errors
    print("soak:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
