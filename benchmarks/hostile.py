"""Hostile bodies against a live service: /healthz latency while each is refused, and the
service's peak memory while each dataset bomb is refused (issue 16).

    python benchmarks/hostile.py          # starts a paused `shardgrad serve` on a temp dir

The server is the one `make run` starts (uvicorn, one process, embedded Ray, SQLite),
paused so that nothing trains (started as benchmarks/submit_latency.py starts it). For
each body, a prober process sends GET /healthz back to back on its own connection from
0.3 s before the body is sent until its answer has come; the report gives the prober's
slowest answer (the target: under 100 ms) and the body's own answer time. For each
dataset bomb, the RSS of the server and its body-validator process is sampled every
5 ms; the report gives the peak above the level before the upload. The machine's other
load counts: run it on a quiet one.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import tempfile
import threading
import time
import zipfile

import httpx
import numpy as np
import psutil
from submit_latency import start_server  # the same paused `shardgrad serve`

MB = 1024 * 1024
TARGET_MS = 100.0
SPEC = {
    "name": "hostile",
    "model": {"type": "mlp", "sizes": [2, 8, 2]},
    "data": {"type": "builtin", "name": "moons", "n_samples": 200},
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.1},
    "epochs": 1,
    "batch_size": 20,
}


def json_bodies() -> dict[str, bytes]:
    """The worst bodies under the 1 MB cap, each for POST /api/v1/jobs."""
    n = MB - 200
    zero_sizes = json.dumps(SPEC | {"model": {"type": "mlp", "sizes": [0] * (n // 3)}})
    wrong = json.dumps(SPEC | {"model": {"type": "mlp", "sizes": ["x"] * (n // 5)}})
    return {
        "1 MB of {} (slowest json.loads)": b"[" + b"{}," * (n // 3) + b"{}]",
        "model.sizes: 350,000 zeros": zero_sizes[: MB - 10].rsplit(",", 1)[0].encode() + b"]}}",
        "model.sizes: 200,000 strings": wrong[: MB - 10].rsplit(",", 1)[0].encode() + b"]}}",
        "nesting 1 MB deep": b"[" * n,
        "a 1 MB integer": b'{"epochs": ' + b"9" * (n - 20) + b"}",
        "name: lone surrogates": b'{"name": "' + b"\\ud800" * (n // 6 - 2) + b'"}',
    }


def archive(**members) -> bytes:
    """A deflated zip of .npy members, each given as pieces written one after another (so
    that hundreds of MB of zeros never sit in memory at once)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, pieces in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                for piece in pieces:
                    f.write(piece)
    return out.getvalue()


def npy(shape: tuple, n_bytes: int, piece: int = 8 * MB):
    """An .npy member claiming `shape`, then `n_bytes` zero bytes, piece by piece."""
    yield npy_header(shape)
    for start in range(0, n_bytes, piece):
        yield bytes(min(piece, n_bytes - start))


def npy_header(shape: tuple, dtype: str = "<f8") -> bytes:
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def bombs() -> dict[str, tuple[str, bytes]]:
    """Dataset uploads that must be refused without allocating what they claim."""
    deflated = archive(X=npy((20_000_000, 2), 320_000_000), y=npy((20_000_000,), 160_000_000))
    lying = archive(X=npy((10, 2), 320_000_000), y=npy((10,), 80))
    csv = b"a,b,y\n" + b"0.5,0.25,1\n" * (9 * MB)  # 28 M values, ~95 MB
    return {
        "npz header claiming (10**12, 2), 14.6 TiB": (
            "bomb.npz",
            archive(X=npy((10**12, 2), 0), y=npy((10**12,), 0)),
        ),
        f"npz deflating {480_000_000 // len(deflated)}:1 to 480 MB": (
            "deflate.npz",
            deflated,
        ),
        "npz holding 320 MB behind a (10, 2) header": ("lying.npz", lying),
        f"csv of 28 M values, {len(csv) // MB} MB": ("big.csv", csv),
    }


def _probe(url: str, stop, slowest, count) -> None:
    """GET /healthz back to back until `stop`; the slowest answer and how many."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get("/healthz")
            took = time.perf_counter() - start
            with slowest.get_lock():
                slowest.value = max(slowest.value, took)
            count.value += 1


class Prober:
    """The prober runs in a process of its own: in this one it would wait for the GIL while
    the client builds and sends a 100 MB upload, and count the client's delay as the
    service's."""

    def __init__(self, url: str):
        ctx = multiprocessing.get_context("spawn")
        self.stop, self._slowest, self._count = ctx.Event(), ctx.Value("d", 0.0), ctx.Value("i", 0)
        self.proc = ctx.Process(target=_probe, args=(url, self.stop, self._slowest, self._count))

    def start(self) -> None:
        self.proc.start()
        while self._count.value == 0:  # its interpreter is up and the first answer came
            time.sleep(0.01)

    def join(self) -> None:
        self.proc.join()
        self.slowest, self.count = self._slowest.value, self._count.value


class RssSampler(threading.Thread):
    """The peak RSS of a process and its children, every 5 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.stop = psutil.Process(pid), threading.Event()
        self.baseline = self.peak = self.rss()

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=False)]
        return sum(p.memory_info().rss for p in procs if p.is_running())

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)


def under_probe(url: str, send) -> tuple[httpx.Response, float, float, int]:
    prober = Prober(url)
    prober.start()
    time.sleep(0.3)
    start = time.perf_counter()
    r = send()
    took = time.perf_counter() - start
    prober.stop.set()
    prober.join()
    return r, took, prober.slowest, prober.count


def main() -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = start_server(data_dir)
        try:
            report(url, proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)


def report(url: str, pid: int) -> None:
    client = httpx.Client(base_url=url, timeout=120)
    headers = {"content-type": "application/json"}
    warm_up = json.dumps(SPEC | {"model": {"type": "mlp", "sizes": [2] * 10_000}}).encode()
    client.post("/api/v1/jobs", content=warm_up, headers=headers)  # the validator is up
    print(f"/healthz while the worst bodies are refused (target: slowest < {TARGET_MS:g} ms)")
    worst = 0.0
    for name, body in json_bodies().items():
        r, took, slowest, n = under_probe(
            url, lambda b=body: client.post("/api/v1/jobs", content=b, headers=headers)
        )
        worst = max(worst, slowest)
        print(
            f"  {name:32s} {len(body) / MB:4.2f} MB -> {r.status_code} in {took * 1000:6.0f} ms,"
            f" {len(r.content):5d} B; /healthz slowest {slowest * 1000:5.1f} ms of {n}"
        )
    print(f"  slowest /healthz under any body: {worst * 1000:.1f} ms")
    print("peak RSS of the service (and its body validator) while each bomb is refused")
    for name, (filename, raw) in bombs().items():
        sampler = RssSampler(pid)
        sampler.start()
        r, took, slowest, _ = under_probe(
            url, lambda f=filename, b=raw: client.post("/api/v1/datasets", files={"file": (f, b)})
        )
        sampler.stop.set()
        sampler.join()
        detail = r.json()["detail"][0]["msg"][:70] if r.status_code == 422 else r.text[:70]
        print(
            f"  {name:44s} {len(raw) / MB:7.2f} MB -> {r.status_code} in {took * 1000:5.0f} ms,"
            f" RSS {sampler.baseline / MB:5.0f} -> peak {sampler.peak / MB:5.0f} MB"
            f" (+{(sampler.peak - sampler.baseline) / MB:.0f}); /healthz slowest"
            f" {slowest * 1000:.0f} ms\n      {detail}"
        )


if __name__ == "__main__":
    main()
