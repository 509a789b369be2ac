#!/usr/bin/env python3
"""Benchmark harness for gatehouse, run by bench/run.

Starts one upstream (examples/bench_upstream.rs) and every contender in front of it — gatehouse,
nginx, haproxy, and "direct" (the upstream itself, the physical limit) — all pinned to CPU 1,
while wrk runs pinned to CPU 0. Scenarios are run interleaved (A B C D A B C D ...), each
repeated, and the median is reported. CPU time per request is read from /proc for the proxy's
processes: it is the figure least disturbed by a shared, noisy machine.
"""

import argparse
import asyncio
import datetime
import os
import pathlib
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
SERVER_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

UP_PORT, GH_PORT, GH_ADMIN, NGINX_PORT, HAPROXY_PORT, NGINX_BARE_PORT = 19000, 19080, 19081, 19180, 19280, 19190
BASE_PORT, BASE_ADMIN = 19380, 19381

SCENARIOS = {
    "plain": dict(title="Plain proxy: GET ~200 B JSON, 64 keep-alive connections", path="/json", conns=64),
    "1m": dict(title="1 MiB responses, 16 connections (throughput)", path="/1m", conns=16),
    "c2000": dict(title="2000 concurrent keep-alive connections, GET ~200 B JSON", path="/json", conns=2000),
    "post16k": dict(title="POST with a 16 KiB body, 64 connections", path="/post", conns=64, script="post.lua"),
    # gatehouse only: a service whose circuit is open; every answer is 503 circuit_open, counted
    # by wrk as a non-2xx "error". It measures what a request costs when the breaker sheds it.
    "circuit_open": dict(title="Circuit open: 503 answered by the breaker, 64 connections", path="/dead/x",
                         conns=64, only=["gatehouse"]),
    # gatehouse only: JWT authentication (issue 12). Compare with the plain scenario's gatehouse
    # row of the same run. `jwt_cached` repeats one RS256 token (the verified-token cache
    # answers); `jwt_rs256`/`jwt_es256` send a new token each request (a provider without a
    # cache: every request is a signature check).
    "jwt_cached": dict(title="JWT auth, one repeated RS256 token (verified-token cache), 64 connections",
                       path="/jwt/cached", conns=64, script="tokens.lua", tokens=("RS256", 1), only=["gatehouse"]),
    "jwt_rs256": dict(title="JWT auth, a new RS256 token per request (signature verified), 64 connections",
                      path="/jwt/rs", conns=64, script="tokens.lua", tokens=("RS256", 50000), only=["gatehouse"]),
    "jwt_es256": dict(title="JWT auth, a new ES256 token per request (signature verified), 64 connections",
                      path="/jwt/es", conns=64, script="tokens.lua", tokens=("ES256", 50000), only=["gatehouse"]),
    # gatehouse only: rate limiting (issue 13), every request admitted (the limit is far above
    # the load) and counted. Compare with the plain scenario's gatehouse row of the same run.
    # `rl_local`: the in-memory store, one hot key (every wrk connection comes from 127.0.0.1),
    # with the RateLimit headers. `rl_redis`: the Redis store at 127.0.0.1:6379 (one script
    # call per request; skipped when Redis is not running).
    "rl_local": dict(title="Rate limit, in memory, one hot key (all admitted, RateLimit headers), 64 connections",
                     path="/rl/local", conns=64, only=["gatehouse"]),
    # gatehouse only: an aggregate route (issue 14) of three calls to the upstream's /json (no
    # dependencies: in parallel), composed into one ~700 B document. Compare with the plain
    # scenario's gatehouse row: latency added over one call, CPU against three plain proxies.
    "agg3": dict(title="Aggregate of 3 parallel calls (each the plain scenario's /json), 64 connections",
                 path="/agg/three", conns=64, only=["gatehouse"]),
    # The same at one connection (no queueing: latency is the request's own): the aggregate's
    # added p50 over one plain call (issue 14's goal: <= 0.3 ms) is agg3_c1 - plain_c1.
    "plain_c1": dict(title="Plain proxy, 1 connection (latency without queueing)", path="/json", conns=1),
    "agg3_c1": dict(title="Aggregate of 3 parallel calls, 1 connection (latency without queueing)",
                    path="/agg/three", conns=1, only=["gatehouse"]),
    # The response cache (issue 15), every request a hit on one stored object: gatehouse's
    # in-memory cache against nginx's proxy_cache (its standard cache: files under
    # proxy_cache_path, in the page cache after the first read). The upstream is not asked
    # after the warm-up. Goal: gatehouse's CPU per hit <= 0.8x nginx's.
    "cache_hit": dict(title="Cache hit: GET ~200 B served from the cache (gatehouse memory, nginx proxy_cache), 64 connections",
                      path="/cache/json", conns=64, only=["gatehouse", "nginx"]),
    # gatehouse only: REST → gRPC (issue 16), a unary call of bench.v1.Users/GetUser (the same
    # user as /json, as protobuf, from bench_upstream's h2c port) answered as JSON. Compare with
    # the plain scenario's gatehouse row: the cost of transcoding over a plain proxied call.
    "grpc_unary": dict(title="REST → gRPC unary (GET /grpc/users/42 → bench.v1.Users/GetUser, JSON answer), 64 connections",
                       path="/grpc/users/42", conns=64, only=["gatehouse"]),
    # gatehouse only: a route with a trivial Lua plugin (issue 18: on_request sets one request
    # header). Compare with the plain scenario's gatehouse row: goal <= 3 µs of CPU a request.
    "lua_header": dict(title="Lua plugin setting one request header (else the plain scenario's /json), 64 connections",
                       path="/lua/json", conns=64, only=["gatehouse"]),
    "rl_redis": dict(title="Rate limit, Redis store (one script call per request, all admitted), 64 connections",
                     path="/rl/redis", conns=64, only=["gatehouse"], needs_redis=True),
}


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def pinned(cmd):
    return ["taskset", "-c", SERVER_CPU] + cmd


