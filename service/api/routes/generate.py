"""Text from a transformer job's checkpoint: the prompt continued token by token, greedily or
sampled reproducibly from a seed (workers/generate.py). Runs in the thread pool, as
predictions do."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.api.deps import BODY, CONFLICT, NOT_FOUND, JobDep, PredictorDep, SettingsDep
from service.api.errors import field_error
from service.config import Settings
from service.limits import over
from service.offload import OffloadedRoute
from service.predict import model_spec
from service.schemas import GenerateRequest, GenerateResponse
from workers.data import describe_data
from workers.sequences import UnknownSymbol, decode, encode
from workers.spec import TrainingSpec, model_size

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
    spec = model_spec(job.spec)
    if spec.model.type != "transformer":
        msg = f"generation needs a transformer; job {job.id}'s model is {spec.model.type!r}"
        raise field_error(("path", "job_id"), msg, job.id)
    vocab = _vocabulary(job.id, spec, settings)
    try:
        prompt_ids = encode(body.prompt, vocab)
    except UnknownSymbol as err:
        raise field_error(("body", "prompt", err.position), str(err), body.prompt) from None
    _check_cost(spec, settings, body.max_tokens)
    options = body.model_dump(include={"max_tokens", "temperature", "top_k", "seed"})
    run_dir = settings.jobs_dir / job.id
    out, name = predictor.generate(spec, run_dir, prompt_ids, body.checkpoint, **options)
    return GenerateResponse(
        text=decode(out.tokens, vocab),
        tokens=out.tokens.tolist(),
        logprobs=out.logprobs.tolist(),
        checkpoint=name,
    )


def _vocabulary(job_id: str, spec: TrainingSpec, settings: Settings) -> tuple[str, ...]:
    """The symbols of the job's data: a builtin task's, or the uploaded text's as stored
    with it; a 409 when the upload has been deleted since."""
    try:
        return describe_data(spec, settings.uploads_dir).vocab
    except (OSError, ValueError) as err:
        detail = f"job {job_id}: its data cannot be read, so neither its vocabulary: {err}"
        raise HTTPException(status.HTTP_409_CONFLICT, detail) from None


def _check_cost(spec: TrainingSpec, settings: Settings, max_tokens: int) -> None:
    """A 422 on max_tokens when its forward passes (one per token, each of at most a
    context of tokens) would cost more multiply-adds than a predict request may."""
    what = f"the request's multiply-adds ({max_tokens} tokens on this model)"
    flops = max_tokens * model_size(spec.model).flops
    if msg := over("max_predict_flops", settings, what, flops):
        raise field_error(("body", "max_tokens"), f"max_tokens: {msg}", max_tokens)
