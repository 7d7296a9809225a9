"""Answer predictions, explanations, the loss graph and a CNN's first filters from a job's
checkpoint (`which`: "best", "latest", "step-N", or None for best if the job keeps one, else
latest), with the engine that trained it; and show the job's validation samples."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from workers.checkpoint import (
    CheckpointError,
    NoCheckpoint,
    checkpoint_info,
    load_model_state,
    resolve_checkpoint,
)
from workers.config import WorkerSettings
from workers.generate import Generation
from workers.spec import TrainingSpec

__all__ = ["NoCheckpoint", "Predictor", "model_spec"]


def model_spec(stored: dict) -> TrainingSpec:
    """A job's stored spec, validated again: the JSON alone, no data is read. Specs stored
    before a field existed get its default."""
    return TrainingSpec.model_validate(stored)


class Predictor:
    """Builds a job's model once per checkpoint and keeps the most recently used ones in
    memory, up to `cache_bytes` of parameters (a model larger than that is not kept)."""

    def __init__(self, cache_bytes: int = 512 * 2**20):
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._bytes: dict[tuple, int] = {}
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self.samples = ValidationSamples()

    def cached_bytes(self) -> int:
        return sum(self._bytes.values())

    def _keep(self, key: tuple, model) -> None:
        size = sum(p.data.nbytes for p in model.parameters())
        with self._lock:
            self._models[key], self._bytes[key] = model, size
            while self._models and self.cached_bytes() > self.cache_bytes:
                oldest, _ = self._models.popitem(last=False)
                del self._bytes[oldest]

    def _model(self, spec: TrainingSpec, out_dir: Path, which: str | None):
        """The model of the checkpoint `which` resolves to, and that checkpoint's name. The
        cache keys on the resolved checkpoint and its model's sha256, so "best", "latest"
        and "step-N" share a model when they name the same checkpoint."""
        from workers.model import build_model

        for _ in range(3):  # the checkpoint may be pruned between resolving and loading
            path = resolve_checkpoint(out_dir, which)  # NoCheckpoint, UnknownCheckpoint
            try:
                info = checkpoint_info(path)
                key = (str(out_dir), info.name, info.sha256)
                with self._lock:
                    if key in self._models:
                        self._models.move_to_end(key)
                        return self._models[key], info.name
                state = load_model_state(path)
            except (CheckpointError, OSError):
                continue
            model = build_model(spec)
            model.load_state_dict(state)
            self._keep(key, model)
            return model, info.name
        raise NoCheckpoint("the checkpoints changed while loading; try again")

    def predict(
        self, spec: TrainingSpec, out_dir: Path, inputs: list[list[float]], which=None
    ) -> tuple[list, str]:
        from core import Tensor, no_grad

        model, name = self._model(spec, out_dir, which)
        X = np.asarray(inputs, dtype=np.dtype(spec.dtype))
        with no_grad():
            out = np.asarray(model(Tensor(X)).data, dtype=np.float64)
        rows = [[v if np.isfinite(v) else None for v in row] for row in out.tolist()]
        return rows, name

    def explain(
        self, spec: TrainingSpec, out_dir: Path, inputs: list[list[float]], which=None, **options
    ) -> tuple[dict, str]:
        """workers.explain.explain on the checkpoint's model; `options` are its
        keywords. It differentiates a frozen copy, so the cached model stays untouched,
        and it must not run under no_grad. Bad arguments raise its ValueError."""
        from workers.explain import explain

        model, name = self._model(spec, out_dir, which)
        return explain(model, inputs, **options), name

    def generate(
        self, spec: TrainingSpec, out_dir: Path, prompt_ids, which=None, **options
    ) -> tuple[Generation, str]:
        """workers.generate.generate on the checkpoint's transformer; `options` are its
        keywords (max_tokens, temperature, top_k, seed)."""
        from workers.generate import generate
        from workers.model import lm_logits

        model, name = self._model(spec, out_dir, which)
        return generate(lm_logits(model), prompt_ids, context=spec.model.context, **options), name

    def explain_tokens(
        self, spec: TrainingSpec, out_dir: Path, prompt_ids, which=None, **options
    ) -> tuple[dict, str]:
        """workers.lm_views.explain_tokens on the checkpoint's transformer (a frozen copy);
        `options` are its keywords (target, steps)."""
        from workers.lm_views import explain_tokens

        model, name = self._model(spec, out_dir, which)
        return explain_tokens(model, prompt_ids, **options), name

    def attention(self, spec: TrainingSpec, out_dir: Path, prompt_ids, which=None):
        """The prompt's attention weights, [layer][head][query][key], and the checkpoint."""
        from workers.lm_views import attention_weights

        model, name = self._model(spec, out_dir, which)
        return attention_weights(model, prompt_ids), name

    def graph(
        self, spec: TrainingSpec, out_dir: Path, settings: WorkerSettings, which=None
    ) -> tuple[dict, str]:
        """The graph of the loss on the first training example, after backward.

        The data is loaded as the trainer loads it (uploads from `settings.datasets_dir`),
        deterministic from the seed. Backward fills the parameters' gradients, so it runs
        on a copy of the cached model, which other requests share.
        """
        from core import Tensor
        from core.graph import backward_with_graph
        from workers.data import PreparedData
        from workers.model import LOSSES, next_token_loss_of

        model, name = self._model(spec, out_dir, which)
        model = copy.deepcopy(model)
        data = PreparedData(spec, settings)
        parameters = dict(model.named_parameters())
        if spec.model.type != "transformer":
            loss = LOSSES[spec.loss](model(Tensor(data.X[:1])), data.y[:1])
            return backward_with_graph(loss, parameters=parameters), name
        # One node per sub-layer, not per op: the blocks' insides, grouped by name.
        tokens = np.asarray(data.X[:1]).astype(np.int64)
        layers = dict(model.layer_outputs(tokens[:, :-1], sublayers=True))
        layers["loss"] = next_token_loss_of(layers["head"], tokens).sum()
        graph = backward_with_graph(layers["loss"], parameters=parameters, layers=layers)
        return graph, name

    def filters(
        self, spec: TrainingSpec, out_dir: Path, most_values: int, which: str | None = None
    ) -> tuple[dict, str]:
        """The weights of the model's first conv2d layer, (out, in, kh, kw): as many whole
        filters as fit in `most_values` numbers. NoFilters without such a layer, or when
        one filter is larger than that."""
        from core.nn import Conv2d

        model, name = self._model(spec, out_dir, which)
        layers = enumerate(getattr(model, "modules", ()))  # an MLP has none
        index, conv = next(((i, m) for i, m in layers if isinstance(m, Conv2d)), (None, None))
        if conv is None:
            raise NoFilters("the model has no conv2d layer")
        weights = np.asarray(conv.weight.data, dtype=np.float64)
        per_filter = weights[0].size
        shown = min(len(weights), most_values // per_filter)
        if not shown:
            msg = f"layer {index}'s filters have {per_filter:,} values each, over {most_values:,}"
            raise NoFilters(msg)
        result = {
            "layer": index,
            "name": f"{index}.weight",
            "shape": list(weights.shape),
            "shown": shown,
            "weights": weights[:shown].tolist(),
        }
        return result, name


class NoFilters(LookupError):
    pass


class ValidationSamples:
    """A job's validation split, as the trainer holds it out, a page at a time; the splits
    of the last few datasets are kept, since a builtin dataset takes up to a second to make."""

    def __init__(self, keep: int = 4):
        self._splits: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.keep = keep
        self._lock = threading.Lock()

    def page(self, spec: TrainingSpec, root: Path | None, offset: int, limit: int):
        """Up to `limit` samples from `offset`, each in the shape the model takes (an image
        for a CNN), with its label. Returns (samples, total); a sample is {"index", "input",
        "label"}."""
        X, y = self._split(spec, root)
        shape = getattr(spec.model, "input_shape", None) or [spec.model.in_width]
        part = slice(offset, offset + limit)
        labels = y[part] if y.dtype.kind in "iu" else y[part].reshape(len(X[part]), -1)
        inputs = X[part].reshape(-1, *shape).tolist()
        rows = zip(range(len(X))[part], inputs, labels.tolist(), strict=True)
        return [{"index": i, "input": x, "label": label} for i, x, label in rows], len(X)

    def _split(self, spec: TrainingSpec, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
        from workers.datasets import load_dataset, train_val_split

        key = (spec.model_dump_json(include={"data", "seed", "validation_fraction"}), str(root))
        with self._lock:
            if key in self._splits:
                self._splits.move_to_end(key)
                return self._splits[key]
        dataset = load_dataset(spec.data, spec.seed, root)
        _, val = train_val_split(dataset, spec.validation_fraction, spec.seed)
        with self._lock:
            self._splits[key] = (val.X, val.y)
            while len(self._splits) > self.keep:
                self._splits.popitem(last=False)
        return val.X, val.y
