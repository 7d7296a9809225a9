"""Time from a submission to the job's first step, on a warm service.

    python benchmarks/first_step.py [--rounds 5] [--url URL]

Starts `shardgrad serve` on a temporary directory (its own embedded Ray, as `make run`
does), or measures `--url`. The service is warmed up by one job run to the end first: a
warm service has Ray started and its modules imported, as it has after its first job.
Then, for each spec below in turn, round after round: the clock starts before the POST
and stops when `GET /jobs/{id}` first reports `progress.step >= 1` (polled every 5 ms);
the job is then cancelled and awaited. Target (issue 13): median <= 1.0 s.

- `moons, auto`: the shipped moons example as a user submits it (`workers: "auto"`).
- `moons, 2 workers`: the same on 2 Ray workers, the replicated step. The run steps on the
  coordinator, as its workers would, while they start (the head start, workers/headstart.py);
  also shown: when the workers took over (the job first lists its worker nodes), after the
  placement group, worker processes, data, replicas and the compiled graph have started.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.submit_latency import start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def moons(**overrides) -> dict:
    spec = json.loads((ROOT / "examples" / "moons.json").read_text())
    return {**spec, "epochs": 200, **overrides}


SPECS = {
    "moons, auto": moons(workers="auto"),
    "moons, 2 workers": moons(workers=2, cpus_per_worker=0.5, epochs=5000),
}


def wait_for(client: httpx.Client, job: str, done) -> tuple[dict, float]:
    while True:
        body = client.get(f"/api/v1/jobs/{job}").json()
        if done(body):
            return body, time.perf_counter()
        time.sleep(0.005)


def first_step(client: httpx.Client, spec: dict) -> tuple[float, float | None]:
    """Seconds to the first step, and to the workers' taking over (None in-process)."""
    began = time.perf_counter()
    answer = client.post("/api/v1/jobs", json=spec)
    answer.raise_for_status()
    job = answer.json()["id"]
    body, seen = wait_for(
        client,
        job,
        lambda b: (b["progress"] or {}).get("step", 0) >= 1 or b["status"] == "failed",
    )
    if body["status"] == "failed":
        sys.exit(f"job failed: {body['error']}")
    joined = None
    if spec["workers"] != "auto":
        body, at = wait_for(client, job, lambda b: b["worker_nodes"] or b["status"] != "running")
        joined = at - began if body["worker_nodes"] else None
    client.post(f"/api/v1/jobs/{job}/cancel")
    wait_for(client, job, lambda b: b["status"] in ("cancelled", "succeeded", "failed"))
    return seen - began, joined


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(tempfile.mkdtemp(prefix="sg-first-step-"), paused=False)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            warm = client.post("/api/v1/jobs", json=moons(epochs=5, workers=2)).json()["id"]
            wait_for(client, warm, lambda b: b["status"] in ("succeeded", "failed", "cancelled"))
            times: dict[str, list[float]] = {label: [] for label in SPECS}
            joins: list[float] = []
            for _ in range(args.rounds):
                for label, spec in SPECS.items():
                    first, joined = first_step(client, spec)
                    times[label].append(first)
                    joins += [joined] if joined is not None else []
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"first step after submit, warm service: median of {args.rounds} round(s)")
    for label, values in times.items():
        median = statistics.median(values)
        verdict = "ok" if median <= TARGET_S else "MISSED"
        print(
            f"  {label:18s} {median:.3f} s  (rounds {min(values):.3f}-{max(values):.3f}; "
            f"target <= {TARGET_S:.1f} s: {verdict})"
        )
    if joins:
        print(
            f"  {'2 workers took over':18s} {statistics.median(joins):.3f} s  (rounds "
            f"{min(joins):.3f}-{max(joins):.3f}; the steps before ran on the coordinator)"
        )


if __name__ == "__main__":
    main()
