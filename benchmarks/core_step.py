"""Time one training step (forward, loss, backward, SGD step) of core against PyTorch CPU.

    .venv/bin/python benchmarks/core_step.py [--quick]

Workloads:
  a: MLP 784-256-256-10, batch 256, float32, cross-entropy, default threads for both.
  b: MLP 2-16-16-1, batch 100, float64, MSE, PyTorch at 1 thread (per-op overhead).

Both engines start from the same weights and data. Timed blocks alternate between the
engines, each after a 0.3 s pause so the other's thread pool stops spinning; the
reported number is the ratio of the median step times, ours / PyTorch (<= 1 is the goal).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import core.functional as F
from core import nn, optim

WORKLOADS = {
    "a": dict(
        sizes=[784, 256, 256, 10], batch=256, dtype=np.float32, loss="ce", threads=None, steps=50
    ),
    "b": dict(sizes=[2, 16, 16, 1], batch=100, dtype=np.float64, loss="mse", threads=1, steps=400),
}


def torch_model(ours: nn.MLP) -> torch.nn.Sequential:
    """The same network in PyTorch: our layers.<i> are its Sequential index 2i."""
    mods = []
    for layer in ours.layers:
        mods += [torch.nn.Linear(layer.weight.shape[1], layer.weight.shape[0]), torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods[:-1])
    state = {
        f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": torch.from_numpy(v)
        for k, v in ours.state_dict().items()
    }
    model.load_state_dict(state)
    return model.to(torch.from_numpy(np.zeros(0, ours.layers[0].weight.dtype)).dtype)


def make_steps(sizes, batch, dtype, loss, lr=0.01):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    if loss == "ce":
        y = rng.integers(0, sizes[-1], batch)
        ours_loss, torch_loss = F.cross_entropy, torch.nn.functional.cross_entropy
    else:
        y = rng.standard_normal((batch, sizes[-1])).astype(dtype)
        ours_loss, torch_loss = F.mse_loss, torch.nn.functional.mse_loss

    model = nn.MLP(sizes, "relu", dtype=dtype, seed=0)
    opt = optim.SGD(model.parameters(), lr=lr)

    def ours():
        opt.zero_grad()
        out = ours_loss(model(X), y)
        out.backward()
        opt.step()
        return out.data

    tmodel = torch_model(model)
    topt = torch.optim.SGD(tmodel.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def theirs():
        topt.zero_grad()
        out = torch_loss(tmodel(Xt), yt)
        out.backward()
        topt.step()
        return out.detach()

    first = (float(ours()), float(theirs()))
    if not np.isclose(*first, rtol=1e-4):
        raise SystemExit(f"engines disagree on the first loss: {first}")
    return ours, theirs


def timed_block(step, n: int) -> list[float]:
    time.sleep(0.3)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def run(name: str, rounds: int, quick: bool) -> tuple[float, float]:
    spec = dict(WORKLOADS[name])
    threads, steps = spec.pop("threads"), spec.pop("steps")
    steps = steps // 3 if quick else steps
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        ours, theirs = make_steps(**spec)
        for _ in range(5):
            ours(), theirs()
        t_ours, t_torch = [], []
        for r in range(rounds):  # alternate which engine goes first
            pair = [(ours, t_ours), (theirs, t_torch)]
            for step, times in pair if r % 2 == 0 else pair[::-1]:
                times += timed_block(step, steps)
    finally:
        torch.set_num_threads(default_threads)
    return statistics.median(t_ours), statistics.median(t_torch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--workloads", default="ab", help="which workloads to run, e.g. 'a'")
    args = parser.parse_args()
    rounds = 4 if args.quick else 12
    results = {name: run(name, rounds, args.quick) for name in args.workloads}
    print(f"{'workload':<48} {'ours ms':>9} {'torch ms':>9} {'ratio':>6}")
    for name, (ours, theirs) in results.items():
        spec = WORKLOADS[name]
        label = (
            f"{name}: MLP {'-'.join(map(str, spec['sizes']))} b{spec['batch']} "
            f"{np.dtype(spec['dtype']).name} {spec['loss']}"
        )
        print(f"{label:<48} {ours * 1e3:>9.3f} {theirs * 1e3:>9.3f} {ours / theirs:>6.2f}")
    for name, (ours, theirs) in results.items():
        ms = f"ours {ours * 1e3:.2f} ms, torch {theirs * 1e3:.2f} ms"
        print(f"{name}: ratio={ours / theirs:.2f} ({ms})")


if __name__ == "__main__":
    main()
