"""POST /jobs latency under 50 concurrent clients: p50 / p95 / p99.

    python benchmarks/submit_latency.py                 # starts a paused server on a temp dir
    python benchmarks/submit_latency.py --url http://127.0.0.1:8000 [--token T]

The started server is paused (SHARDGRAD_PAUSED=true): jobs are validated, stored and
queued but never run, so this measures the API and the store. Target: p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def start_server(data_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SHARDGRAD_PAUSED": "true", "SHARDGRAD_RAY_NUM_CPUS": "1"}
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


async def measure(url: str, token: str | None, clients: int, requests: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[float] = []
    todo = iter(range(requests))

    async def client():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            for i in todo:
                t0 = time.perf_counter()
                r = await c.post("/api/v1/jobs", json=SPEC | {"name": f"bench-{i}"})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 201:
                    raise SystemExit(f"POST /jobs -> {r.status_code}: {r.text[:300]}")

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing server (default: start a paused one)")
    parser.add_argument("--token", default=os.environ.get("SHARDGRAD_API_TOKEN"))
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory(prefix="shardgrad-bench-") as tmp:
        url = args.url
        if url is None:
            proc, url = start_server(tmp)
        try:
            asyncio.run(measure(url, args.token, args.clients, args.warmup))
            t0 = time.perf_counter()
            lat = asyncio.run(measure(url, args.token, args.clients, args.requests))
            wall = time.perf_counter() - t0
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    ms = np.array(lat) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    print(f"POST /jobs, {args.clients} concurrent clients, {len(ms)} requests, {wall:.1f} s")
    print(f"p50 {p50:.1f} ms   p95 {p95:.1f} ms   p99 {p99:.1f} ms   ({len(ms) / wall:.0f} req/s)")
    print("target p99 <= 50 ms:", "met" if p99 <= 50 else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
