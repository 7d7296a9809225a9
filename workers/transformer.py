"""The `transformer` model spec: a decoder-only language model (core.lm.TransformerLM).

A sample is context + 1 tokens; the model reads the first `context` and predicts each next
one. Its size (parameters, multiply-adds, activations) is counted here from the spec alone,
for admission limits and for `workers: "auto"`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.validation import Strict, raise_errors, spec_error

_MAX = 1_000_000


class TransformerSpec(Strict):
    """Token and learned position embeddings, `layers` causal pre-LN encoder layers (torch's
    TransformerEncoderLayer, gelu), a final LayerNorm and a linear head to the vocabulary.
    Parameters are named as the torch module of the same layers names them (tok_emb.weight,
    pos_emb.weight, blocks.<i>.self_attn.in_proj_weight, ..., norm.weight, head.weight)."""

    type: Literal["transformer"]
    vocab_size: int = Field(ge=2, le=_MAX, description="Tokens; must match the data's.")
    context: int = Field(ge=1, le=100_000, description="The longest sequence the model reads.")
    d_model: int = Field(ge=1, le=100_000, description="Width; divisible by heads.")
    heads: int = Field(ge=1, le=10_000)
    layers: int = Field(ge=1, le=1000)
    dim_feedforward: int = Field(ge=1, le=_MAX)
    dropout: float = Field(0.0, ge=0, lt=1, description="After attention, activation, sub-layers.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerSpec:
        if self.d_model % self.heads:
            msg = f"model.d_model ({self.d_model}) must be divisible by model.heads ({self.heads})"
            raise_errors(type(self).__name__, [spec_error(("d_model",), msg, self.d_model)])
        return self

    # The widths and size every model spec gives: a sample is context + 1 tokens, the
    # output one logit per token of the vocabulary.
    in_width = property(lambda self: self.context + 1)
    out_width = property(lambda self: self.vocab_size)

    @property
    def n_params(self) -> int:
        d, ff, v = self.d_model, self.dim_feedforward, self.vocab_size
        block = (3 * d + 3) * d + (d + 1) * d + (d + 1) * ff + (ff + 1) * d + 4 * d
        return (v + self.context) * d + self.layers * block + 2 * d + (d + 1) * v

    @property
    def flops(self) -> int:
        """Multiply-adds of one sample's forward pass (its `context` positions)."""
        d, ff, t = self.d_model, self.dim_feedforward, self.context
        per_token = self.layers * (4 * d * d + 2 * d * ff + 2 * t * d) + d * self.vocab_size
        return t * per_token

    @property
    def activations(self) -> int:
        """Values one sample's forward pass keeps for backward: per token and layer the
        norms, q/k/v, attention output and projection, the feed-forward's hidden values
        and its output, and a row of attention weights per head."""
        d, ff, t = self.d_model, self.dim_feedforward, self.context
        per_layer = 9 * d + 2 * ff + self.heads * t
        return t * (self.layers * per_layer + 3 * d + self.vocab_size)
