"""Time one training step (forward, loss, backward, optimizer step) of core against PyTorch CPU.

    .venv/bin/python benchmarks/core_step.py [--quick]

Workloads:
  a: MLP 784-256-256-10, batch 256, float32, cross-entropy, default threads for both.
  b: MLP 2-16-16-1, batch 100, float64, MSE, PyTorch at 1 thread (per-op overhead).
  c: CNN conv 1->16 3x3 pad 1, relu, pool 2, conv 16->32 3x3 pad 1, relu, pool 2, flatten,
     linear -> 10; input 1x28x28, batch 128, float32, cross-entropy, both at 1 thread
     (a worker's BLAS threads: one per CPU of its share).
  t: transformer language model: vocab 64, context 64, d_model 128, 4 heads, ff 512, 2 pre-LN
     gelu layers; batch 32, float32, next-token cross-entropy, one Adam step; both at 1 thread.

Both engines start from the same weights and data. Timed blocks alternate between the
engines, each after a 0.3 s pause so the other's thread pool stops spinning; the
reported number is the ratio of the median step times, ours / PyTorch (<= 1 is the goal).
`--reuse-freed-memory` first sets the C allocator as shardgrad's training processes do
(workers/malloc.py); PyTorch's CPU tensors come from the same allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import core.functional as F
from core import nn, optim
from core.lm import TransformerLM
from workers.malloc import reuse_freed_memory

WORKLOADS = {
    "a": dict(
        sizes=[784, 256, 256, 10], batch=256, dtype=np.float32, loss="ce", threads=None, steps=25
    ),
    "b": dict(sizes=[2, 16, 16, 1], batch=100, dtype=np.float64, loss="mse", threads=1, steps=200),
    # sizes: the input shape, then the output width
    "c": dict(sizes=[(1, 28, 28), 10], batch=128, dtype=np.float32, loss="ce", threads=1, steps=15),
    # sizes: the language model's shape (the spec's model.type "transformer")
    "t": dict(
        sizes=dict(vocab=64, context=64, d_model=128, heads=4, layers=2, ff=512),
        batch=32,
        dtype=np.float32,
        loss="ce",
        threads=1,
        steps=6,
    ),
}


def cnn(dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, seed=0, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, seed=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10, dtype=dtype, rng=2),
    )


def torch_cnn(ours: nn.Sequential) -> torch.nn.Sequential:
    """The same CNN in PyTorch; the parameter names are the same."""
    T = torch.nn
    model = T.Sequential(
        T.Conv2d(1, 16, 3, padding=1),
        T.ReLU(),
        T.MaxPool2d(2),
        T.Conv2d(16, 32, 3, padding=1),
        T.ReLU(),
        T.MaxPool2d(2),
        T.Flatten(),
        T.Linear(32 * 7 * 7, 10),
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return model


def torch_model(ours: nn.MLP) -> torch.nn.Sequential:
    """The same network in PyTorch: our layers.<i> are its Sequential index 2i."""
    dtype = getattr(torch, ours.layers[0].weight.dtype.name)  # torch.float32 / float64
    mods = []
    for layer in ours.layers:
        n_out, n_in = layer.weight.shape
        mods += [torch.nn.Linear(n_in, n_out, dtype=dtype), torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods[:-1])
    model.load_state_dict(
        {
            f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": torch.from_numpy(v)
            for k, v in ours.state_dict().items()
        }
    )
    return model


NETS = {"c": "CNN 1x28x28-16-32-10", "t": "LM d128 h4 ff512 L2 T64 V64 adam"}


def make_steps(sizes, batch, dtype, loss, lr=0.01):
    rng = np.random.default_rng(0)
    image = isinstance(sizes[0], tuple)
    X = rng.standard_normal((batch, *np.atleast_1d(sizes[0]))).astype(dtype)
    if loss == "ce":
        y = rng.integers(0, sizes[-1], batch)
        ours_loss, torch_loss = F.cross_entropy, torch.nn.functional.cross_entropy
    else:
        y = rng.standard_normal((batch, sizes[-1])).astype(dtype)
        ours_loss, torch_loss = F.mse_loss, torch.nn.functional.mse_loss

    model = cnn(dtype) if image else nn.MLP(sizes, "relu", dtype=dtype, seed=0)
    tmodel = torch_cnn(model) if image else torch_model(model)
    opts = optim.SGD(model.parameters(), lr=lr), torch.optim.SGD(tmodel.parameters(), lr=lr)
    return paired_steps((model, tmodel), opts, (ours_loss, torch_loss), X, y)


def lm_steps(sizes, batch, dtype, loss, lr=1e-3):
    """The transformer workload: next-token cross-entropy over (batch, context) tokens."""
    vocab, context = sizes["vocab"], sizes["context"]
    tokens = np.random.default_rng(0).integers(0, vocab, (batch, context + 1))
    args = vocab, context, sizes["d_model"], sizes["heads"], sizes["layers"], sizes["ff"]
    model = TransformerLM(*args, dtype=dtype, seed=0)
    tmodel = torch_lm(model, *args)
    opts = optim.Adam(model.parameters(), lr=lr), torch.optim.Adam(tmodel.parameters(), lr=lr)

    def torch_loss(logits, y):  # what a torch user writes: the classes flattened
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    losses = F.cross_entropy, torch_loss
    return paired_steps((model, tmodel), opts, losses, tokens[:, :-1], tokens[:, 1:])


def torch_lm(ours: TransformerLM, vocab, context, d_model, heads, layers, ff) -> torch.nn.Module:
    """The same language model in PyTorch (pre-LN gelu encoder layers, causal mask)."""
    T = torch.nn
    dtype = getattr(torch, ours.head.weight.dtype.name)

    class LM(T.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = T.Embedding(vocab, d_model, dtype=dtype)
            self.pos_emb = T.Embedding(context, d_model, dtype=dtype)
            self.blocks = T.ModuleList(
                T.TransformerEncoderLayer(
                    d_model, heads, ff, 0.0, "gelu", batch_first=True, norm_first=True, dtype=dtype
                )
                for _ in range(layers)
            )
            self.norm = T.LayerNorm(d_model, dtype=dtype)
            self.head = T.Linear(d_model, vocab, dtype=dtype)
            mask = T.Transformer.generate_square_subsequent_mask(context, dtype=dtype)
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, tokens):
            x = self.tok_emb(tokens) + self.pos_emb.weight[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x, src_mask=self.mask, is_causal=True)
            return self.head(self.norm(x))

    model = LM()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return model


def paired_steps(models, opts, losses, X, y):
    """One training step of each engine on (X, y), after checking their first losses agree."""
    (model, tmodel), (opt, topt), (ours_loss, torch_loss) = models, opts, losses

    def ours():
        opt.zero_grad()
        out = ours_loss(model(X), y)
        out.backward()
        opt.step()
        return out.data

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


def run(name: str, rounds: int) -> tuple[float, float, list[float]]:
    """Median step times (ours, PyTorch) over all blocks, and each round's ratio."""
    spec = dict(WORKLOADS[name])
    threads, steps = spec.pop("threads"), spec.pop("steps")
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    # The CNN runs as a worker does: our BLAS at 1 thread too (b measures per-op overhead).
    ours_limit = threadpool_limits(1) if name in "ct" else contextlib.nullcontext()
    try:
        with ours_limit:
            ours, theirs = (lm_steps if name == "t" else make_steps)(**spec)
            for _ in range(5):
                ours(), theirs()
            t_ours, t_torch, ratios = [], [], []
            for r in range(rounds):  # alternate which engine goes first
                blocks = {}
                for step in (ours, theirs) if r % 2 == 0 else (theirs, ours):
                    blocks[step] = timed_block(step, steps)
                t_ours += blocks[ours]
                t_torch += blocks[theirs]
                ratios.append(statistics.median(blocks[ours]) / statistics.median(blocks[theirs]))
    finally:
        torch.set_num_threads(default_threads)
    return statistics.median(t_ours), statistics.median(t_torch), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--workloads", default="abc", help="which workloads to run, e.g. 'a'")
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="set the allocator as the product's training processes do (workers/malloc.py); "
        "it applies to both engines",
    )
    args = parser.parse_args()
    if args.reuse_freed_memory and not reuse_freed_memory():
        parser.error("--reuse-freed-memory needs glibc")
    rounds = 6 if args.quick else 24  # many short alternating blocks even out a noisy machine
    results = {name: run(name, rounds) for name in args.workloads}
    print(f"{'workload':<46} {'ours ms':>8} {'torch ms':>8} {'ratio':>6}  per-round ratio p25-p75")
    for name, (ours, theirs, ratios) in results.items():
        spec = WORKLOADS[name]
        net = NETS.get(name) or "MLP " + "-".join(map(str, spec["sizes"]))
        label = f"{name}: {net} b{spec['batch']} {np.dtype(spec['dtype']).name} {spec['loss']}"
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        times = f"{ours * 1e3:>8.3f} {theirs * 1e3:>8.3f} {ours / theirs:>6.2f}"
        print(f"{label:<46} {times}  {q1:.2f}-{q3:.2f}")
    for name, (ours, theirs, _) in results.items():
        ms = f"ours {ours * 1e3:.2f} ms, torch {theirs * 1e3:.2f} ms"
        print(f"{name}: ratio={ours / theirs:.2f} ({ms})")


if __name__ == "__main__":
    main()
