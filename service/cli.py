"""`shardgrad`: the workers' commands (train, schema) plus the service and its client.

shardgrad serve [--host 127.0.0.1] [--port 8000] [--data-dir ./var] [--ray-address ADDR]
shardgrad submit SPEC.json [--follow]
shardgrad jobs [--status S] [--tag k:v]... [--name PART] [--sweep ID] [--sort -val_accuracy]
shardgrad status ID | cancel ID | resume ID | delete ID | predict ID --input 0.3,-0.2
shardgrad gc --older-than 30d [--status failed,cancelled] [--dry-run]
shardgrad predict ID --images IMAGES.npy         (a CNN: N x C x H x W, or one C x H x W)
shardgrad explain ID --input 0.3,-0.2 [--method integrated_gradients] [--target N]
shardgrad explain ID --images IMAGES.npy [...]
shardgrad graph ID [--format json|dot]
shardgrad generate ID --prompt "12+34=" [--max-tokens N] [--temperature T] [--top-k K] [--seed S]
shardgrad logs [-f] ID [--since TIME]
shardgrad export ID --format onnx|torch --out FILE
shardgrad export RUN_DIR --spec SPEC.json --format onnx|torch --out FILE   (offline)
(predict, explain, graph, export, generate: [--checkpoint best|latest|step-N])

Every client command takes --json: one JSON document on stdout, the data it shows.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from service.client import Client, ClientError, Job
from service.listing import SORTS
from workers import render
from workers.checkpoint import CHOICE_HELP, DEFAULT_HELP, UnknownCheckpoint
from workers.cli import UsageError
from workers.cli import build_parser as build_command_tree
from workers.explain import METHODS
from workers.export import FORMATS, ExportUnavailable, export_run
from workers.spec import SpecError, load_spec

ROW_FLAGS = ("--input", "--baseline")  # options whose value is a comma-separated row
_NEGATIVE = re.compile(r"-\.?\d")  # a value, not an option: "-1,0.5", "-.5,0"
ROW_HELP = "one comma-separated row (repeatable)"
IMAGES_HELP = "a .npy of images, N x C x H x W (or one C x H x W), for a CNN"
CHECKPOINT_HELP = f"the checkpoint that answers: {CHOICE_HELP} (default: {DEFAULT_HELP})"
FINISHED = ("succeeded", "failed", "cancelled")


def build_parser() -> argparse.ArgumentParser:
    return build_command_tree(add_service_commands, add_client_commands, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(join_negative_rows(argv))
    return args.func(args) or 0


def join_negative_rows(argv: list[str]) -> list[str]:
    """`--input -1,0.5` as `--input=-1,0.5`: Python 3.11's argparse takes a value that starts
    with a minus and is not a plain number for an unknown option (3.13's does not)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ROW_FLAGS and _NEGATIVE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def add_service_commands(sub) -> None:
    serve = sub.add_parser("serve", help="run the HTTP job service (embedded Ray by default)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--data-dir", type=Path, help="store, checkpoints, uploads (default ./var)")
    serve.add_argument("--ray-address", help="attach to this Ray cluster (default $RAY_ADDRESS)")
    serve.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log every request (default off: $SHARDGRAD_ACCESS_LOG)",
    )
    serve.set_defaults(func=cmd_serve)


