"""Sequence-model ops and layers: torch parity in float64 (values and every gradient within
1e-9) over the issue's table (T 1/7/16, heads 1/2/4, causal or not, batch 1/3), gradcheck
on every op, torch's parameter names, float32 kept float32, and erf to 1e-12. Skipped
without torch, except under CI=true."""

import itertools
import math

import numpy as np
import pytest

import core.functional as F
from core import Tensor, gradcheck, nn
from core.lm import TransformerLM
from core.nn import sample_context
from tests.helpers import assert_matches_torch, require, torch_lm

torch = require("torch")
TF = torch.nn.functional

E, FF = 8, 12  # embed dim (divisible by every head count) and feed-forward width
TABLE = list(itertools.product([1, 7, 16], [1, 2, 4], [False, True], [1, 3]))
TABLE_IDS = [f"T{t}-h{h}-{'causal' if c else 'full'}-b{n}" for t, h, c, n in TABLE]


def _close(ours, theirs, atol=1e-9):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=0, atol=atol)


def _grads_match(ours: nn.Module, theirs, atol=1e-9):
    named = dict(theirs.named_parameters())
    assert [k for k, _ in ours.named_parameters()] == list(named)
    for k, p in ours.named_parameters():
        _close(p.grad, named[k].grad, atol)


def _torch_from(ours: nn.Module, theirs):
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return theirs.train()  # train mode: torch's plain path, not its fused inference kernel


def _mask(t: int):
    return torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)


# --- ops -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "heads", "causal", "n"), TABLE, ids=TABLE_IDS)
def test_attention_matches_torch(t, heads, causal, n):
    rng = np.random.default_rng(t * 31 + heads)
    arrays = [rng.standard_normal((n, heads, t, 3)) for _ in range(3)]
    assert_matches_torch(
        torch,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal),
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=causal),
        arrays,
    )


@pytest.mark.parametrize(("t", "heads", "causal", "n"), TABLE, ids=TABLE_IDS)
def test_encoder_layer_matches_torch(t, heads, causal, n):
    ours = nn.TransformerEncoderLayer(E, heads, FF, rng=t + heads)
    theirs = torch.nn.TransformerEncoderLayer(
        E, heads, FF, 0.0, "gelu", batch_first=True, norm_first=True, dtype=torch.float64
    )
    theirs = _torch_from(ours, theirs)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, t, E))
    xs, xt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y = ours(xs, causal=causal)
    mask = _mask(t) if causal else None
    ty = theirs(xt, src_mask=mask, is_causal=causal)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    ty.backward(torch.tensor(g))
    _close(y.data, ty)
    _close(xs.grad, xt.grad)
    _grads_match(ours, theirs)


@pytest.mark.parametrize(("heads", "causal"), [(1, False), (4, True)])
def test_multihead_attention_and_its_weights_match_torch(heads, causal):
    ours = nn.MultiheadAttention(E, heads, rng=heads)
    theirs = torch.nn.MultiheadAttention(E, heads, batch_first=True, dtype=torch.float64)
    theirs = _torch_from(ours, theirs)
    x = np.random.default_rng(0).standard_normal((3, 7, E))
    xs, xt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y, w = ours(xs, causal=causal, need_weights=True)
    mask = _mask(7) if causal else None
    ty, tw = theirs(xt, xt, xt, attn_mask=mask, average_attn_weights=False, is_causal=causal)
    y.sum().backward()
    ty.sum().backward()
    _close(y.data, ty)
    _close(w, tw)
    _close(xs.grad, xt.grad)
    _grads_match(ours, theirs)


