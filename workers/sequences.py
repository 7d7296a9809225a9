"""Sequence data: the builtin tasks (addition, reverse), uploaded text, and the token ids
both become.

A sequence sample is one row of token ids, `context + 1` of them: a model reads
`X[:, :-1]` and predicts `X[:, 1:]`. X is int64; y holds nothing (shape (n, 0)), so every
path that gathers `X[idx], y[idx]` for a batch works unchanged.

Uploaded text is stored as a stream of character ids with its vocabulary (the sorted set of
its characters). A model's `context` cuts the stream into windows of `context + 1`
characters, `context` apart: consecutive windows share one character, so every character
but the first is predicted exactly once per epoch, and no window is drawn twice.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from workers.catalogue import DIGITS_VOCAB, TASKS, DatasetInfo, TooManyValues

TEXT_CHUNK = 1024 * 1024  # bytes of an upload decoded at once


class UnknownSymbol(ValueError):
    """A character outside a vocabulary; `position` is its index in the text."""

    def __init__(self, text: str, position: int):
        self.position = position
        super().__init__(
            f"character {text[position]!r} at position {position} is not in the vocabulary"
        )


def encode(text: str, vocab: Sequence[str]) -> np.ndarray:
    """The token ids of `text`; UnknownSymbol names the first character `vocab` lacks."""
    index = {symbol: i for i, symbol in enumerate(vocab)}
    ids = [index.get(ch, -1) for ch in text]
    if -1 in ids:
        raise UnknownSymbol(text, ids.index(-1))
    return np.array(ids, dtype=np.int64)


def decode(ids, vocab: Sequence[str]) -> str:
    return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


# ---------------------------------------------------------------- builtin tasks


def task_samples(name: str, n_digits: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """`n_samples` distinct samples of a builtin task, as token ids (n_samples, length)."""
    task = TASKS[name]
    index = rng.choice(task.capacity(n_digits), n_samples, replace=False)
    length = task.length(n_digits)
    if name == "addition":
        a, b = _unordered_pair(index)
        swap = rng.random(n_samples) < 0.5  # which of a+b and b+a stands for the pair
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        texts = (
            f"{x}+{y}={x + y}".ljust(length, ".")
            for x, y in zip(a.tolist(), b.tolist(), strict=True)
        )
    else:
        digits = _digit_strings(index)
        texts = (f"{s}={s[::-1]}".ljust(length, ".") for s in digits)
    return _ascii_ids("".join(texts), DIGITS_VOCAB).reshape(n_samples, length)


def _unordered_pair(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k-th pair (a, b), a <= b, in the order (0,0), (0,1), (1,1), (0,2), ...:
    b is the largest with b(b+1)/2 <= k (found by sqrt, then corrected for rounding)."""
    b = ((np.sqrt(8.0 * k + 1) - 1) // 2).astype(np.int64)
    b -= b * (b + 1) // 2 > k
    b += (b + 1) * (b + 2) // 2 <= k
    return k - b * (b + 1) // 2, b


def _digit_strings(k: np.ndarray) -> list[str]:
    """The k-th digit string in the order 0..9, 00..99, 000..999, ..."""
    starts = np.cumsum([0] + [10**n for n in range(1, 19)])  # index of the first of n + 1 digits
    digits = np.searchsorted(starts, k, side="right")
    return [
        f"{v:0{n}d}"
        for v, n in zip((k - starts[digits - 1]).tolist(), digits.tolist(), strict=True)
    ]


def _ascii_ids(text: str, vocab: Sequence[str]) -> np.ndarray:
    """encode() of an ASCII text over an ASCII vocabulary, by table lookup (fast)."""
    table = np.zeros(128, dtype=np.int64)
    table[[ord(s) for s in vocab]] = np.arange(len(vocab))
    return table[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


# ---------------------------------------------------------------- uploaded text


def read_text(raw: bytes, max_chars: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """The character ids and the vocabulary (sorted set of characters) of UTF-8 text,
    decoded TEXT_CHUNK bytes at a time: more than `max_chars` characters are refused as
    soon as they are counted, and invalid UTF-8 is refused naming its byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    chunks, count = [], 0
    for start in range(0, len(raw) + 1, TEXT_CHUNK):
        pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
        try:
            text = decoder.decode(
                raw[start : start + TEXT_CHUNK], final=start + TEXT_CHUNK > len(raw)
            )
        except UnicodeDecodeError as e:
            at = start - pending + e.start
            raise ValueError(f"the .txt file is not UTF-8: byte {at:,} ({e.reason})") from None
        count += len(text)
        if count > max_chars:
            raise TooManyValues(
                f"the .txt file holds more than {max_chars:,} characters, the limit"
            )
        chunks.append(np.frombuffer(text.encode("utf-32-le"), dtype="<u4"))
    codes, ids = np.unique(np.concatenate(chunks), return_inverse=True)
    if len(ids) < min_text(1):
        raise ValueError(
            f"the .txt file holds {len(ids)} characters; a text dataset needs at least "
            f"{min_text(1)} (2 x (context + 1), with context 1)"
        )
    return ids.astype(np.int32), tuple(map(chr, codes.tolist()))


def min_text(context: int) -> int:
    """The fewest characters a text needs for windows of `context + 1`."""
    return 2 * (context + 1)


def stream_info(name: str, n_chars: int, vocab: tuple[str, ...]) -> DatasetInfo:
    """An uploaded text, before a context cuts it: one sample per character."""
    return DatasetInfo(name, 1, "sequence", None, 0, n_chars, vocab=vocab)


def windows_info(stream: DatasetInfo, context: int) -> DatasetInfo:
    """The description of a text stream's windows for a model of `context` tokens."""
    if stream.n_samples < min_text(context):
        raise ValueError(
            f"the text has {stream.n_samples:,} characters; model.context {context} needs at "
            f"least {min_text(context):,} (2 x (context + 1))"
        )
    n = (stream.n_samples - 1) // context
    return replace(stream, n_features=context + 1, n_samples=n, context=context)


def windows(ids: np.ndarray, context: int) -> np.ndarray:
    """Windows of `context + 1` ids, `context` apart, as rows (int64, C-contiguous)."""
    n = (len(ids) - 1) // context
    view = np.lib.stride_tricks.sliding_window_view(ids, context + 1)[::context][:n]
    return np.ascontiguousarray(view, dtype=np.int64)