class Contender:
    def __init__(self, name, port, cmd, scenarios=None, idle=True):
        self.name, self.port, self.cmd = name, port, cmd
        # Scenarios this contender runs in (None: all); whether it runs the idle-connections test.
        self.scenarios, self.idle = scenarios, idle
        self.proc = None

    def start(self):
        if self.cmd:
            # Logs go to a file: a pipe nobody reads would fill up and stall the server.
            log = open(WORK / f"{self.name}.log", "wb")
            self.proc = subprocess.Popen(pinned(self.cmd), stdout=subprocess.DEVNULL, stderr=log)
        wait_port(self.port)

    def pids(self):
        # taskset execs the server, so this is its main process; nginx's workers are its children.
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [self.proc.pid] + [int(p) for p in out.split()]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cpu_ticks(pids):
    """(user, system) CPU ticks of the processes."""
    user = system = 0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])    # utime
            system += int(fields[12])  # stime
        except FileNotFoundError:
            pass
    return user, system


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out):
    def num(pattern, default=0.0):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[pct] = float(val) * UNITS[unit]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in m.groups()) if m else 0
    non2xx = int(num(r"Non-2xx or 3xx responses: (\d+)"))
    tm = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}
    mib_s = float(tm.group(1)) * scale.get(tm.group(2), 1) if tm else 0.0
    return dict(
        rps=num(r"Requests/sec:\s+([\d.]+)"),
        requests=int(num(r"(\d+) requests in")),
        p50=lat.get("50", float("nan")),
        p99=lat.get("99", float("nan")),
        errors=socket_errors + non2xx,
        mib_s=mib_s,
    )


def run_wrk(c, sc, duration, sample_rss_at=None):
    cmd = ["wrk", "-t1", f"-c{sc['conns']}", f"-d{duration}s", "--latency"]
    if sc.get("script"):
        cmd += ["-s", str(ROOT / "bench" / sc["script"])]
    cmd.append(f"http://127.0.0.1:{c.port}{sc['path']}")
    env = dict(os.environ)
    if sc.get("tokens"):
        alg, n = sc["tokens"]
        env["TOKENS"] = str(WORK / f"tokens-{alg}-{n}.txt")
    pids = c.pids()
    before = cpu_ticks(pids)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    rss = None
    if sample_rss_at is not None:
        time.sleep(sample_rss_at)
        rss = rss_kib(c.pids())
    out, _ = proc.communicate()
    after = cpu_ticks(pids)
    r = parse_wrk(out)
    per_req = 1e6 / CLK_TCK / r["requests"] if r["requests"] else float("nan")
    r["cpu_us"] = (sum(after) - sum(before)) * per_req
    r["sys_us"] = (after[1] - before[1]) * per_req
    r["rss"] = rss
    if r["requests"] == 0:
        print(out, file=sys.stderr)
    return r


