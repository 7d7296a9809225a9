"""Sequence data (builtin addition and reverse, uploaded text) and generation from any
logits function, scored by exact match against lookup-table models."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tests.fakes import locs, make_client, spec
from workers import sequences
from workers.catalogue import DIGITS_VOCAB
from workers.data import PreparedData
from workers.datasets import describe, load_dataset, save_uploaded, train_val_split
from workers.generate import generate, val_exact_match
from workers.sequences import decode, encode, read_text
from workers.spec import BuiltinData, TrainingSpec, UploadedData


def task(name, **kw):
    return BuiltinData(type="builtin", name=name, **kw)


def texts(ds) -> list[str]:
    return [decode(row, ds.info.vocab) for row in ds.X]


def question(text: str) -> tuple[str, str]:
    """("37+58", "95") of "37+58=95.."."""
    q, rest = text.split("=")
    return q, rest.rstrip(".")


# ---------------------------------------------------------------- builtin tasks


@pytest.mark.parametrize("name, n_digits, length", [("addition", 2, 10), ("reverse", 5, 12)])
def test_tasks_are_well_formed_distinct_and_deterministic_in_the_seed(name, n_digits, length):
    data = task(name, n_samples=500)
    a, b, c = load_dataset(data, 7), load_dataset(data, 7), load_dataset(data, 8)
    assert data.n_digits == n_digits and a.info == describe(data)
    assert (a.info.task, a.info.vocab, a.info.vocab_size) == ("sequence", DIGITS_VOCAB, 13)
    assert a.info.context == length - 1 and a.X.shape == (500, length) and a.X.dtype == np.int64
    assert a.y.shape == (500, 0)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    for text in texts(a):
        q, answer = question(text)
        assert text.endswith(".") and "." not in text.rstrip(".")
        if name == "addition":
            x, y = q.split("+")
            assert answer == str(int(x) + int(y)) and max(len(x), len(y)) <= n_digits
        else:
            assert answer == q[::-1] and 1 <= len(q) <= n_digits
    unordered = {frozenset(question(t)[0].split("+")) for t in texts(a)}
    assert len(unordered) == 500  # not even a+b and b+a both


def test_addition_validation_holds_sums_never_seen_in_training():
    data = task("addition", n_digits=1)  # all 55 unordered pairs of digits, by default
    assert data.n_samples == 55
    train, val = train_val_split(load_dataset(data, 0), 0.2, seed=3)
    pairs = [{frozenset(question(t)[0].split("+")) for t in texts(ds)} for ds in (train, val)]
    assert len(pairs[1]) == 11 and not pairs[0] & pairs[1]
    assert len(pairs[0] | pairs[1]) == 55


def test_task_options_are_checked_at_the_field():
    with pytest.raises(ValidationError) as err:
        task("addition", n_digits=1, n_samples=56)
    (e,) = err.value.errors()
    assert e["loc"] == ("n_samples",) and "55 distinct samples" in e["msg"]
    with pytest.raises(ValidationError) as err:
        task("reverse", n_classes=3)
    assert err.value.errors()[0]["loc"] == ("n_classes",)
    with pytest.raises(ValidationError) as err:
        task("moons", n_digits=2)
    assert err.value.errors()[0]["msg"] == "data.n_digits does not apply to 'moons'"
    # where it does not apply, n_digits is not in the spec (nor in its hash)
    assert "n_digits" not in task("moons").model_dump()


def test_sequence_data_needs_a_transformer(tmp_path):
    client, _, _ = make_client(tmp_path, datasets_dir=tmp_path / "datasets")
    r = client.post("/api/v1/jobs", json=spec(data={"type": "builtin", "name": "addition"}))
    assert locs(r) == [("body", "model", "mlp", "type")]
    assert "use a 'transformer'" in r.json()["detail"][0]["msg"]


def test_prepared_sequence_data_keeps_its_token_ids():
    data = {"type": "builtin", "name": "reverse", "n_digits": 3, "n_samples": 100}
    prepared = PreparedData(TrainingSpec.model_validate(spec(data=data, dtype="float32")))
    assert prepared.X.dtype == prepared.X_val.dtype == np.int64
    assert prepared.X.shape == (80, 8) and prepared.y.shape == (80, 0)


# ---------------------------------------------------------------- uploaded text


def test_text_is_read_by_characters_across_chunks(monkeypatch):
    monkeypatch.setattr(sequences, "TEXT_CHUNK", 3)  # every multi-byte character split
    text = "\ufeffzébu ∑ 🐍 ab"
    ids, vocab = read_text(text.encode("utf-8"), max_chars=100)
    assert vocab == tuple(sorted(set(text[1:])))  # the byte-order mark is not text
    assert decode(ids, vocab) == text[1:]
    raw = "abc€".encode() + b"\xff" + b"def"
    with pytest.raises(ValueError, match="not UTF-8: byte 6"):
        read_text(raw, max_chars=100)
    with pytest.raises(ValueError, match="more than 10 characters"):
        read_text(b"a" * 11, max_chars=10)
    with pytest.raises(ValueError, match="holds 3 characters; .* at least 4"):
        read_text(b"abc", max_chars=10)


def test_text_windows_and_a_validation_split_at_its_end(tmp_path):
    # every character distinct and in code-point order: a token's id is its position
    text = "".join(chr(0x4E00 + i) for i in range(101))
    saved = save_uploaded(text.encode(), "t.txt", tmp_path)
    assert (saved.task, saved.n_samples, saved.vocab_size, saved.context) == (
        "sequence",
        101,
        101,
        None,
    )
    data = UploadedData(type="dataset", id=saved.id)
    ds = load_dataset(data, 0, tmp_path, context=8)
    assert vars(ds.info).items() <= vars(describe(data, tmp_path, context=8)).items()
    assert ds.X.shape == (12, 9)
    np.testing.assert_array_equal(ds.X[:, 0], np.arange(0, 96, 8))  # windows 8 apart
    np.testing.assert_array_equal(ds.X, ds.X[:, :1] + np.arange(9))
    train, val = train_val_split(ds, 0.25, seed=5)
    np.testing.assert_array_equal(val.X, ds.X[-3:])  # the text's end, in order
    assert train.X.max() <= val.X.min()  # no training window reaches into validation
    assert save_uploaded(text.encode(), "again.txt", tmp_path).id == saved.id
    with pytest.raises(ValueError, match="model.context 50 needs at least 102"):
        describe(data, tmp_path, context=50)


def test_a_local_txt_file_is_the_dataset_its_upload_is(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(101))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    uploaded = UploadedData(type="dataset", id=save_uploaded(text.encode(), "t.txt", tmp_path).id)
    local = TrainingSpec.model_validate(spec(data={"type": "file", "path": str(path)})).data
    a, b = load_dataset(local, 0, context=8), load_dataset(uploaded, 0, tmp_path, context=8)
    np.testing.assert_array_equal(a.X, b.X)
    assert (a.info.vocab, a.info.context, a.ordered) == (b.info.vocab, 8, True)
    assert describe(local, context=8).n_samples == 12
    with pytest.raises(ValueError, match="model.context 50 needs at least 102"):
        describe(local, context=50)


def test_text_upload_through_the_service(tmp_path):
    client, _, _ = make_client(tmp_path, max_dataset_values=1000)
    upload = "/api/v1/datasets"
    r = client.post(upload, files={"file": ("poem.txt", b"to be or not")})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["vocab"] == [" ", "b", "e", "n", "o", "r", "t"] and info["vocab_size"] == 7
    assert (info["task"], info["n_samples"], info["filename"]) == ("sequence", 12, "poem.txt")
    assert [d["id"] for d in client.get(upload).json()] == [info["id"]]
    for raw, message in [
        (b"ok \xc3(", "not UTF-8: byte 3"),
        (b"abc", "at least 4"),
        (b"a" * 1001, "SHARDGRAD_MAX_DATASET_VALUES"),
    ]:
        r = client.post(upload, files={"file": ("t.txt", raw)})
        assert locs(r) == [("body", "file")] and message in r.json()["detail"][0]["msg"]
    data = {"type": "dataset", "id": info["id"]}
    r = client.post("/api/v1/jobs", json=spec(data=data))
    assert locs(r) == [("body", "model", "mlp", "type")]


def test_encode_names_the_position_of_an_unknown_symbol():
    np.testing.assert_array_equal(encode("12+3=", DIGITS_VOCAB), [1, 2, 10, 3, 11])
    with pytest.raises(sequences.UnknownSymbol, match="'x' at position 2") as err:
        encode("12x3", DIGITS_VOCAB)
    assert err.value.position == 2


# ---------------------------------------------------------------- generation


def oracle(wrong=lambda text: False, context=None):
    """A lookup-table language model of the digit tasks: after "<q>=" it spells the right
    answer, then "."; it answers 1 too much where `wrong(q)`; elsewhere it is uniform."""

    def answer(q: str) -> str:
        if "+" not in q:
            return q[::-1]
        a, b = map(int, q.split("+"))
        return str(a + b + wrong(q))

    def logits_fn(tokens):
        assert context is None or tokens.shape[1] <= context
        out = np.zeros((*tokens.shape, len(DIGITS_VOCAB)))
        for i, row in enumerate(tokens):
            text = decode(row, DIGITS_VOCAB)
            if "=" in text:
                q, done = text.split("=", 1)
                full = answer(q) + "." * (len(done) + 1)
                out[i, -1, DIGITS_VOCAB.index(full[len(done)])] = 5.0
        return out

    return logits_fn


@pytest.mark.parametrize("name", ["addition", "reverse"])
def test_exact_match_of_an_oracle_and_of_a_model_that_errs(name):
    ds = load_dataset(task(name, n_digits=2, n_samples=60), 0)
    assert val_exact_match(oracle(), ds.info, ds.X) == 1.0
    odd = lambda q: sum(map(int, q.split("+"))) % 2 == 1  # noqa: E731
    wrong = [t for t in texts(ds) if "+" in t and odd(question(t)[0])]
    if name == "addition":
        assert 0 < len(wrong) < 60
    assert val_exact_match(oracle(odd), ds.info, ds.X) == (60 - len(wrong)) / 60
    assert val_exact_match(oracle(), ds.info, ds.X[:0]) is None


def test_greedy_generation_and_its_logprobs():
    prompt = encode("37+58=", DIGITS_VOCAB)
    tokens, logprobs = generate(oracle(context=9), prompt, max_tokens=4, context=9)
    assert decode(tokens, DIGITS_VOCAB) == "95.."
    expected = 5.0 - np.log(np.exp(5.0) + 12)  # one logit of 5, twelve of 0
    np.testing.assert_allclose(logprobs, [expected] * 4, rtol=1e-12)
    batch = np.stack([prompt, encode("12+34=", DIGITS_VOCAB)])
    out = generate(oracle(), batch, max_tokens=3, context=9)
    assert [decode(row, DIGITS_VOCAB) for row in out.tokens] == ["95.", "46."]
    assert out.tokens.shape == out.logprobs.shape == (2, 3)
    assert generate(oracle(), prompt, 0, 9).tokens.shape == (0,)
    seen = []  # the model reads at most the last `context` tokens
    generate(lambda t: seen.append(decode(t[0], DIGITS_VOCAB)) or fixed(t), prompt, 3, 4)
    assert seen == ["+58=", "58=0", "8=00"]


SAYS = np.log([0.5, 0.3, 0.15, 0.05])


def fixed(tokens):
    """A model that always says SAYS, whatever it reads."""
    return np.broadcast_to(SAYS, (*tokens.shape, 4))


def test_sampling_is_reproducible_from_the_seed_and_follows_the_temperature():
    z = SAYS
    prompts = np.zeros((4000, 1), dtype=np.int64)
    a = generate(fixed, prompts, 2, 4, temperature=1.0, seed=1).tokens
    np.testing.assert_array_equal(a, generate(fixed, prompts, 2, 4, temperature=1.0, seed=1).tokens)
    assert not np.array_equal(a, generate(fixed, prompts, 2, 4, temperature=1.0, seed=2).tokens)
    share = np.bincount(a.ravel(), minlength=4) / a.size
    np.testing.assert_allclose(share, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    hot = generate(fixed, prompts, 1, 4, temperature=2.0, seed=1).tokens
    p = np.exp(z / 2) / np.exp(z / 2).sum()
    np.testing.assert_allclose(np.bincount(hot.ravel(), minlength=4) / hot.size, p, atol=0.02)
    top2 = generate(fixed, prompts, 1, 4, temperature=1.0, top_k=2, seed=1).tokens
    np.testing.assert_allclose(np.bincount(top2.ravel()) / top2.size, [0.625, 0.375], atol=0.02)
    top1 = generate(fixed, prompts[:5], 3, 4, temperature=1.0, top_k=1, seed=1)
    assert (top1.tokens == 0).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"context": 0}, "context"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"prompt_ids": []}, "prompt_ids"),
    ],
)
def test_generation_arguments_are_checked(kw, message):
    args = {"prompt_ids": [1, 2], "max_tokens": 2, "context": 4} | kw
    with pytest.raises(ValueError, match=message):
        generate(oracle(), **args)