def test_relu_and_post_norm_layers_match_torch():
    ours = nn.TransformerEncoderLayer(E, 2, FF, activation="relu", norm_first=False, rng=1)
    theirs = torch.nn.TransformerEncoderLayer(
        E, 2, FF, 0.0, "relu", batch_first=True, norm_first=False, dtype=torch.float64
    )
    theirs = _torch_from(ours, theirs)
    x = np.random.default_rng(1).standard_normal((3, 7, E))
    y, ty = ours(Tensor(x), causal=True), theirs(torch.tensor(x), _mask(7), is_causal=True)
    y.sum().backward()
    ty.sum().backward()
    _close(y.data, ty)
    _grads_match(ours, theirs)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    x = np.concatenate([np.linspace(-12, 12, 241), [0.46875, -0.46875, 4.0, -4.0, 30, -30]])
    assert_matches_torch(
        torch, lambda x: F.gelu(x, approximate), lambda x: TF.gelu(x, approximate=approximate), [x]
    )
    assert nn.GELU(approximate)(x).data.tolist() == F.gelu(x, approximate).data.tolist()


def test_erf_is_accurate_to_1e_12_on_every_range_and_to_float32s_resolution():
    x = np.concatenate([np.linspace(-7, 7, 2801), [0.46875, 4.0, 27.0, -1e-300, 0.0]])
    expected = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(F.erf(x), expected, rtol=1e-12, atol=1e-300)
    assert F.erf(np.array([np.inf, -np.inf])).tolist() == [1.0, -1.0]
    single = F.erf(x.astype(np.float32))  # one formula, to float32's resolution
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, expected, rtol=0, atol=6e-7)


@pytest.mark.parametrize(("shape", "normalized"), [((3, 7, 8), 8), ((2, 3, 4), (3, 4))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, normalized, affine):
    rng = np.random.default_rng(2)
    norm_shape = (normalized,) if isinstance(normalized, int) else normalized
    arrays = [rng.standard_normal(shape) * 3 + 1]
    arrays += [rng.standard_normal(norm_shape), rng.standard_normal(norm_shape)] if affine else []
    assert_matches_torch(
        torch,
        lambda x, *affine: F.layer_norm(x, normalized, *affine),
        lambda x, *affine: TF.layer_norm(x, norm_shape, *affine),
        arrays,
    )


def test_embedding_matches_torch_with_repeated_indices():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4))
    idx = np.array([[0, 5, 5, 2], [2, 2, 0, 5], [1, 5, 5, 5]])
    assert_matches_torch(
        torch, lambda w: F.embedding(idx, w), lambda w: TF.embedding(torch.from_numpy(idx), w), [w]
    )
    ours = Tensor(w, requires_grad=True)
    F.embedding(idx, ours).sum().backward()
    assert ours.grad[[3, 4]].tolist() == [[0.0] * 4] * 2  # unused rows get zero
    assert ours.grad[5].tolist() == [6.0] * 4  # six lookups of row 5
    with pytest.raises(IndexError, match="index 6 is out of range for 6 embeddings"):
        F.embedding([6], ours)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sequence_cross_entropy_matches_torch(reduction):
    rng = np.random.default_rng(4)
    logits, target = rng.standard_normal((3, 7, 5)), rng.integers(0, 5, (3, 7))
    tt = torch.from_numpy(target)
    assert_matches_torch(
        torch,
        lambda x: F.cross_entropy(x, target, reduction),
        # torch wants the classes second: (N, C, T)
        lambda x: TF.cross_entropy(x.transpose(1, 2), tt, reduction=reduction),
        [logits],
    )
    with pytest.raises(ValueError, match=r"targets shape \(3, 6\)"):
        F.cross_entropy(logits, target[:, :6])


def test_softmax_matches_torch():
    x = np.random.default_rng(5).standard_normal((3, 4, 5))
    assert_matches_torch(torch, lambda x: F.softmax(x, axis=1), lambda x: TF.softmax(x, dim=1), [x])


# --- gradcheck -----------------------------------------------------------------------------

