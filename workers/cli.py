"""`shardgrad train` and `shardgrad schema`: run a spec without the HTTP service."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

from pydantic import ValidationError

from workers.health import new_warnings
from workers.spec import SpecError, TrainingSpec, format_validation_error, load_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a spec on Ray (resumes from --out if possible)")
    train.add_argument("spec", type=Path, help="training spec (JSON)")
    # Not type=int: the spec validates it, so a bad value fails like a bad spec (with --json too).
    train.add_argument("--workers", metavar="N", help="override the spec's worker count")
    train.add_argument(
        "--out", type=Path, help="run directory (default ./runs/<name>, made safe as a dir name)"
    )
    train.add_argument("--ray-address", help="attach to this Ray cluster (default $RAY_ADDRESS)")
    train.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    train.set_defaults(func=cmd_train)

    schema = sub.add_parser("schema", help="print the training spec's JSON Schema")
    schema.set_defaults(
        func=lambda args: print(json.dumps(TrainingSpec.model_json_schema(), indent=2))
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


class ProgressBar:
    """A tqdm bar on stderr when it is a terminal; silent otherwise, except for training-health
    warnings, one line each on stderr when they first appear."""

    def __init__(self):
        self.bar = None
        self.enabled = sys.stderr.isatty()

    def __call__(self, event: dict) -> None:
        if event["type"] == "health":
            for w in new_warnings(event):
                self.write(f"warning: {w['kind']} at step {w['first_step']}: {w['message']}")
        if not self.enabled:
            return
        from tqdm import tqdm

        kind = event["type"]
        if kind == "started":
            self.bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step")
        elif kind == "step" and self.bar is not None:
            postfix = {"epoch": event["epoch"], "loss": f"{event['train_loss']:.4f}"}
            if event.get("samples_per_s"):
                postfix["samples/s"] = f"{event['samples_per_s']:.0f}"
            if event.get("val_accuracy") is not None:
                postfix["val_acc"] = f"{event['val_accuracy']:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif kind == "worker_failure" and self.bar is not None:
            self.bar.write(f"worker failure: {event['reason']}; recomputing the step")

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line, file=sys.stderr)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_UNSAFE_IN_DIR_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def run_dir_name(name: str) -> str:
    """A spec's free-text `name` as one safe directory name, for the default ./runs/<name>:
    runs of characters other than [A-Za-z0-9._-] become '-', leading dots go (so no '..'
    and no hidden directory), and an empty result becomes 'run'."""
    return _UNSAFE_IN_DIR_NAME.sub("-", name).lstrip(".") or "run"


def cmd_train(args) -> int:
    from workers.trainer import Trainer, run_summary

    def usage_error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps(run_summary("failed", 0, error=message)))
        return 2

    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        return usage_error(str(err))
    if args.workers is not None:
        try:
            spec = TrainingSpec.model_validate(spec.model_dump() | {"workers": args.workers})
        except ValidationError as err:
            errors = format_validation_error(err).replace("\n", "\n  ")
            return usage_error(f"invalid --workers {args.workers}:\n  {errors}")
    out = args.out or Path("runs") / run_dir_name(spec.name)

    stop = threading.Event()

    def interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, interrupt)
    bar = ProgressBar()
    trainer = Trainer(spec, out, callback=bar, stop_event=stop, ray_address=args.ray_address)
    try:
        try:
            summary = trainer.run()
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
    except Exception as err:  # a bug or an environment problem, not a failure the Trainer reports
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0]
        error = f"unexpected {type(err).__name__}: {first_line} (traceback on stderr)"
        summary = trainer.failed(error)

    interrupted = summary["status"] == "cancelled"
    if interrupted:
        summary["status"] = "failed"
        summary["error"] = (
            f"interrupted at step {summary['steps']}; checkpoint written. "
            "Rerun the same command to resume."
        )
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    if interrupted:
        return 130
    return 0 if summary["status"] == "succeeded" else 1


def print_summary(summary: dict) -> None:
    if summary["status"] != "succeeded":
        print(f"failed: {summary.get('error')}")
    for key, value in summary.items():
        if key not in ("status", "error", "health"):
            print(f"{key:>18}: {value}")
    health = summary.get("health")
    if health is not None:
        warned = ", ".join(f"{w['kind']} {w['layer']}" for w in health["warnings"]) or "none"
        print(f"{'health':>18}: {health['checked_steps']} checks; warnings: {warned}")


if __name__ == "__main__":
    sys.exit(main())