def add_client_commands(sub) -> None:
    def command(name: str, func, help: str, json_help: str = "print the service's answer as is"):
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", help="service URL (default $SHARDGRAD_URL or 127.0.0.1:8000)")
        p.add_argument("--json", action="store_true", help=json_help)
        p.set_defaults(func=lambda args: _run_client(func, args))
        return p

    p = command("submit", cmd_submit, "submit a training spec to the service")
    p.add_argument("spec", type=Path, help="training spec (JSON)")
    p.add_argument("--follow", action="store_true", help="show progress until the job ends")
    p = command("sweep", cmd_sweep, "start a sweep: trials of a spec that Optuna searches")
    p.add_argument("spec", type=Path, help="sweep (JSON): name, base, parameters, trials...")
    p.add_argument("--follow", action="store_true", help="show progress until the sweep ends")
    p = command("jobs", cmd_jobs, "list jobs, newest first (or in --sort order)")
    p.add_argument("--status", help="only jobs in this status")
    p.add_argument("--tag", action="append", default=[], help="key:value (repeat: all of them)")
    p.add_argument("--name", help="only jobs whose name holds this (any case)")
    p.add_argument("--sweep", help="only the trials of this sweep (= --tag sweep:ID)")
    p.add_argument("--sort", choices=SORTS, metavar="SORT", help=f"one of {', '.join(SORTS)}")
    p.add_argument("--limit", type=int, default=50)
    p = command("gc", cmd_gc, "delete finished jobs that ended long ago, with their files")
    p.add_argument("--older-than", required=True, type=duration, help="e.g. 30d, 12h, 90m")
    p.add_argument("--status", type=statuses, help="comma-separated (default: all finished)")
    p.add_argument("--dry-run", action="store_true", help="list them; delete nothing")
    for name, func, text in (
        ("status", cmd_status, "show one job"),
        ("cancel", cmd_cancel, "cancel a queued or running job (it checkpoints first)"),
        ("resume", cmd_resume, "re-queue a failed or cancelled job from its newest checkpoint"),
        ("delete", cmd_delete, "delete a finished job: its checkpoints, logs and metrics"),
    ):
        command(name, func, text).add_argument("id", help="job id")
    p = command("predict", cmd_predict, "model outputs from one of a job's checkpoints")
    p.add_argument("id", help="job id")
    add_inputs(p)
    add_explain(command("explain", cmd_explain, "attributions of a model output to its inputs"))
    add_generate(command("generate", cmd_generate, "continue a prompt with a transformer job"))
    p = command("graph", cmd_graph, "the loss graph on the first training example", "--format json")
    p.add_argument("id", help="job id")
    p.add_argument("--format", choices=("json", "dot"), default="json", help="dot: Graphviz")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p = command("logs", cmd_logs, "a job's log", '{"job_id", "lines"} (with -f once it ended)')
    p.add_argument("id", help="job id")
    p.add_argument("-f", "--follow", action="store_true", help="print new lines until it ends")
    p.add_argument("--since", help="only records after this time (ISO 8601; UTC if no zone)")
    p = command("export", cmd_export, "a job's (or run directory's) model as ONNX or for torch")
    p.set_defaults(func=cmd_export)  # a run directory needs no service
    p.add_argument("target", metavar="JOB_OR_RUN_DIR", help="job id, or a run directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="the file to write")
    p.add_argument("--spec", type=Path, help="a run directory's spec (JSON), as trained")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)


def add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="job id")
    add_inputs(p)
    p.add_argument("--method", choices=METHODS, default="gradient")
    p.add_argument("--target", type=int, help="output index (default: the predicted class)")
    p.add_argument("--steps", type=int, default=64, help="integrated gradients' path steps")
    p.add_argument(
        "--baseline",
        action="append",
        help="one row for all inputs, or one per input (default 0)",
    )


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="job id")
    p.add_argument("--prompt", required=True, help="text in the job's vocabulary")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens to add (1..256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="the same seed samples the same text")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)


def add_inputs(p: argparse.ArgumentParser) -> None:
    """--input rows, or --images from a .npy: one of the two; and --checkpoint."""
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", action="append", help=ROW_HELP)
    inputs.add_argument("--images", type=Path, metavar="FILE.npy", help=IMAGES_HELP)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)


def _run_client(func, args) -> int:
    try:
        return func(Client(args.url), args) or 0
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


# -- serve -------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from service.config import Settings
    from service.main import create_app

    flags = {"host": args.host, "port": args.port, "data_dir": args.data_dir}
    flags |= {"ray_address": args.ray_address, "access_log": args.access_log}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:  # a bad setting (an empty token): say which, not a trace
        for e in err.errors(include_url=False):
            name = "SHARDGRAD_" + "_".join(map(str, e["loc"])).upper()
            msg = e["msg"].removeprefix("Value error, ")  # our checks' messages name it
            print(f"error: {msg if name in msg else f'{name}: {msg}'}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.token() is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("shardgrad").warning(
            "no SHARDGRAD_API_TOKEN: only requests to a loopback name (and "
            "SHARDGRAD_ALLOWED_HOSTS) are answered; set a token to serve %s",
            settings.host,
        )
    # Open SSE streams must not hold up the shutdown that checkpoints running jobs.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=3,
        log_level="info",
        access_log=settings.access_log,
    )
    return 0


# -- client commands: a request, then its answer rendered (or as JSON with --json) ----------


def cmd_submit(client: Client, args) -> int:
    job = client.submit(args.spec)
    if not args.follow:
        show(args, job.data, render.print_submitted)
        return 0
    if not args.json:
        render.print_submitted(job.data)
    follow(job)
    show(args, job.data, render.print_job)
    return 0 if job.status == "succeeded" else 1