async def hold_idle(port, n):
    """Opens n keep-alive connections, makes one request on each, and keeps them open."""
    conns, answered = [], 0
    for i in range(n):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            print(f"  idle connection {i} failed: {e}", file=sys.stderr)
            break
        writer.write(b"GET /json HTTP/1.1\r\nHost: bench\r\n\r\n")
        conns.append((reader, writer))
        if len(conns) % 500 == 0:
            answered += sum(await asyncio.gather(*(drain_response(r) for r, _ in conns[-500:])))
    rest = len(conns) % 500
    if rest:
        answered += sum(await asyncio.gather(*(drain_response(r) for r, _ in conns[-rest:])))
    return conns, answered


async def drain_response(reader):
    async def read():
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
        if m:
            await reader.readexactly(int(m.group(1)))
        return True

    try:
        return await asyncio.wait_for(read(), 10)
    except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
        return False


def idle_connections_rss(c, n):
    async def go():
        conns, answered = await hold_idle(c.port, n)
        # Idle for 3 s before measuring: gatehouse parks a connection after 1–2 s without a
        # request (docs/CONFIG.md, "Connections"); nginx and haproxy free theirs at once.
        await asyncio.sleep(3.0)
        rss = rss_kib(c.pids())
        for _, w in conns:
            w.close()
        return answered, rss

    return asyncio.run(go())


JWT_CONFIG = f"""
# The JWT scenarios' providers (bench/keys: benchmark keys only).
[auth.jwt.bench_rs]
algorithms = ["RS256"]
public_key = "{ROOT}/bench/keys/rsa.pub.pem"
issuer = "https://bench.test/"
[auth.jwt.fresh_rs]
algorithms = ["RS256"]
public_key = "{ROOT}/bench/keys/rsa.pub.pem"
issuer = "https://bench.test/"
cache_max_entries = 1
[auth.jwt.fresh_es]
algorithms = ["ES256"]
public_key = "{ROOT}/bench/keys/ec.pub.pem"
issuer = "https://bench.test/"
cache_max_entries = 1
"""

JWT_ROUTES = """
[frontend]
name = "jwt"
path_prefix = "/jwt"

[[route]]
name = "cached"
path = "/cached"
auth = "bench_rs"
proxy = { service = "up", path = "/json" }

[[route]]
name = "rs"
path = "/rs"
auth = "fresh_rs"
proxy = { service = "up", path = "/json" }

[[route]]
name = "es"
path = "/es"
auth = "fresh_es"
proxy = { service = "up", path = "/json" }
"""


LUA_ROUTES = """
[frontend]
name = "lua"
path_prefix = "/lua"

[[route]]
name = "json"
path = "/json"
plugins = ["set-header"]
proxy = { service = "up", path = "/json" }
"""


RL_CONFIG = """
# The rate limit scenarios' policies: far above any load, so every request is admitted and
# counted. The Redis timeout is generous: the scenario measures the store, not its fallback.
[redis]
url = "redis://127.0.0.1:6379"
timeout = "100ms"
[rate_limits.bench_local]
key = "ip"
limits = [{ requests = 1000000, per = "1s" }]
[rate_limits.bench_redis]
key = "ip"
limits = [{ requests = 1000000, per = "1s" }]
store = "redis"
on_store_failure = "allow"
"""

RL_ROUTES = """
[frontend]
name = "rl"
path_prefix = "/rl"

[[route]]
name = "local"
path = "/local"
rate_limit = "bench_local"
proxy = { service = "up", path = "/json" }

[[route]]
name = "redis"
path = "/redis"
rate_limit = "bench_redis"
proxy = { service = "up", path = "/json" }
"""


CACHE_ROUTES = """
[frontend]
name = "cache"
path_prefix = "/cache"

[[route]]
name = "json"
path = "/{*rest}"
cache = { ttl = "1h" }
proxy = { service = "up", path = "/json" }
"""


GRPC_CONFIG = f"""
[services.grpcup]
endpoints = ["http://127.0.0.1:{UP_PORT + 1}"]
protocol = "http2"

[protos]
files = ["{ROOT / 'bench/protos/bench.proto'}"]
"""

GRPC_ROUTES = """
[frontend]
name = "grpc"

[[route]]
name = "users"
path = "/grpc/{*rest}"
grpc = { service = "grpcup", method = "bench.v1.Users/*" }
"""

