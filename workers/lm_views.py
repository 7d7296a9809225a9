"""Why a language model continues a prompt as it does: token attributions of the next-token
logit, and the attention weights of every layer and head. Both use the engine's own forward.

`explain_tokens` is integrated gradients over the embeddings: x is the prompt's token plus
position embeddings (T, d_model), the baseline all zeros, and f the logit of the target token
at the last position. The path mean of df/dx comes from workers.explain (the midpoint rule,
refined adaptively where f bends: near the zero baseline the layer norms turn sharply);
each token's attribution is the sum over the embedding dimension of (x - 0) * mean gradient,
so the attributions add up to f(x) - f(0) up to the reported completeness gap.
"""

from __future__ import annotations

import copy

import numpy as np

from core import Tensor, no_grad
from core.lm import TransformerLM
from workers.explain import ExplainError, json_values, path_mean_gradients

__all__ = ["attention_weights", "explain_tokens"]

# Values one pass over path points may hold for backward (~8 bytes each): 2**24 is 128 MiB.
PASS_VALUES = 2**24


def frozen(model: TransformerLM) -> TransformerLM:
    """A copy in eval mode whose parameters are constants sharing the model's arrays, so
    backward computes only the input's gradient and the (shared, cached) model is untouched."""
    memo = {id(p): p.detach() for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


class _LastLogits:
    """The model from its embeddings on, as workers.explain calls a model: flat rows of
    T x d_model embeddings in, the last position's logits (N, V) out."""

    def __init__(self, model: TransformerLM, t: int):
        self.model, self.t = model, t
        d, blocks = model.tok_emb.weight.shape[1], model.blocks
        ff = blocks[0].linear1.weight.shape[0] if blocks else 0
        heads = blocks[0].self_attn.num_heads if blocks else 0
        per_row = t * (len(blocks) * (12 * d + 3 * ff + 2 * heads * t) + 3 * d)
        self.path_batch = max(1, PASS_VALUES // per_row)

    def __call__(self, x: Tensor) -> Tensor:
        embedded = x.reshape(x.shape[0], self.t, -1)
        *_, (_, logits) = self.model.after_embedding(embedded)
        return logits[:, -1]


def explain_tokens(model: TransformerLM, prompt_ids, target: int | None = None, steps=64) -> dict:
    """Integrated-gradient attributions of the `target` token's next-token logit (None: the
    greedy next token) to each of the prompt's tokens. Returns {"target", "logit",
    "baseline_logit", "attributions" (one per token), "completeness_gap"} (the gap:
    sum(attributions) - (logit - baseline_logit)); numbers that are not finite (a diverged
    model's) are None, as in predictions. The prompt's ids must be in range and
    at most `context` long (ExplainError otherwise, at "prompt" or "target")."""
    ids = np.asarray(prompt_ids, dtype=np.int64)[None]
    _check(model, ids, target)
    lm = frozen(model)
    with no_grad():
        x = lm.embed(ids).data
    f = _LastLogits(lm, ids.shape[1])
    X, B = x.reshape(1, -1), np.zeros((1, x.size), x.dtype)
    with no_grad():
        logits, base = (np.asarray(f(Tensor(a)).data, np.float64)[0] for a in (X, B))
    target = int(logits.argmax()) if target is None else int(target)
    change = np.array([logits[target] - base[target]])
    mean = path_mean_gradients(f, X, B, np.array([target]), change, steps)
    attributions = (X * mean).reshape(x.shape[1:]).sum(axis=1, dtype=np.float64)
    gap = attributions.sum() - change
    return {
        "target": target,
        "logit": json_values(logits[target]),
        "baseline_logit": json_values(base[target]),
        "attributions": json_values(attributions),
        "completeness_gap": json_values(gap[0]),
    }


def attention_weights(model: TransformerLM, prompt_ids) -> list:
    """The softmax attention weights of the prompt, [layer][head][query][key] (T x T per
    head, causal: row i weighs tokens 0..i), from one forward pass in eval mode; None for
    a weight that is not finite."""
    ids = np.asarray(prompt_ids, dtype=np.int64)[None]
    _check(model, ids, None)
    weights: list[np.ndarray] = []
    with no_grad():
        for _ in frozen(model).layer_outputs(ids, weights=weights):
            pass
    return [json_values(np.asarray(w[0], np.float64)) for w in weights]


def _check(model: TransformerLM, ids: np.ndarray, target: int | None) -> None:
    vocab = model.tok_emb.weight.shape[0]
    if not 1 <= ids.shape[1] <= model.context:
        msg = f"has {ids.shape[1]} tokens; the model reads 1 to {model.context}"
        raise ExplainError(("prompt",), msg)
    if target is not None and not 0 <= target < vocab:
        raise ExplainError(("target",), f"{target} is not a token id below {vocab}")