def cmd_sweep(client: Client, args) -> int:
    sweep = client.sweep(args.spec)
    if args.follow:
        if not args.json:
            print(f"sweep {sweep.id} {sweep.info.name!r} started", file=sys.stderr)
        seen = None
        for info in sweep.events():
            line = f"{info.status}: {_counts(info.counts)}" + _best(info.best)
            if line != seen:
                print(line, file=sys.stderr)
                seen = line
        sweep.refresh()
    show(args, sweep.data, print_sweep)
    return 0 if not args.follow or sweep.status == "finished" else 1


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials yet"


def _best(best) -> str:
    if best is None:
        return ""
    return f"; best: trial {best.number}, {best.value:.6g}"


def print_sweep(doc: dict) -> None:
    """A sweep: its status and counts, then one line per trial and its best."""
    print(f"sweep {doc['id']} {doc['name']!r}: {doc['status']}; {_counts(doc['counts'])}")
    metric = doc["metric"]
    print(f"{'trial':>5}  {'state':<10} {metric:>12} {'at step':>8}  {'job':<12}  params")
    for t in doc.get("trials", []):
        state = "pruned" if t["pruned"] else t["state"]
        value = t["value"] if t["value"] is not None else t["best_value"]
        shown = f"{value:.6g}" if value is not None else "-"
        step = t["best_step"] if t["best_step"] is not None else "-"
        params = " ".join(f"{k}={json.dumps(v)}" for k, v in t["params"].items())
        job = t["job_id"] or "-"
        print(f"{t['number']:>5}  {state:<10} {shown:>12} {step:>8}  {job:<12}  {params}")
    best = doc.get("best")
    if best is not None:
        print(f"best: trial {best['number']} (job {best['job_id']}), {metric} {best['value']:.6g}")


def follow(job: Job) -> Job:
    """The job's progress on stderr until it ends; then the job as it ended."""
    bar = render.ProgressBar(enabled=True)
    try:
        for event, data in job.client.events(job.id):
            if event == "end":
                break
            bar.job_event(event, data)
    finally:
        bar.close()
    return job.refresh()


def show(args, doc: dict, print_human) -> None:
    """`doc` as JSON with --json, else as `print_human` renders it."""
    if args.json:
        render.print_json(doc)
    else:
        print_human(doc)