AGG_ROUTES = """
[frontend]
name = "agg"
path_prefix = "/agg"

[[route]]
name = "three"
path = "/three"
[route.aggregate]
[[route.aggregate.call]]
name = "a"
service = "up"
path = "/json"
[[route.aggregate.call]]
name = "b"
service = "up"
path = "/json"
[[route.aggregate.call]]
name = "c"
service = "up"
path = "/json"
"""


def redis_up():
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def cache_memory(c, n=20000):
    """What a stored object costs gatehouse beyond its body: RSS before and after n distinct
    URLs of the cached route are stored, less their bodies, per object; and the weight the
    cache itself counts (`/admin/cache`)."""
    import http.client
    import json as _json
    before = rss_kib(c.pids())
    conn = http.client.HTTPConnection("127.0.0.1", GH_PORT)
    body_len = 0
    for i in range(n):
        conn.request("GET", f"/cache/json?object={i}")
        r = conn.getresponse()
        body_len = len(r.read())
    conn.close()
    time.sleep(1)
    after = rss_kib(c.pids())
    a = http.client.HTTPConnection("127.0.0.1", GH_ADMIN)
    a.request("GET", "/admin/cache")
    stats = _json.loads(a.getresponse().read())
    a.close()
    return dict(n=n, body=body_len, rss_per=(after - before) * 1024 / n - body_len,
                weighed_per=stats["bytes"] / max(stats["urls"], 1), urls=stats["urls"])


def mint_tokens():
    for sc in SCENARIOS.values():
        if sc.get("tokens"):
            alg, n = sc["tokens"]
            out = WORK / f"tokens-{alg}-{n}.txt"
            if not out.exists() or out.stat().st_mtime < time.time() - 1800:
                sh(str(ROOT / "target/release/examples/mint_tokens"), alg, str(n), str(out))


def write_configs():
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "routes").mkdir(exist_ok=True)
    (WORK / "routes-base").mkdir(exist_ok=True)
    (WORK / "gateway.toml").write_text(f"""
[server]
listen = "127.0.0.1:{GH_PORT}"
[admin]
listen = "127.0.0.1:{GH_ADMIN}"
[routes]
watch = false
[log]
filter = "warn"
access_log = false
[services.up]
endpoints = ["http://127.0.0.1:{UP_PORT}"]

# Nothing listens on port 1: the first failure opens the circuit for an hour.
[services.dead]
endpoints = ["http://127.0.0.1:1"]
[services.dead.circuit_breaker]
consecutive_failures = 1
open_for = "1h"
max_open_for = "1h"
""")
    (WORK / "routes" / "bench.toml").write_text("""
[frontend]
name = "bench"

[[route]]
name = "dead"
path = "/dead/{*rest}"
proxy = { service = "dead" }

[[route]]
name = "all"
path = "/{*rest}"
proxy = { service = "up" }
""")
    # The baseline (another build, maybe without auth) reads gateway.toml without the JWT part
    # and routes-base/ without the JWT frontend.
    (WORK / "routes-base" / "bench.toml").write_text((WORK / "routes" / "bench.toml").read_text())
    (WORK / "routes" / "jwt.toml").write_text(JWT_ROUTES)
    (WORK / "routes" / "rl.toml").write_text(RL_ROUTES)
    (WORK / "routes" / "agg.toml").write_text(AGG_ROUTES)
    (WORK / "routes" / "grpc.toml").write_text(GRPC_ROUTES)
    (WORK / "routes" / "cache.toml").write_text(CACHE_ROUTES)
    (WORK / "routes" / "lua.toml").write_text(LUA_ROUTES)
    (WORK / "plugins").mkdir(exist_ok=True)
    (WORK / "plugins" / "set-header.lua").write_text(
        'return { on_request = function(req, ctx) req.headers["x-plugin"] = "1" end }\n')
    (WORK / "gateway-nojwt.toml").write_text((WORK / "gateway.toml").read_text())
    with open(WORK / "gateway.toml", "a") as f:
        f.write(JWT_CONFIG)
        f.write(RL_CONFIG)
        f.write(GRPC_CONFIG)
    (WORK / "nginx.conf").write_text(f"""
worker_processes 1;  # the proxy is pinned to one core: workers = cores
worker_rlimit_nofile 20000;
daemon off;
pid {WORK}/nginx.pid;
error_log stderr error;
events {{ worker_connections 19000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_buffer_size 64k;  # keep 16 KiB bodies in memory, as the others do
  client_body_temp_path {WORK}/nginx-body;
  proxy_temp_path {WORK}/nginx-proxy;
  upstream up {{ server 127.0.0.1:{UP_PORT}; keepalive 512; keepalive_requests 1000000; }}
  proxy_cache_path {WORK}/nginx-cache keys_zone=bench:16m max_size=256m;
  server {{
    listen 127.0.0.1:{NGINX_PORT} backlog=4096;
    # The cache_hit scenario: nginx's proxy_cache, as gatehouse's route cache = {{ ttl = "1h" }}.
    location /cache/ {{
      proxy_pass http://up/json;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      add_header X-Request-Id $request_id always;
      add_header Cache-Status $upstream_cache_status always;
    }}
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # What gatehouse does by default for every proxied request: forwarding headers and a
      # request id, sent upstream and returned to the client.
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id always;
    }}
  }}
}}
""")
    # nginx as a plain reverse proxy, without the forwarding headers and request id: what nginx
    # costs when it does less than gatehouse does.
    bare = (WORK / "nginx.conf").read_text()
    bare = "\n".join(l for l in bare.splitlines() if "X-Forwarded" not in l and "X-Request-Id" not in l)
    bare = bare.replace(f"listen 127.0.0.1:{NGINX_PORT}", f"listen 127.0.0.1:{NGINX_BARE_PORT}")
    bare = bare.replace(f"pid {WORK}/nginx.pid", f"pid {WORK}/nginx-bare.pid")
    bare = bare.replace(f"{WORK}/nginx-cache keys_zone=bench", f"{WORK}/nginx-bare-cache keys_zone=bench")
    (WORK / "nginx-bare.conf").write_text(bare)
    (WORK / "haproxy.cfg").write_text(f"""
global
  nbthread 1
  # haproxy needs 2 file descriptors per connection; this machine's hard limit is 20000.
  maxconn 9900
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{HAPROXY_PORT}
  # What gatehouse does by default: forwarding headers and a request id, both ways.
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  unique-id-format %{{+X}}o%ci%cp%fi%fp%Ts%rt%pid
  unique-id-header X-Request-Id
  http-after-response set-header X-Request-Id %[unique-id]
  default_backend be
backend be
  server s1 127.0.0.1:{UP_PORT}
""")


