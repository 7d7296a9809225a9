"""Every shipped example, as a user runs it: in-process, 1 worker, 2 workers and auto.

    python benchmarks/examples.py [--quick] [--examples moons,digits]

Each example in examples/*.json is trained by the real Trainer (the code behind
`shardgrad train`) with `workers` set to 0 (in-process), 1, 2 and "auto", on one local
Ray (num_cpus=2) started once in this process, so worker start-up is counted but Ray's
own start is not. A run's wall time is the Trainer's `elapsed_s` (start-up, every step,
evaluation and checkpoints included); steps/s is its steps over that time. Each round
runs every mode, starting at a different one, and the table gives the median over rounds
(4, or 1 with --quick).

Target (issue 13): for every example, auto <= 1.1 x the best fixed choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray

from workers.spec import TrainingSpec
from workers.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODES: tuple[int | str, ...] = (0, 1, 2, "auto")
TARGET = 1.1


def label(mode: int | str) -> str:
    return {0: "in-process", 1: "1 worker", 2: "2 workers"}.get(mode, str(mode))


def run(spec: TrainingSpec, mode: int | str, out: Path) -> dict:
    summary = Trainer(spec, out, workers=mode).run()
    if summary["status"] != "succeeded":
        raise SystemExit(f"{spec.name} with workers={mode}: {summary.get('error')}")
    return summary


def bench(name: str, rounds: int, tmp: Path) -> dict:
    spec = TrainingSpec.model_validate(json.loads((EXAMPLES / f"{name}.json").read_text()))
    walls: dict[int | str, list[float]] = {m: [] for m in MODES}
    chosen = []
    for r in range(rounds):
        # Each round starts at another mode: a run right after a Ray run shares the CPUs
        # with that run's workers shutting down, and no mode should always come there.
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            summary = run(spec, mode, tmp / f"{name}-{label(mode)}-{r}")
            walls[mode].append(summary["elapsed_s"])
            if mode == "auto":
                chosen.append(summary.get("workers"))
    steps = summary["steps"]
    wall = {m: statistics.median(w) for m, w in walls.items()}
    best = min((m for m in MODES if m != "auto"), key=lambda m: wall[m])
    return {"name": name, "steps": steps, "wall": wall, "best": best, "chosen": chosen}


def report(rows: list[dict]) -> None:
    head = "".join(f"{label(m):>18}" for m in MODES)
    print(f"{'example':10}{'steps':>6}{head}   auto chose / auto vs best fixed")
    for row in rows:
        wall, steps = row["wall"], row["steps"]
        cells = "".join(f"{f'{wall[m]:.2f} s ({steps / wall[m]:.0f}/s)':>18}" for m in MODES)
        ratio = wall["auto"] / wall[row["best"]]
        chose = ", ".join(label(c) if c is not None else "?" for c in row["chosen"])
        verdict = "ok" if ratio <= TARGET else f"over {TARGET}"
        print(f"{row['name']:10}{steps:>6}{cells}   {chose} / {ratio:.2f} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--examples", help="comma-separated names (default: all)")
    args = parser.parse_args()
    names = (
        args.examples.split(",")
        if args.examples
        else sorted(p.stem for p in EXAMPLES.glob("*.json") if not p.stem.endswith("-sweep"))
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="sg-examples-"))
    rounds = 1 if args.quick else len(MODES)
    rows = [bench(name, rounds, tmp) for name in names]
    print(f"wall time (median of {rounds} round(s)) and steps/s; 2 CPUs")
    report(rows)


if __name__ == "__main__":
    main()
