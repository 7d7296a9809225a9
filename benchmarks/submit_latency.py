"""POST /api/v1/jobs latency with 50 clients: p50 / p95 / p99 under three load models.

    python benchmarks/submit_latency.py      # starts a paused `shardgrad serve` on a temp dir
    python benchmarks/submit_latency.py --url http://127.0.0.1:8000 [--token T]
    python benchmarks/submit_latency.py --model paced --rate 400 --requests 4000

The started server is the one `make run` starts (`shardgrad serve`: uvicorn, one process,
embedded Ray, SQLite under the data dir) with SHARDGRAD_PAUSED=true: every job is
validated, stored and queued but none runs, so this measures the API and the store, not
training. The clients run on the same machine and share its cores with the server.

Load models, 50 clients, each with its own keep-alive connection:

- paced (the target, p99 <= 50 ms): the 50 clients submit at a script's pace, `--rate`
  requests/s in total (default 250), for `--requests / --rate` seconds. Each client sends
  on its own Poisson schedule and has at most one request in flight; latency is counted
  from the time the schedule said to send, so when the server stalls, the requests held
  back behind the slow one count their wait too (no coordinated omission).
- burst: all 50 clients submit at the same instant, wait for all 50 answers, pause
  `--pause` s, repeat. Latency is counted from the start of the burst. Its p99 is about
  the time the server needs for 50 submissions back to back.
- closed (saturation): 50 clients submit back to back, each as soon as its previous answer
  came. Latency is then 50 / throughput by construction (Little's law): this measures
  throughput, not the latency a client sees at a realistic load.

The default client writes HTTP/1.1 requests on raw sockets and reads each whole response
(status line, headers, Content-Length body) before the clock stops; any status but 201
aborts the run. It costs ~0.05 ms of CPU per request, where httpx costs ~1.3 ms, which on
a small machine the server would otherwise lose to the load generator (wrk and hey exist
for the same reason). `--client httpx` measures with httpx.AsyncClient instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

SPEC = {
    "name": "bench",
    "model": {"type": "mlp", "sizes": [2, 8, 2], "activation": "tanh"},
    "data": {"type": "builtin", "name": "moons", "n_samples": 200, "noise": 0.1},
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.1},
    "epochs": 1,
    "batch_size": 20,
    "workers": 1,
    "cpus_per_worker": 0.5,
}
PATH = "/api/v1/jobs"
TARGET_MS = 50.0


def start_server(data_dir: str, paused: bool = True) -> tuple[subprocess.Popen, str]:
    """`shardgrad serve` on a free port (paused: jobs are queued, none runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SHARDGRAD_PAUSED": "true" if paused else "false"}
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--data-dir", data_dir]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start")


def body(n: int) -> bytes:
    return json.dumps(SPEC | {"name": f"bench-{n}"}).encode()


class RawClient:
    """One keep-alive HTTP/1.1 connection; `post` returns once the whole response is read."""

    def __init__(self, url: str, token: str | None):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {parts.netloc}\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.reader = self.writer = None

    async def post(self, n: int) -> None:
        payload = body(n)
        for attempt in (1, 2):  # a keep-alive connection the server closed: reconnect once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(self.head + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if attempt == 2:
                    raise
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        length = headers.get("content-length")
        text = await (self.reader.readexactly(int(length)) if length else self.reader.read())
        if length is None or headers.get("connection") == "close":
            await self.close()
        if status != 201:
            raise SystemExit(f"POST {PATH} -> {status}: {text[:300]!r}")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


class HttpxClient:
    def __init__(self, url: str, token: str | None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=60)

    async def post(self, n: int) -> None:
        r = await self.http.post(
            PATH, content=body(n), headers={"content-type": "application/json"}
        )
        if r.status_code != 201:
            raise SystemExit(f"POST {PATH} -> {r.status_code}: {r.text[:300]}")

    async def close(self) -> None:
        await self.http.aclose()


class Clients:
    def __init__(self, kind: str, url: str, token: str | None, n: int):
        make = RawClient if kind == "raw" else HttpxClient
        self.each = [make(url, token) for _ in range(n)]
        self.sent = 0

    async def post(self, i: int) -> None:
        self.sent += 1
        await self.each[i].post(self.sent)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.each))