def cmd_jobs(client: Client, args) -> int:
    filters = {key: getattr(args, key) for key in ("status", "name", "sweep", "sort")}
    page = client.job_page(limit=args.limit, tag=args.tag or None, **filters)
    page = page.model_dump(mode="json")
    show(args, page, lambda page: render.print_jobs(page, args.limit))
    return 0


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` (or plain seconds) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30d, 12h, 90m)")
    return float(match[1]) * UNITS[match[2] or "s"]


def statuses(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen or set(chosen) - set(FINISHED):
        raise argparse.ArgumentTypeError(f"{text!r}: one or more of {', '.join(FINISHED)}")
    return chosen


def cmd_gc(client: Client, args) -> int:
    """POST /jobs/gc until no more match (a request deletes a batch); one batch on --dry-run."""
    body = {"older_than_s": args.older_than, "dry_run": args.dry_run}
    if args.status:
        body["status"] = args.status
    deleted, more = [], True
    while more:
        answer = client.request("POST", "/jobs/gc", json=body)
        deleted += answer["deleted"]
        more = answer["more"] and not args.dry_run and bool(answer["deleted"])
    doc = {"deleted": deleted, "dry_run": args.dry_run, "more": answer["more"]}
    show(args, doc, _print_gc)
    return 0


def _print_gc(doc: dict) -> None:
    verb = "would delete" if doc["dry_run"] else "deleted"
    print(f"{verb} {len(doc['deleted'])} jobs" + (" (and more)" if doc["more"] else ""))
    for job_id in doc["deleted"]:
        print(f"  {job_id}")


def cmd_delete(client: Client, args) -> int:
    client.send("DELETE", f"/jobs/{args.id}")
    show(args, {"deleted": args.id}, lambda doc: print(f"deleted {doc['deleted']}"))
    return 0


def cmd_status(client: Client, args) -> int:
    show(args, client.job(args.id).data, render.print_job)
    return 0


def cmd_cancel(client: Client, args) -> int:
    show(args, Job.of(client, args.id).cancel().data, render.print_job_status)
    return 0


def cmd_resume(client: Client, args) -> int:
    show(args, Job.of(client, args.id).resume().data, render.print_job_status)
    return 0


def parse_rows(lines: list[str], flag: str) -> list[list[float]]:
    try:
        rows = [[float(v) for v in line.split(",")] for line in lines]
    except ValueError as err:
        raise ClientError(f"{flag} must be comma-separated numbers: {err}") from None
    for i, row in enumerate(rows):
        if not all(map(math.isfinite, row)):
            raise ClientError(f"{flag} row {i} is not all finite numbers: {lines[i]}")
    return rows


def read_images(path: Path) -> list:
    """The images of a .npy file as nested lists, N x C x H x W (one C x H x W image is N=1);
    the service checks their shape against the model's."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ClientError(f"--images: cannot read {path}: {err}") from None
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.dtype.kind not in "fiu":
        raise ClientError(
            f"--images: {path} holds a {a.dtype} array of shape {a.shape}; "
            "give numbers, N x C x H x W"
        )
    if not np.isfinite(a).all():
        raise ClientError(f"--images: {path} holds values that are not finite")
    return a.astype(np.float64).tolist()


def inputs_of(args) -> list:
    return read_images(args.images) if args.images else parse_rows(args.input, "--input")


def cmd_predict(client: Client, args) -> int:
    result = Job.of(client, args.id).predict(inputs_of(args), checkpoint=args.checkpoint)
    show(args, result.model_dump(mode="json"), render.print_outputs)
    return 0


def cmd_generate(client: Client, args) -> int:
    """The completion alone on stdout (with --json: the whole answer)."""
    result = Job.of(client, args.id).generate(
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        checkpoint=args.checkpoint,
    )
    show(args, result.model_dump(mode="json"), lambda doc: print(doc["text"]))
    return 0


def cmd_explain(client: Client, args) -> int:
    baseline = parse_rows(args.baseline, "--baseline") if args.baseline else None
    if baseline is not None and len(baseline) == 1:
        baseline = baseline[0]
    result = Job.of(client, args.id).explain(
        inputs_of(args),
        args.method,
        target=args.target,
        baseline=baseline,
        steps=args.steps,
        checkpoint=args.checkpoint,
    )
    predicted = args.target is None
    answer = result.model_dump(mode="json")
    show(args, answer, lambda result: render.print_attributions(args.id, result, predicted))
    return 0


def chosen(args) -> dict:
    """The --checkpoint asked for, as the request's `checkpoint` (the service checks it)."""
    return {"checkpoint": args.checkpoint} if args.checkpoint else {}


def cmd_graph(client: Client, args) -> int:
    fmt = "json" if args.json else args.format
    r = client.send("GET", f"/jobs/{args.id}/graph", params={"format": fmt, **chosen(args)})
    if fmt == "dot":
        sys.stdout.write(r.text)
    else:
        render.print_json(r.json())
    return 0


def cmd_export(args) -> int:
    """Write the export to --out: from the service for a job id, else from the run
    directory and its --spec without one."""
    try:
        if Path(args.target).is_dir():
            data, name = _export_run_dir(args)
        else:
            with Client(args.url) as client:
                params = {"format": args.format, **chosen(args)}
                r = client.send("GET", f"/jobs/{args.target}/export", params=params)
            data, name = r.content, r.headers.get("x-checkpoint", "")
        args.out.write_bytes(data)
    except (ClientError, OSError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    done = {"out": str(args.out), "format": args.format, "checkpoint": name, "bytes": len(data)}
    if args.json:
        render.print_json(done)
    else:
        print(f"wrote {args.out}: {args.format} export of {name} ({len(data):,} bytes)")
    return 0


def _export_run_dir(args) -> tuple[bytes, str]:
    if args.spec is None:
        raise UsageError(f"{args.target} is a run directory: give --spec, the spec it trained")
    try:
        spec = load_spec(args.spec)
        exported = export_run(spec, args.target, args.format, args.checkpoint)
    except UnknownCheckpoint as err:
        raise ClientError(f"{args.target}: {err}") from None
    except (SpecError, ValueError, ExportUnavailable) as err:  # ValueError: another model
        raise UsageError(str(err)) from None
    return exported.data, exported.checkpoint


def cmd_logs(client: Client, args) -> int:
    if args.follow:
        lines = client.follow_logs(args.id, args.since)
    else:
        lines = client.logs(args.id, args.since).splitlines()
    if args.json:
        render.print_json({"job_id": args.id, "lines": list(lines)})
        return 0
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
