"""Text from a language model, one token at a time, and the exact-match score of the builtin
sequence tasks.

Both take any `logits_fn(tokens) -> logits`: int token ids (N, T) in, next-token logits
(N, T, V) out, position t scoring the token after tokens[:, t] (a trained transformer, or a
lookup table in tests). Only the last position's logits are used. There is no key-value
cache: each new token costs one forward pass over at most `context` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from workers.catalogue import TASKS, DatasetInfo

LogitsFn = Callable[[np.ndarray], np.ndarray]
_SAMPLE_TAG = 0x5A3F  # the sampling stream, apart from the data's and the model's


class Generation(NamedTuple):
    tokens: np.ndarray  # int64 (N, max_tokens), or (max_tokens,) for a 1-D prompt
    # The model's log-probability of each token (its softmax at temperature 1, before top-k):
    # how likely the model found the token, whatever chose it.
    logprobs: np.ndarray


def generate(
    logits_fn: LogitsFn,
    prompt_ids,
    max_tokens: int,
    context: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> Generation:
    """Continue each prompt (a row of `prompt_ids`, (N, T) or one (T,)) by `max_tokens`
    tokens. The model reads the last `context` tokens. Temperature 0 is greedy (argmax; the
    lowest id on a tie); above 0 it samples from softmax(logits / temperature), restricted
    to the `top_k` most likely tokens when given, reproducibly from `seed`."""
    tokens = np.asarray(prompt_ids, dtype=np.int64)
    one = tokens.ndim == 1
    tokens = np.atleast_2d(tokens)
    _check(tokens, max_tokens, context, temperature, top_k)
    rng = np.random.default_rng([seed, _SAMPLE_TAG])
    rows = np.arange(len(tokens))
    chosen = np.zeros((len(tokens), max_tokens), dtype=np.int64)
    logprobs = np.zeros((len(tokens), max_tokens))
    for i in range(max_tokens):
        window = tokens[:, -context:]
        logits = np.asarray(logits_fn(window), dtype=np.float64)
        if logits.ndim != 3 or logits.shape[:2] != window.shape:
            raise ValueError(f"logits_fn gave shape {logits.shape} for tokens {window.shape}")
        logits = logits[:, -1]
        if temperature == 0:
            chosen[:, i] = logits.argmax(axis=1)
        else:
            chosen[:, i] = _sample(logits / temperature, top_k, rng)
        logprobs[:, i] = _log_softmax(logits)[rows, chosen[:, i]]
        tokens = np.concatenate([tokens, chosen[:, i, None]], axis=1)
    return Generation(chosen[0], logprobs[0]) if one else Generation(chosen, logprobs)


def _check(tokens, max_tokens, context, temperature, top_k) -> None:
    problems = [
        (tokens.ndim != 2 or tokens.shape[1] == 0, f"prompt_ids: needs >= 1 token; {tokens.shape}"),
        (max_tokens < 0, f"max_tokens must be >= 0, not {max_tokens}"),
        (context < 1, f"context must be >= 1, not {context}"),
        (not 0 <= temperature < np.inf, f"temperature must be >= 0, not {temperature}"),
        (top_k is not None and top_k < 1, f"top_k must be >= 1 or None, not {top_k}"),
    ]
    for wrong, msg in problems:
        if wrong:
            raise ValueError(msg)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _sample(z: np.ndarray, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(z), by inverting its cumulative sum at a uniform draw.
    top_k keeps the tokens at least as likely as the k-th (all of them on a tie), as torch's
    `logits[logits < topk(logits, k).values[:, [-1]]] = -inf` does."""
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    cdf = np.cumsum(np.exp(z - z.max(axis=1, keepdims=True)), axis=1)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), z.shape[1] - 1)


def val_exact_match(logits_fn: LogitsFn, info: DatasetInfo, split) -> float | None:
    """The share of samples (rows of token ids, such as the validation split's X) of a
    builtin task whose greedy completion of the prompt "<question>=" is exactly the answer:
    the answer's tokens, then ".". For addition the prompt is "a+b=" and the answer the sum;
    for reverse, "s=" and s reversed. None when there are no samples."""
    if info.name not in TASKS:
        raise ValueError(f"exact match scores the builtin tasks {sorted(TASKS)}, not {info.name!r}")
    samples = np.asarray(split, dtype=np.int64)
    if len(samples) == 0:
        return None
    equals, dot = info.vocab.index("="), info.vocab.index(".")
    prompt_length = (samples == equals).argmax(axis=1) + 1
    hits = 0
    for p in np.unique(prompt_length):  # prompts of one length run as one batch
        rows = samples[prompt_length == p]
        want = rows[:, p:]
        got = generate(logits_fn, rows[:, :p], want.shape[1], info.context).tokens
        answer = np.arange(want.shape[1]) <= (want == dot).argmax(axis=1)[:, None]  # and "."
        hits += int(((got == want) | ~answer).all(axis=1).sum())
    return hits / len(samples)