async def closed(clients: Clients, requests: int) -> list[float]:
    latencies: list[float] = []
    todo = iter(range(requests))

    async def client(i: int) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await clients.post(i)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(i) for i in range(len(clients.each))))
    return latencies


async def paced(clients: Clients, duration: float, rate: float, seed: int = 0) -> list[float]:
    n = len(clients.each)
    latencies: list[float] = []
    start = time.perf_counter()

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        due = start + rng.expovariate(rate / n)
        while due < start + duration:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await clients.post(i)
            latencies.append(time.perf_counter() - due)  # from the scheduled send time
            due += rng.expovariate(rate / n)

    await asyncio.gather(*(client(i) for i in range(n)))
    return latencies


async def burst(clients: Clients, requests: int, pause: float) -> list[float]:
    latencies: list[float] = []

    async def one(i: int, t0: float) -> None:
        await clients.post(i)
        latencies.append(time.perf_counter() - t0)

    for _ in range(max(1, requests // len(clients.each))):
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, t0) for i in range(len(clients.each))))
        await asyncio.sleep(pause)
    return latencies


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a local process (Linux), for the server's CPU per request."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args, url: str, pid: int | None) -> list[tuple]:
    clients = Clients(args.client, url, args.token, args.clients)
    results = []
    try:
        await closed(clients, args.warmup)  # connections open, server code paths warm
        models = ("paced", "burst", "closed") if args.model == "all" else (args.model,)
        for model in models:
            load, cpu0, t0 = os.getloadavg()[0], cpu_seconds(pid), time.perf_counter()
            if model == "paced":
                duration = args.requests / args.rate
                lat = await paced(clients, duration, args.rate)
                title = (
                    f"paced: {args.clients} clients, Poisson, {args.rate:g} req/s in total for "
                    f"{duration:g} s; latency from the scheduled send time"
                )
            elif model == "burst":
                lat = await burst(clients, args.requests, args.pause)
                title = (
                    f"burst: {args.clients} simultaneous submissions, {args.pause:g} s apart, "
                    f"x{len(lat) // args.clients}; latency from the burst's start"
                )
            else:
                lat = await closed(clients, args.requests)
                title = f"closed loop (saturation): {args.clients} clients back to back"
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(pid)
            server_ms = None if cpu is None or cpu0 is None else 1000 * (cpu - cpu0) / len(lat)
            results.append((model, title, lat, wall, server_ms, load))
    finally:
        await clients.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing server (default: start a paused one)")
    parser.add_argument("--pid", type=int, help="the --url server's pid, for its CPU per request")
    parser.add_argument("--token", default=os.environ.get("SHARDGRAD_API_TOKEN"))
    parser.add_argument("--model", choices=("all", "paced", "burst", "closed"), default="all")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=250.0, help="paced: requests/s in total")
    parser.add_argument("--pause", type=float, default=0.5, help="burst: seconds between bursts")
    parser.add_argument("--requests", type=int, default=2000, help="per load model (about)")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory(prefix="shardgrad-bench-") as tmp:
        url, pid = args.url, args.pid
        if url is None:
            proc, url = start_server(tmp)
            pid = proc.pid
        try:
            results = asyncio.run(run(args, url, pid))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)

    where = "a paused `shardgrad serve` started for this run" if proc else url
    print(f"POST {PATH} on {where}; {args.client} client; {os.cpu_count()} CPUs shared")
    for model, title, lat, wall, server_ms, load in results:
        p50, p95, p99 = np.percentile(np.array(lat) * 1000, [50, 95, 99])
        cpu = f", server CPU {server_ms:.2f} ms/request" if server_ms is not None else ""
        print(title)
        print(
            f"  {len(lat)} requests in {wall:.1f} s ({len(lat) / wall:.0f} req/s{cpu}; "
            f"load average {load:.1f} at the start)"
        )
        print(f"  p50 {p50:.1f} ms   p95 {p95:.1f} ms   p99 {p99:.1f} ms")
        if model == "paced":
            verdict = "met" if p99 <= TARGET_MS else "NOT met"
            print(f"  target p99 <= {TARGET_MS:g} ms: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