_R = np.random.default_rng(6)
_IDX = np.array([[0, 3, 3], [1, 0, 3]])
_TARGET = _R.integers(0, 4, (2, 3))
GRADCHECKS = {
    "gelu": (lambda x: F.gelu(x), [_R.standard_normal((4, 5)) * 2]),
    "gelu_tanh": (lambda x: F.gelu(x, "tanh"), [_R.standard_normal((4, 5)) * 2]),
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, 5, w, b),
        [_R.standard_normal((2, 3, 5)), _R.standard_normal(5), _R.standard_normal(5)],
    ),
    "embedding": (lambda w: F.embedding(_IDX, w), [_R.standard_normal((4, 3))]),
    "attention": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        [_R.standard_normal((2, 2, 4, 3)) for _ in range(3)],
    ),
    "attention_causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
        [_R.standard_normal((2, 2, 4, 3)) for _ in range(3)],
    ),
    "self_attention": (
        lambda qkv: F.self_attention(qkv, 2, causal=True)[0],
        [_R.standard_normal((2, 5, 12))],
    ),
    "cross_entropy_seq": (
        lambda x: F.cross_entropy(x, _TARGET),
        [_R.standard_normal((2, 3, 4))],
    ),
}


@pytest.mark.parametrize("op", list(GRADCHECKS))
def test_gradcheck(op):
    fn, inputs = GRADCHECKS[op]
    assert gradcheck(fn, *inputs, atol=1e-7, rtol=1e-6)


# --- modules -------------------------------------------------------------------------------


def test_float32_stays_float32_and_matches_torch_loosely():
    ours = nn.TransformerEncoderLayer(16, 4, 32, dtype=np.float32, rng=0)
    assert all(p.dtype == np.float32 for p in ours.parameters())
    theirs = torch.nn.TransformerEncoderLayer(
        16, 4, 32, 0.0, "gelu", batch_first=True, norm_first=True
    )
    theirs = _torch_from(ours, theirs)
    x = np.random.default_rng(0).standard_normal((2, 9, 16)).astype(np.float32)
    y = ours(Tensor(x), causal=True)
    ty = theirs(torch.from_numpy(x), _mask(9).float(), is_causal=True)
    y.sum().backward()
    ty.sum().backward()
    assert y.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in ours.parameters())
    _close(y.data, ty, atol=1e-5)
    _grads_match(ours, theirs, atol=1e-4)


def test_dropout_masks_depend_on_the_sample_not_the_batch():
    layer = nn.TransformerEncoderLayer(E, 2, FF, dropout=0.3, rng=0, seed=5).train()
    x = np.random.default_rng(0).standard_normal((4, 6, E))
    with sample_context(2, [10, 11, 12, 13]):
        whole = layer(x, causal=True).data
    with sample_context(2, [12, 13]):
        half = layer(x[2:], causal=True).data
    assert np.array_equal(whole[2:], half)
    with sample_context(3, [10, 11, 12, 13]):
        assert not np.allclose(layer(x, causal=True).data, whole)  # another epoch
    assert np.array_equal(layer.eval()(x).data, layer(x).data)  # eval: no dropout


def test_language_model_names_and_logits_match_torch():
    ours = TransformerLM(11, 8, E, 2, 2, FF, seed=0)
    names = [k for k, _ in ours.named_parameters()]
    assert names[:3] == ["tok_emb.weight", "pos_emb.weight", "blocks.0.self_attn.in_proj_weight"]
    assert names[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    theirs = torch_lm(torch, vocab_size=11, context=8, d_model=E, heads=2, layers=2, ff=FF)
    theirs = _torch_from(ours, theirs)
    tokens = np.random.default_rng(0).integers(0, 11, (3, 8))
    logits = ours(tokens)
    F.cross_entropy(logits, tokens).backward()
    tl = theirs(torch.from_numpy(tokens))
    TF.cross_entropy(tl.transpose(1, 2), torch.from_numpy(tokens)).backward()
    _close(logits.data, tl)
    _grads_match(ours, theirs)
    with pytest.raises(ValueError, match="1 <= T <= 8"):
        ours(np.zeros((1, 9), np.int64))
