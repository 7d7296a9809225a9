"""A decoder-only language model built from the torch-named layers of `core.nn`.

Token and learned position embeddings, `layers` causal pre-LN encoder layers, a final
LayerNorm and a linear head to the vocabulary. Its state dict loads into the same
stack of torch.nn.Embedding, TransformerEncoderLayer(batch_first=True, norm_first=True,
activation="gelu"), LayerNorm and Linear under the names tok_emb, pos_emb, blocks.<i>,
norm and head.
"""

from __future__ import annotations

import numpy as np

from core.nn import Embedding, LayerNorm, Linear, Module, TransformerEncoderLayer
from core.tensor import Tensor

__all__ = ["TransformerLM"]


class TransformerLM(Module):
    """(N, T) integer tokens, T <= context, to (N, T, vocab_size) next-token logits."""

    def __init__(
        self,
        vocab_size: int,
        context: int,
        d_model: int,
        heads: int,
        layers: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        *,
        dtype=np.float64,
        seed: int | None = None,
    ):
        rng = np.random.default_rng(seed)
        kw = {"dtype": dtype, "rng": rng}
        self.context = int(context)
        self.tok_emb = Embedding(vocab_size, d_model, **kw)
        self.pos_emb = Embedding(context, d_model, **kw)
        self.blocks = [
            TransformerEncoderLayer(
                d_model, heads, dim_feedforward, dropout, **kw, seed=seed or 0, layer=i
            )
            for i in range(layers)
        ]
        self.norm = LayerNorm(d_model, dtype=dtype)
        self.head = Linear(d_model, vocab_size, **kw, init="uniform")

    @property
    def modules(self) -> list[Module]:
        """The sub-modules in order, as `Sequential.modules` lists them."""
        return [self.tok_emb, self.pos_emb, *self.blocks, self.norm, self.head]

    def forward(self, tokens) -> Tensor:
        *_, (_, logits) = self.layer_outputs(tokens)
        return logits

    def embed(self, tokens) -> Tensor:
        """The token plus position embeddings of (N, T) tokens, 1 <= T <= context."""
        tokens = np.asarray(tokens.data if isinstance(tokens, Tensor) else tokens)
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.context:
            raise ValueError(
                f"TransformerLM expects (N, T) tokens with 1 <= T <= {self.context}, "
                f"got shape {tokens.shape}"
            )
        return self.tok_emb(tokens) + self.pos_emb(np.arange(tokens.shape[1]))

    def layer_outputs(self, tokens, *, sublayers: bool = False, weights: list | None = None):
        """Yield (name, output) after the embeddings ("embed"), each block ("blocks.<i>"),
        the final norm and the head: the one forward pass, for callers that inspect it.
        With `sublayers`, each block's sub-layers instead ("blocks.<i>.norm1", ...; see
        TransformerEncoderLayer.sublayers); `weights`, a list, receives every block's
        attention weights (N, heads, T, T) in order."""
        x = self.embed(tokens)
        yield "embed", x
        yield from self.after_embedding(x, sublayers=sublayers, weights=weights)

    def after_embedding(self, x, *, sublayers: bool = False, weights: list | None = None):
        """`layer_outputs` from given (N, T, d_model) embeddings on: the blocks, the norm
        and the head (integrated gradients walks a path of embeddings)."""
        for i, block in enumerate(self.blocks):
            for name, out in block.sublayers(x, causal=True, weights=weights):
                if sublayers:
                    yield f"blocks.{i}.{name}", out
            x = out  # the block's output: its last sub-layer's
            if not sublayers:
                yield f"blocks.{i}", x
        x = self.norm(x)
        yield "norm", x
        yield "head", self.head(x)
