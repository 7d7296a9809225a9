"""`shardgrad`: the workers' commands (train, schema) plus the service and its client.

shardgrad serve [--host 127.0.0.1] [--port 8000] [--data-dir ./var] [--ray-address ADDR]
shardgrad submit SPEC.json [--follow]
shardgrad jobs | status ID | cancel ID | resume ID | predict ID --input 0.3,-0.2
shardgrad explain ID --input 0.3,-0.2 [--method integrated_gradients] [--target N] [--json]
shardgrad graph ID [--format json|dot]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from service.client import Client, ClientError
from workers.cli import build_parser as build_workers_parser
from workers.explain import METHODS

TERMINAL = ("succeeded", "failed", "cancelled")


def build_parser() -> argparse.ArgumentParser:
    parser = build_workers_parser()
    parser.description = __doc__
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

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

    def client_command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", help="service URL (default $SHARDGRAD_URL or 127.0.0.1:8000)")
        p.set_defaults(func=lambda args: _run_client(func, args))
        return p

    p = client_command("submit", cmd_submit, "submit a training spec to the service")
    p.add_argument("spec", type=Path, help="training spec (JSON)")
    p.add_argument("--follow", action="store_true", help="show progress until the job ends")
    p = client_command("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--status", help="only jobs in this status")
    p.add_argument("--limit", type=int, default=50)
    for name, func, text in (
        ("status", cmd_status, "show one job"),
        ("cancel", cmd_cancel, "cancel a queued or running job (it checkpoints first)"),
        ("resume", cmd_resume, "re-queue a failed or cancelled job from its newest checkpoint"),
    ):
        client_command(name, func, text).add_argument("id", help="job id")
    p = client_command("predict", cmd_predict, "model outputs from a job's newest checkpoint")
    p.add_argument("id", help="job id")
    rows_option(p, "--input", required=True, help="one comma-separated row (repeatable)")
    p = client_command("explain", cmd_explain, "attributions of a model output to its inputs")
    p.add_argument("id", help="job id")
    rows_option(p, "--input", required=True, help="one comma-separated row (repeatable)")
    p.add_argument("--method", choices=METHODS, default="gradient")
    p.add_argument("--target", type=int, help="output index (default: the predicted class)")
    p.add_argument("--steps", type=int, default=64, help="integrated gradients' path steps")
    rows_option(p, "--baseline", help="one row for all inputs, or one per input (default 0)")
    p.add_argument("--json", action="store_true", help="print the service's answer as is")
    p = client_command("graph", cmd_graph, "the loss graph on the first training example")
    p.add_argument("id", help="job id")
    p.add_argument("--format", choices=("json", "dot"), default="json", help="dot: Graphviz")
    return parser


def rows_option(parser: argparse.ArgumentParser, flag: str, **kw) -> None:
    """A repeatable option whose value is a comma-separated row, e.g. `--input -1,0.5`.

    Python 3.11's argparse takes a value like "-1,0.5" for an unknown option; this parser
    accepts anything that starts with a minus and a digit as a value, as 3.13's does.
    """
    parser._negative_number_matcher = re.compile(r"-\.?\d")
    parser.add_argument(flag, action="append", **kw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


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

    from service.config import Settings
    from service.main import create_app

    flags = {"host": args.host, "port": args.port, "data_dir": args.data_dir}
    flags |= {"ray_address": args.ray_address, "access_log": args.access_log}
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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


# -- client commands ----------------------------------------------------------------------


def cmd_submit(client: Client, args) -> int:
    try:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ClientError(f"cannot read {args.spec}: {err}") from None
    job = client.request("POST", "/jobs", json=spec)
    print(f"submitted {job['id']} ({job['name']}): {job['status']}")
    if job.get("pending_reason"):
        print(f"  {job['pending_reason']}")
    if not args.follow:
        return 0
    return follow(client, job["id"])


def follow(client: Client, job_id: str) -> int:
    from tqdm import tqdm

    bar = None
    status = None
    try:
        for event, data in client.events(job_id):
            if event == "status":
                status = data["status"]
                if bar is None:
                    tqdm.write(f"{job_id}: {status}", file=sys.stderr)
                else:
                    bar.set_description(status)
            elif event == "progress" and data["progress"]["total_steps"]:
                p = data["progress"]
                if bar is None:
                    bar = tqdm(total=p["total_steps"], unit="step", desc=data["status"])
                bar.n = p["step"]
                postfix = {"epoch": p["epoch"]}
                loss = data["metrics"].get("train_loss")
                if loss is not None:
                    postfix["loss"] = f"{loss:.4g}"
                bar.set_postfix(postfix, refresh=False)
                bar.refresh()
            elif event == "end":
                status = data["status"]
                break
    finally:
        if bar is not None:
            bar.close()
    job = client.request("GET", f"/jobs/{job_id}")
    print_job(job)
    return 0 if job["status"] == "succeeded" else 1


def cmd_jobs(client: Client, args) -> int:
    params = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    page = client.request("GET", "/jobs", params=params)
    rows = [("ID", "NAME", "STATUS", "PROGRESS", "LOSS", "ATTEMPTS", "CREATED")]
    for j in page["items"]:
        p = j["progress"]
        progress = f"{p['step']}/{p['total_steps']}" if p["total_steps"] else "-"
        if j["status"] == "queued":
            progress = f"#{j['queue_position']} in queue"
        loss = j["metrics"].get("train_loss")
        rows.append(
            (
                j["id"],
                j["name"][:24],
                j["status"],
                progress,
                f"{loss:.4g}" if loss is not None else "-",
                str(j["attempts"]),
                j["created_at"][:19].replace("T", " "),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if page["next_cursor"]:
        print(f"(more: --limit {args.limit * 2})")
    return 0


def print_job(job: dict) -> None:
    p = job["progress"]
    print(f"{job['id']}  {job['name']}  {job['status']}  (attempts {job['attempts']})")
    if p["total_steps"]:
        eta = f", eta {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
        print(f"  step {p['step']}/{p['total_steps']}  epoch {p['epoch']}{eta}")
    if job.get("queue_position"):
        print(f"  queue position {job['queue_position']}: {job.get('pending_reason')}")
    for key, value in job["metrics"].items():
        print(f"  {key:>14}: {value:.6g}" if isinstance(value, float) else f"  {key:>14}: {value}")
    if job.get("error"):
        print(f"  error: {job['error']}")
    for w in (job.get("health") or {}).get("warnings", []):
        print(f"  warning ({w['kind']}, from step {w['first_step']}): {w['message']}")
    for e in job.get("events") or []:
        msg = f"  {e['message']}" if e.get("message") else ""
        print(f"  {e['at'][:19].replace('T', ' ')}  {e['status']:<10} #{e['attempt']}{msg}")


def cmd_status(client: Client, args) -> int:
    print_job(client.request("GET", f"/jobs/{args.id}"))
    return 0


def cmd_cancel(client: Client, args) -> int:
    job = client.request("POST", f"/jobs/{args.id}/cancel")
    print(f"{job['id']}: {job['status']}")
    return 0


def cmd_resume(client: Client, args) -> int:
    job = client.request("POST", f"/jobs/{args.id}/resume")
    print(f"{job['id']}: {job['status']}")
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


def cmd_predict(client: Client, args) -> int:
    rows = parse_rows(args.input, "--input")
    result = client.request("POST", f"/jobs/{args.id}/predict", json={"inputs": rows})
    for row in result["outputs"]:
        print(",".join(_number(v) for v in row))
    return 0


def cmd_explain(client: Client, args) -> int:
    body = {"inputs": parse_rows(args.input, "--input"), "method": args.method}
    body |= {"target": args.target, "steps": args.steps}
    if args.baseline:
        baseline = parse_rows(args.baseline, "--baseline")
        body["baseline"] = baseline[0] if len(baseline) == 1 else baseline
    result = client.request("POST", f"/jobs/{args.id}/explain", json=body)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.id}: {result['method']} from checkpoint {result['checkpoint']}")
    print_attributions(result, predicted=args.target is None)
    return 0


def print_attributions(result: dict, predicted: bool) -> None:
    """Per row: its outputs and the one explained, then a bar per feature, scaled to the
    largest attribution of all rows, with the signed value; integrated gradients' gap."""
    rows = result["attributions"]
    scale = max((abs(a) for row in rows for a in row if a is not None), default=0.0)
    gaps = result["completeness_gap"] or [None] * len(rows)
    rows_of = zip(result["outputs"], rows, result["targets"], gaps, strict=True)
    for i, (outputs, row, explained, gap) in enumerate(rows_of):
        why = " (predicted)" if predicted and len(outputs) > 1 else ""
        values = ", ".join(_number(v) for v in outputs)
        head = f"row {i}  outputs [{values}]  target {explained}{why}"
        print(f"{head} = {_number(outputs[explained])}")
        for k, a in enumerate(row):
            chart = bar(abs(a) / scale) if a is not None and scale else ""
            print(f"  x{k:<3} {_number(a, '+.4g'):>10}  {chart}")
        if gap is not None:
            print(f"  completeness gap {_number(gap, '+.3g')}")


EIGHTHS = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")  # a bar's last, partial cell


def bar(fraction: float, width: int = 30) -> str:
    """`fraction` (0 to 1) of `width` cells in unicode blocks, to an eighth of a cell."""
    full, part = divmod(round(fraction * width * 8), 8)
    return "█" * full + EIGHTHS[part]


def _number(v: float | None, spec: str = ".6g") -> str:
    return "nan" if v is None else format(v, spec)


def cmd_graph(client: Client, args) -> int:
    r = client.send("GET", f"/jobs/{args.id}/graph", params={"format": args.format})
    if args.format == "dot":
        sys.stdout.write(r.text)
    else:
        print(json.dumps(r.json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