def version(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def machine():
    cpu = "?"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(pathlib.Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, Linux {platform.release()}"


def fmt_ms(x):
    return f"{x:.3f} ms" if x == x else "—"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="runs per scenario and contender (default 3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ",".join(SCENARIOS))
    ap.add_argument("--contenders", default="gatehouse,nginx,nginx-bare,haproxy,direct")
    ap.add_argument("--idle", type=int, default=10000, help="idle keep-alive connections to hold (0: skip)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/")
    ap.add_argument("--baseline", metavar="BIN", help="another gatehouse binary (e.g. a build of main) to run as contender "
                    "`baseline`, on the same config, for A/B comparisons of a change")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    write_configs()
    mint_tokens()
    for d in ("nginx-body", "nginx-proxy"):
        (WORK / d).mkdir(exist_ok=True)

    upstream = Contender("direct", UP_PORT, [str(ROOT / "target/release/examples/bench_upstream"), f"127.0.0.1:{UP_PORT}"])
    all_contenders = {
        "gatehouse": Contender("gatehouse", GH_PORT, [str(ROOT / "target/release/gatehouse"), "run", "--config", str(WORK / "gateway.toml")]),
        "nginx": Contender("nginx", NGINX_PORT, [shutil.which("nginx") or "nginx", "-c", str(WORK / "nginx.conf"), "-p", str(WORK)]),
        "nginx-bare": Contender("nginx-bare", NGINX_BARE_PORT, [shutil.which("nginx") or "nginx", "-c", str(WORK / "nginx-bare.conf"), "-p", str(WORK)],
                                scenarios=["plain"], idle=False),
        "haproxy": Contender("haproxy", HAPROXY_PORT, [shutil.which("haproxy") or "haproxy", "-db", "-f", str(WORK / "haproxy.cfg")]),
        "direct": upstream,
    }
    if args.baseline:
        cfg = (WORK / "gateway-nojwt.toml").read_text().replace("[routes]\n", "[routes]\ndir = \"routes-base\"\n")
        cfg = cfg.replace(f"127.0.0.1:{GH_PORT}", f"127.0.0.1:{BASE_PORT}").replace(f"127.0.0.1:{GH_ADMIN}", f"127.0.0.1:{BASE_ADMIN}")
        (WORK / "gateway-baseline.toml").write_text(cfg)
        all_contenders["baseline"] = Contender("baseline", BASE_PORT, [args.baseline, "run", "--config", str(WORK / "gateway-baseline.toml")],
                                               scenarios=["plain", "1m", "c2000", "post16k"])
        if "baseline" not in args.contenders.split(","):
            args.contenders += ",baseline"
    names = [n for n in args.contenders.split(",") if n]
    contenders = [all_contenders[n] for n in names]
    started = []
    try:
        upstream.start()
        started.append(upstream)
        for c in contenders:
            if c is not upstream:
                c.start()
                started.append(c)
        time.sleep(1)
        idle_rss = {c.name: rss_kib(c.pids()) for c in contenders}

        results = {}
        for sname in [s for s in args.scenarios.split(",") if s]:
            sc = SCENARIOS[sname]
            these = [c for c in contenders if c.name in sc.get("only", names)
                     and (c.scenarios is None or sname in c.scenarios)]
            if not these:
                continue
            if sc.get("needs_redis") and not redis_up():
                print(f"\n## {sc['title']}: skipped (no Redis at 127.0.0.1:6379)", flush=True)
                continue
            print(f"\n## {sc['title']}", flush=True)
            for c in these:  # warm-up: connections, pools, caches
                run_wrk(c, sc, 2)
            runs = {c.name: [] for c in these}
            for rep in range(args.reps):
                for c in these:
                    sample = args.duration / 2 if sname == "c2000" else None
                    r = run_wrk(c, sc, args.duration, sample_rss_at=sample)
                    runs[c.name].append(r)
                    print(f"  rep {rep + 1} {c.name:9} {r['rps']:>10.0f} req/s  p50 {fmt_ms(r['p50'])}  p99 {fmt_ms(r['p99'])}  "
                          f"cpu {r['cpu_us']:.1f} us/req (kernel {r['sys_us']:.1f})  errors {r['errors']}", flush=True)
            results[sname] = {
                n: {k: statistics.median([x[k] for x in rs if x[k] is not None]) if any(x[k] is not None for x in rs) else None
                    for k in rs[0]}
                for n, rs in runs.items()
            }
            # Interference from the shared machine only ever adds CPU time: the least-disturbed
            # repetition is shown next to the median.
            for n, rs in runs.items():
                results[sname][n]["cpu_best"] = min(x["cpu_us"] for x in rs)
                results[sname][n]["cpu_reps"] = [x["cpu_us"] for x in rs]

        cache_mem = None
        if "cache_hit" in results and "gatehouse" in names:
            cache_mem = cache_memory(all_contenders["gatehouse"])
            print(f"  cache: {cache_mem['rss_per']:.0f} B of RSS per stored object beyond its {cache_mem['body']} B body "
                  f"({cache_mem['urls']} URLs; weighed {cache_mem['weighed_per']:.0f} B each)", flush=True)
        # What each process still holds after the scenarios (memory its allocator kept from the
        # busiest moments, e.g. 2000 connections at once).
        after_rss = {c.name: rss_kib(c.pids()) for c in contenders} if results else {}
        idle = {}
        if args.idle:
            for c in [c for c in contenders if c.idle]:
                # Restarted first: the cost of holding idle connections, not what the scenarios
                # before left behind (that is the column above).
                if c is not upstream:
                    c.stop()
                    c.start()
                    time.sleep(1)
                held, rss = idle_connections_rss(c, args.idle)
                idle[c.name] = (held, rss)
                print(f"  {c.name:9} {held} idle connections: RSS {rss / 1024:.1f} MiB", flush=True)
                time.sleep(1)
    finally:
        for c in reversed(started):
            c.stop()

    report = render(args, names, results, idle_rss, idle, after_rss)
    if cache_mem:
        report += (f"\n## Response cache memory\n\n{cache_mem['n']} distinct URLs of the cached route stored "
                   f"({cache_mem['body']} B bodies): gatehouse's RSS grew by {cache_mem['rss_per']:.0f} B per object "
                   f"beyond its body; the cache weighs each at {cache_mem['weighed_per']:.0f} B (body, headers, "
                   "key and a fixed 1 KiB overhead), which is what `[cache] max_size` counts.\n")
    print("\n" + report)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
        (RESULTS / f"{stamp}.md").write_text(report)
        (RESULTS / "latest.md").write_text(report)
        print(f"written: bench/results/{stamp}.md")


def paired(r, base):
    """Each repetition's CPU µs/req divided by the base contender's in the same round (the two
    ran minutes apart at most, so a slow drift of the machine cancels out): the median of those
    ratios, and in how many rounds the contender used less CPU than the base."""
    if not base or not base.get("cpu_reps"):
        return "—"
    ratios = [a / b for a, b in zip(r["cpu_reps"], base["cpu_reps"]) if b]
    if not ratios:
        return "—"
    below = sum(x < 1 for x in ratios)
    return f"{statistics.median(ratios):.2f}, {below}/{len(ratios)}"


def render(args, names, results, idle_rss, idle, after_rss):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# gatehouse benchmark — {now}",
        "",
        f"- Machine: {machine()}",
        f"- gatehouse {commit}; {version(['nginx', '-v'])}; {version(['haproxy', '-v'])}; {version(['wrk', '-v'])}",
        f"- wrk (1 thread) pinned to CPU 0; upstream and proxy pinned together to CPU 1 (one worker each).",
        f"- {args.reps} interleaved runs of {args.duration}s per scenario and contender; medians shown. "
        "CPU µs/req is the proxy's own CPU time (user+sys, from /proc) divided by requests served; for "
        "`direct` it is the upstream's.",
        "- Same work per request: `nginx` and `haproxy` set X-Forwarded-For/-Proto/-Host and a request id "
        "(to the upstream and back to the client), as gatehouse does by default. `nginx-bare` is nginx "
        "without them (plain scenario only).",
        "- `paired`: each round's CPU µs/req divided by nginx's (or haproxy's) in the same round, median "
        "over the rounds, and in how many rounds the contender used less CPU (a drift of the machine "
        "between rounds cancels out of these).",
        f"- Command: `bench/run {' '.join(sys.argv[1:])}`".rstrip(),
        "",
    ]
    for sname, res in results.items():
        sc = SCENARIOS[sname]
        base = res.get("nginx")
        hap = res.get("haproxy")
        lines += [f"## {sc['title']}", "",
                  "| contender | req/s | MiB/s | p50 | p99 | errors | CPU µs/req | of which kernel | best rep "
                  "| req/s ÷ nginx | CPU ÷ nginx | paired: CPU ÷ nginx, rounds below | paired: CPU ÷ haproxy, rounds below |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in [n for n in names if n in res]:
            r = res[n]
            ratio = f"{r['rps'] / base['rps']:.2f}" if base and base["rps"] else "—"
            cratio = f"{r['cpu_us'] / base['cpu_us']:.2f}" if base and base["cpu_us"] and n != "direct" else "—"
            lines.append(f"| {n} | {r['rps']:.0f} | {r['mib_s']:.1f} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | "
                         f"{r['errors']:.0f} | {r['cpu_us']:.1f} | {r['sys_us']:.1f} | {r['cpu_best']:.1f} | {ratio} | {cratio} | "
                         f"{paired(r, base) if n not in ('nginx', 'direct') else '—'} | "
                         f"{paired(r, hap) if n not in ('haproxy', 'direct') else '—'} |")
        if sname == "c2000":
            lines += ["", "RSS under this load: " + ", ".join(
                f"{n} {res[n]['rss'] / 1024:.1f} MiB" for n in names if n in res and res[n].get("rss"))]
        if sname == "circuit_open":
            lines += ["", "Every answer here is a 503 from the open breaker, so `errors` counts all of them."]
        lines.append("")
    lines += ["## Memory", "",
              "Idle connections are held by a freshly started process (the `direct` upstream is not restarted).", "",
              "| contender | RSS idle | RSS after the scenarios | idle keep-alive connections held | RSS with them |",
              "|---|---:|---:|---:|---:|"]
    for n in [n for n in names if n in idle_rss]:
        held, rss = idle.get(n, (0, 0))
        after = f"{after_rss[n] / 1024:.1f} MiB" if n in after_rss else "—"
        lines.append(f"| {n} | {idle_rss[n] / 1024:.1f} MiB | {after} | {held} | {rss / 1024:.1f} MiB |" if held else
                     f"| {n} | {idle_rss[n] / 1024:.1f} MiB | {after} | — | — |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
