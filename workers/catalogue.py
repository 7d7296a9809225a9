"""What the spec may know about datasets without reading one: the builtin registry's facts
(names, options, shapes), the upload id format, and the description every dataset gives.

Pure: no file, no array, no import of our own. `workers.spec` validates against it;
`workers.datasets` generates and reads the data it describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Task = Literal["classification", "regression"]

MAX_CLASSES = 100  # integer targets with more distinct values than this are regression
DATASET_ID = re.compile(r"^[0-9a-f]{16}$")  # an upload's id: the start of its content hash


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
