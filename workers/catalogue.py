"""What the spec may know about datasets without reading one: the builtin registry's facts
(names, options, shapes), the upload id format, and the description every dataset gives.

Pure: no file, no array, no import of our own. `workers.spec` validates against it;
`workers.datasets` and `workers.sequences` generate and read the data it describes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# "sequence": X holds token ids, one sample of context + 1 of them per row (a model reads
# X[:, :-1] and predicts X[:, 1:]); y holds nothing (shape (n, 0)).
Task = Literal["classification", "regression", "sequence"]

MAX_CLASSES = 100  # integer targets with more distinct values than this are regression
DATASET_ID = re.compile(r"^[0-9a-f]{16}$")  # an upload's id: the start of its content hash


class TooManyValues(ValueError):
    """A dataset over the limit of values (the service names its setting)."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    n_features: int
    task: Task
    n_classes: int | None  # None for regression
    n_targets: int  # 1 for classification (one label per sample)
    n_samples: int
    # One sample's image shape (channels, height, width), for image data; X stays flat,
    # n_features = C * H * W, and a model whose input_shape says so sees images.
    shape: tuple[int, int, int] | None = field(default=None, kw_only=True)
    # Sequence data: the symbol of each token id, and the tokens a model reads at once
    # (samples hold context + 1). An uploaded text before a model's context cuts it into
    # windows has context None and is described as a stream: one sample per character.
    vocab: tuple[str, ...] | None = field(default=None, kw_only=True)
    context: int | None = field(default=None, kw_only=True)

    @property
    def vocab_size(self) -> int | None:
        return None if self.vocab is None else len(self.vocab)


@dataclass(frozen=True)
class Builtin:
    task: Task
    n_features: int
    n_classes: int | None = None
    n_samples: int | None = None  # fixed size of a bundled dataset; None: from the spec
    options: tuple[str, ...] = ()  # which of n_classes / n_features the spec may set
    shape: tuple[int, int, int] | None = None  # image data: (channels, height, width)
    default_n_samples: int = 1000  # when the spec does not say


# Each has its generator in workers.datasets. digits and iris are scikit-learn's bundled copies.
BUILTINS: dict[str, Builtin] = {
    "moons": Builtin("classification", n_features=2, n_classes=2),
    "circles": Builtin("classification", n_features=2, n_classes=2),
    "spirals": Builtin("classification", n_features=2, n_classes=3, options=("n_classes",)),
    "xor": Builtin("classification", n_features=2, n_classes=2),
    "blobs": Builtin(
        "classification", n_features=2, n_classes=3, options=("n_classes", "n_features")
    ),
    "sine": Builtin("regression", n_features=1),
    "digits": Builtin(
        "classification", n_features=64, n_classes=10, n_samples=1797, shape=(1, 8, 8)
    ),
    # Grayscale 28x28 images of a circle, square, triangle or cross (classes 0..3).
    "shapes": Builtin(
        "classification", n_features=784, n_classes=4, shape=(1, 28, 28), default_n_samples=5000
    ),
    "iris": Builtin("classification", n_features=4, n_classes=3, n_samples=150),
}


# ---------------------------------------------------------------- sequence tasks

# The builtin tasks' symbols; a token's id is its index, so the digits are their own ids.
DIGITS_VOCAB = tuple("0123456789+=.")
MAX_DIGITS = 9  # every sample index and sum of an n_digits task fits in int64


@dataclass(frozen=True)
class SequenceTask:
    """A builtin task of strings "<question>=<answer>", padded with "." to a fixed length
    that always leaves at least one "." after the answer. Samples are distinct, so a
    validation split never holds a question that training saw."""

    length: Callable[[int], int]  # characters of one sample, for n_digits
    capacity: Callable[[int], int]  # how many distinct samples there are, for n_digits
    default_n_digits: int = 2

    def describe(self, name: str, n_digits: int, n_samples: int) -> DatasetInfo:
        length = self.length(n_digits)
        return DatasetInfo(
            name, length, "sequence", None, 0, n_samples, vocab=DIGITS_VOCAB, context=length - 1
        )


# addition: "37+58=95." -- a+b with a, b < 10**n_digits; each unordered pair {a, b} occurs
# at most once (as a+b or b+a), so validation sums are new even up to commutativity.
# reverse: "0451=1540." -- a digit string of 1..n_digits digits, then the same reversed.
TASKS: dict[str, SequenceTask] = {
    "addition": SequenceTask(
        length=lambda n: 3 * n + 4,
        capacity=lambda n: 10**n * (10**n + 1) // 2,
    ),
    "reverse": SequenceTask(
        length=lambda n: 2 * n + 2,
        capacity=lambda n: (10 ** (n + 1) - 10) // 9,
        default_n_digits=5,
    ),
}
