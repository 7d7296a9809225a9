"""A transformer job explained (issue 15 §5): token attributions by integrated gradients
over the embeddings, the attention weights of every layer and head (torch parity), and the
loss graph with one node per sub-layer. One tiny addition model, trained in-process once for
the module (tests/test_generate.py's recipe)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import locs, make_client, submit
from tests.test_generate import lm_spec
from workers.spec import TrainingSpec
from workers.trainer import Trainer

PROMPT = "12+34="


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The service with one trained addition job (1 layer, 2 heads, context 9)."""
    tmp_path = tmp_path_factory.mktemp("lm_views")
    client, _, _ = make_client(tmp_path)
    job_id = submit(client, **lm_spec())["id"]
    summary = Trainer(TrainingSpec.model_validate(lm_spec()), tmp_path / "jobs" / job_id).run()
    assert summary["status"] == "succeeded", summary
    return client, job_id


def trained_model(client, job_id):
    from workers.checkpoint import load_model_state, resolve_checkpoint
    from workers.model import build_model

    model = build_model(TrainingSpec.model_validate(lm_spec()))
    run_dir = client.app.state.settings.jobs_dir / job_id
    model.load_state_dict(load_model_state(resolve_checkpoint(run_dir, None)))
    return model


def post(client, job_id, view, **body):
    return client.post(f"/api/v1/jobs/{job_id}/{view}", json={"prompt": PROMPT, **body})


def answer(client, job_id, view, **body) -> dict:
    r = post(client, job_id, view, **body)
    assert r.status_code == 200, r.text
    return r.json()


# -- explain ----------------------------------------------------------------------------------


def test_explain_attributes_the_greedy_next_token_to_each_prompt_token(served):
    client, job_id = served
    got = answer(client, job_id, "explain")
    greedy = answer(client, job_id, "generate", max_tokens=1)
    assert got["tokens"] == list(PROMPT) and len(got["attributions"]) == len(PROMPT)
    assert (got["target"], got["target_id"]) == (greedy["text"], greedy["tokens"][0])
    assert got["method"] == "integrated_gradients" and got["checkpoint"] == greedy["checkpoint"]
    change = got["logit"] - got["baseline_logit"]
    assert abs(sum(got["attributions"]) - change - got["completeness_gap"]) < 1e-9
    assert abs(got["completeness_gap"]) <= 2e-3 * abs(change) + 1e-9
    assert any(abs(a) > 1e-3 for a in got["attributions"])


def test_explain_a_chosen_target_matches_the_engines_logits(served):
    from core import no_grad

    client, job_id = served
    got = answer(client, job_id, "explain", target="7", steps=16)
    assert (got["target"], got["target_id"]) == ("7", 7)
    model = trained_model(client, job_id)
    with no_grad():
        logits = model(np.array([[1, 2, 10, 3, 4, 11]])).data  # "12+34=" in 0-9 + = .
    assert got["logit"] == pytest.approx(logits[0, -1, 7], abs=1e-9)
    assert abs(got["completeness_gap"]) <= 2e-3 * abs(got["logit"] - got["baseline_logit"])


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"prompt": "12x4="}, ("body", "prompt", 2)),
        ({"prompt": "1234567890"}, ("body", "prompt")),  # over the context of 9
        ({"target": "x"}, ("body", "target", 0)),
        ({"target": "78"}, ("body", "target")),
        ({"steps": 0}, ("body", "steps")),
        ({"inputs": [[1.0]]}, ("body", "inputs")),  # rows are an MLP's
    ],
)
def test_bad_explain_requests_get_a_422_naming_the_field(served, body, loc):
    client, job_id = served
    assert locs(post(client, job_id, "explain", **body)) == [loc]


def test_explain_costs_are_bounded_and_rows_bodies_keep_their_shape(tmp_path):
    client, _, _ = make_client(tmp_path, max_explain_flops=10**6)
    lm = submit(client, **lm_spec())["id"]
    r = post(client, lm, "explain", steps=1024)
    assert locs(r) == [("body", "steps")] and "SHARDGRAD_MAX_EXPLAIN_FLOPS" in r.text
    moons = submit(client)["id"]
    assert locs(post(client, moons, "explain")) == [("body", "inputs"), ("body", "prompt")]
    r = client.post(f"/api/v1/jobs/{moons}/explain", json={"inputs": [[0.1, "x"]]})
    assert locs(r) == [("body", "inputs", 0, 1)]  # as ever: no union tag in the loc


# -- attention --------------------------------------------------------------------------------


