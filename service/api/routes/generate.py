"""A transformer job's checkpoint on a prompt: the prompt continued token by token, greedily
or sampled reproducibly from a seed (workers/generate.py); its attention weights; and (for
POST /jobs/{id}/explain, see interpret.py) its tokens' attributions to the next token
(workers/lm_views.py). Run in the thread pool, as predictions do."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.api.deps import BODY, CONFLICT, NOT_FOUND, JobDep, PredictorDep, SettingsDep
from service.api.errors import field_error
from service.config import Settings
from service.limits import check_request_cost, over
from service.offload import OffloadedRoute
from service.predict import Predictor, model_spec
from service.schemas import (
    AttentionRequest,
    AttentionResponse,
    GenerateRequest,
    GenerateResponse,
    TokenExplainRequest,
    TokenExplainResponse,
)
from workers.data import describe_data
from workers.sequences import UnknownSymbol, decode, encode
from workers.spec import TrainingSpec, model_size

# The attention view's answer: layers x heads x T x T numbers, as JSON (~20 bytes each).
MAX_ATTENTION_VALUES = 2**20

router = APIRouter(prefix="/jobs", tags=["generation"], route_class=OffloadedRoute)


@router.post("/{job_id}/generate", responses=BODY | NOT_FOUND | CONFLICT)
def generate(
    job: JobDep, body: GenerateRequest, predictor: PredictorDep, settings: SettingsDep
) -> GenerateResponse:
    """Continue `prompt` by `max_tokens` tokens (1..256) from the checkpoint `checkpoint`
    names (default: the best if the job keeps one, else the newest). The model reads the
    last `context` tokens. Temperature 0 is greedy; above 0 it samples, restricted to the
    `top_k` most likely tokens if given, the same tokens for the same `seed`. A prompt
    character outside the job's vocabulary is a 422 at its position; a job that is not a
    transformer's, a 422; a job without a checkpoint yet, a 409."""
    spec = transformer_spec(job, "generation")
    vocab = _vocabulary(job.id, spec, settings)
    prompt_ids = _encode(body.prompt, vocab, "prompt")
    what = f"{body.max_tokens} tokens"
    _check_cost(spec, settings, body.max_tokens, ("max_tokens", body.max_tokens), what)
    options = body.model_dump(include={"max_tokens", "temperature", "top_k", "seed"})
    run_dir = settings.jobs_dir / job.id
    out, name = predictor.generate(spec, run_dir, prompt_ids, body.checkpoint, **options)
    return GenerateResponse(
        text=decode(out.tokens, vocab),
        tokens=out.tokens.tolist(),
        logprobs=out.logprobs.tolist(),
        checkpoint=name,
    )


@router.post(
    "/{job_id}/attention", responses=BODY | NOT_FOUND | CONFLICT, tags=["interpretability"]
)
def attention(
    job: JobDep, body: AttentionRequest, predictor: PredictorDep, settings: SettingsDep
) -> AttentionResponse:
    """The softmax attention weights of every layer and head on `prompt` (at most
    `context` characters of the job's vocabulary), [layer][head][query][key], from the
    checkpoint `checkpoint` names: causal, so row i weighs tokens 0..i and sums to 1.
    422s as generate's; a prompt longer than the context, a 422."""
    spec = transformer_spec(job, "the attention view")
    vocab = _vocabulary(job.id, spec, settings)
    prompt_ids = _fitting(body.prompt, vocab, spec)
    _check_cost(spec, settings, 1, ("prompt", body.prompt), "one forward pass")
    model = spec.model
    if (values := model.layers * model.heads * len(body.prompt) ** 2) > MAX_ATTENTION_VALUES:
        msg = (
            f"prompt: its attention weights (layers x heads x {len(body.prompt)}^2) are "
            f"{values:,} values, over the limit of {MAX_ATTENTION_VALUES:,}; ask a shorter prompt"
        )
        raise field_error(("body", "prompt"), msg, body.prompt)
    run_dir = settings.jobs_dir / job.id
    weights, name = predictor.attention(spec, run_dir, prompt_ids, body.checkpoint)
    return AttentionResponse(tokens=list(body.prompt), weights=weights, checkpoint=name)


def explain_prompt(
    job, body: TokenExplainRequest, predictor: Predictor, settings: Settings
) -> TokenExplainResponse:
    """POST /jobs/{id}/explain on a transformer job (see interpret.explain)."""
    spec = transformer_spec(job, "explaining a prompt")
    vocab = _vocabulary(job.id, spec, settings)
    prompt_ids = _fitting(body.prompt, vocab, spec)
    target = None if body.target is None else int(_encode(body.target, vocab, "target")[0])
    check_request_cost(spec, settings, [body.prompt], "integrated_gradients", body.steps)
    run_dir = settings.jobs_dir / job.id
    result, name = predictor.explain_tokens(
        spec, run_dir, prompt_ids, body.checkpoint, target=target, steps=body.steps
    )
    target = result.pop("target")
    return TokenExplainResponse(
        tokens=list(body.prompt), target=vocab[target], target_id=target, **result, checkpoint=name
    )


def transformer_spec(job, what: str) -> TrainingSpec:
    """The job's spec; a 422 at the job id unless its model is a transformer."""
    spec = model_spec(job.spec)
    if spec.model.type != "transformer":
        msg = f"{what} needs a transformer; job {job.id}'s model is {spec.model.type!r}"
        raise field_error(("path", "job_id"), msg, job.id)
    return spec


def _encode(text: str, vocab: tuple[str, ...], field: str):
    """The token ids of a body's field; a 422 at the position of a character outside
    the vocabulary."""
    try:
        return encode(text, vocab)
    except UnknownSymbol as err:
        raise field_error(("body", field, err.position), str(err), text) from None


def _fitting(prompt: str, vocab: tuple[str, ...], spec: TrainingSpec):
    """The prompt's ids, whose attention or attributions are asked: at most `context`."""
    if len(prompt) > spec.model.context:
        msg = f"prompt has {len(prompt)} characters; the model reads at most {spec.model.context}"
        raise field_error(("body", "prompt"), msg, prompt)
    return _encode(prompt, vocab, "prompt")


def _vocabulary(job_id: str, spec: TrainingSpec, settings: Settings) -> tuple[str, ...]:
    """The symbols of the job's data: a builtin task's, or the uploaded text's as stored
    with it; a 409 when the upload has been deleted since."""
    try:
        return describe_data(spec, settings.uploads_dir).vocab
    except (OSError, ValueError) as err:
        detail = f"job {job_id}: its data cannot be read, so neither its vocabulary: {err}"
        raise HTTPException(status.HTTP_409_CONFLICT, detail) from None


def _check_cost(spec: TrainingSpec, settings: Settings, passes: int, field: tuple, what: str):
    """A 422 on `field` (its name and value) when `passes` forward passes (each of at most a
    context of tokens) would cost more multiply-adds than a predict request may."""
    flops = passes * model_size(spec.model).flops
    message = f"the request's multiply-adds ({what} on this model)"
    name, value = field
    if msg := over("max_predict_flops", settings, message, flops):
        raise field_error(("body", name), f"{name}: {msg}", value)