def test_attention_weights_are_causal_rows_of_probabilities(served):
    client, job_id = served
    got = answer(client, job_id, "attention")
    w = np.array(got["weights"])
    assert got["tokens"] == list(PROMPT) and w.shape == (1, 2, 6, 6)  # layers, heads, T, T
    assert np.all(w[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)
    np.testing.assert_allclose(w.sum(axis=-1), 1, atol=1e-12)
    assert np.all(w >= 0) and w[..., 0, 0] == pytest.approx(1)


def test_attention_weights_match_torch_multihead_attention(served):
    torch = pytest.importorskip("torch")
    from core import no_grad

    client, job_id = served
    got = np.array(answer(client, job_id, "attention")["weights"])
    model = trained_model(client, job_id)
    block = model.blocks[0]
    with no_grad():
        x = block.norm1(model.embed(np.array([[1, 2, 10, 3, 4, 11]]))).data
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    state = {k: torch.from_numpy(v) for k, v in block.self_attn.state_dict().items()}
    mha.load_state_dict(state)
    t = torch.from_numpy(x)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    with torch.no_grad():
        _, expected = mha(t, t, t, attn_mask=mask, need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(got[0], expected[0].numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "body, loc",
    [({"prompt": "1+x"}, ("body", "prompt", 2)), ({"prompt": "1" * 10}, ("body", "prompt"))],
)
def test_bad_attention_requests_get_a_422_naming_the_field(served, body, loc):
    client, job_id = served
    assert locs(post(client, job_id, "attention", **body)) == [loc]
    moons = submit(client)["id"]
    r = post(client, moons, "attention")
    assert locs(r) == [("path", "job_id")] and "needs a transformer" in r.text


# -- the graph --------------------------------------------------------------------------------


def test_the_graph_has_one_node_per_sub_layer(served):
    client, job_id = served
    r = client.get(f"/api/v1/jobs/{job_id}/graph")
    assert r.status_code == 200, r.text
    graph = r.json()
    nodes = {n["id"]: n for n in graph["nodes"]}
    computed = [n for n in graph["nodes"] if n["operation"] != "parameter"]
    subs = ["norm1", "self_attn", "add1", "norm2", "linear1", "gelu", "linear2", "add2"]
    names = ["embed", *(f"blocks.0.{s}" for s in subs), "norm", "head", "loss"]
    assert [n["name"] for n in computed] == names
    root = nodes[graph["root"]]
    assert root["name"] == "loss" and root["shape"] == [] and root["gradient"] == 1.0
    attn = computed[2]
    assert attn["operation"] == "linear+attention+linear"
    inputs = [nodes[i].get("name") for i in attn["inputs"]]
    assert inputs[0] == "blocks.0.norm1" and "blocks.0.self_attn.in_proj_weight" in inputs
    assert [nodes[i]["name"] for i in computed[3]["inputs"]] == ["embed", "blocks.0.self_attn"]
    assert all(n["gradient"] is not None for n in graph["nodes"])


def test_the_attention_answer_is_bounded(served, monkeypatch):
    from service.api.routes import generate

    client, job_id = served
    monkeypatch.setattr(generate, "MAX_ATTENTION_VALUES", 50)  # 1 layer x 2 heads x 6^2 = 72
    r = post(client, job_id, "attention")
    assert locs(r) == [("body", "prompt")] and "72 values, over the limit of 50" in r.text
    assert answer(client, job_id, "attention", prompt="12+3")["tokens"] == list("12+3")  # 32


def test_a_large_explain_body_is_checked_off_the_loop_with_the_same_locs():
    """Bodies over OFFLOAD_BYTES are validated in another process against the union of the
    two bodies; its errors name the fields as the chosen body's own would (no union tag)."""
    import json

    from service.offload import OFFLOAD_BYTES, _validate
    from service.schemas import ExplainBody

    rows = json.dumps({"inputs": [[0.25, 0.5]] * 900 + [[0.1, "x"]]}).encode()
    assert len(rows) > OFFLOAD_BYTES
    kind, errors, _ = _validate(ExplainBody, rows, True, {})
    assert kind == "errors" and [e["loc"] for e in errors] == [["body", "inputs", 900, 1]]
    prompt = json.dumps({"prompt": "1" * 9000, "steps": 0}).encode()
    kind, errors, _ = _validate(ExplainBody, prompt, True, {})
    assert kind == "errors" and [e["loc"] for e in errors] == [["body", "steps"]]
    kind, value, _ = _validate(ExplainBody, json.dumps({"prompt": "1" * 9000}).encode(), True, {})
    assert kind == "ok" and value["prompt"] == "1" * 9000 and value["steps"] == 64


def test_a_diverged_models_views_are_json_with_nulls():
    import json

    from core.lm import TransformerLM
    from workers.lm_views import attention_weights, explain_tokens

    model = TransformerLM(13, 9, 8, 2, 1, 16, seed=0)
    model.blocks[0].self_attn.in_proj_weight.data[:] = np.nan
    got = explain_tokens(model, [1, 2, 10], target=3, steps=2)
    assert got["logit"] is None and got["completeness_gap"] is None
    weights = attention_weights(model, [1, 2, 10])
    assert weights[0][0][0][0] is None
    json.dumps([got, weights], allow_nan=False)
