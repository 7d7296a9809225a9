"""`shardgrad train` and `shardgrad schema`: run a spec without the HTTP service."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from workers.config import WorkerSettings
from workers.events import RunSummary, run_summary
from workers.render import ProgressBar, print_json, print_summary
from workers.spec import SpecError, TrainingSpec, format_validation_error, load_spec


def build_parser(*more: Callable, description: str | None = None) -> argparse.ArgumentParser:
    """The `shardgrad` command tree: the root parser, this module's commands, then those that
    each of `more` adds to the subparsers (the service adds its own this way)."""
    parser = argparse.ArgumentParser(
        prog="shardgrad",
        description=description or __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the usage lines stay lines
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (add_train_commands, *more):
        add_commands(sub)
    return parser


def add_train_commands(sub) -> None:
    train = sub.add_parser("train", help="train a spec on Ray (resumes from --out if possible)")
    train.add_argument("spec", type=Path, help="training spec (JSON)")
    # Not type=int: the spec validates it, so a bad value fails like a bad spec (with --json too).
    train.add_argument(
        "--workers", metavar="N|auto", help="override the spec's worker count (0: in-process)"
    )
    train.add_argument(
        "--out", type=Path, help="run directory (default ./runs/<name>, made safe as a dir name)"
    )
    train.add_argument("--ray-address", help="attach to this Ray cluster (default $RAY_ADDRESS)")
    train.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    train.set_defaults(func=cmd_train)

    schema = sub.add_parser("schema", help="print the training spec's JSON Schema")
    schema.add_argument("--json", action="store_true", help="the same: it is JSON already")
    schema.set_defaults(func=lambda args: print_json(TrainingSpec.model_json_schema()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


_UNSAFE_IN_DIR_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def run_dir_name(name: str) -> str:
    """A spec's free-text `name` as one safe directory name, for the default ./runs/<name>:
    runs of characters other than [A-Za-z0-9._-] become '-', leading dots go (so no '..'
    and no hidden directory), and an empty result becomes 'run'."""
    return _UNSAFE_IN_DIR_NAME.sub("-", name).lstrip(".") or "run"


class UsageError(Exception):
    """A bad spec, --workers or setting: exit code 2, the message on stderr."""


def train_inputs(args) -> tuple[TrainingSpec, WorkerSettings]:
    """The spec (with --workers applied) and the settings (with --ray-address applied)."""
    from workers.data import with_data
    from workers.warmstart import InitFromError, pin

    try:
        settings = WorkerSettings()
    except ValidationError as err:
        raise UsageError(f"invalid settings:\n  {err}") from None
    if args.ray_address:
        settings = settings.model_copy(update={"ray_address": args.ray_address})
    try:  # checked against its data, too
        spec = load_spec(args.spec, context=with_data(settings.datasets_dir))
    except SpecError as err:
        raise UsageError(str(err)) from None
    if args.workers is not None:
        try:
            spec = TrainingSpec.model_validate(spec.model_dump() | {"workers": args.workers})
        except ValidationError as err:
            errors = format_validation_error(err).replace("\n", "\n  ")
            raise UsageError(f"invalid --workers {args.workers}:\n  {errors}") from None
    try:  # a warm start's source: checked against the model, pinned to one checkpoint
        return pin(spec, settings), settings
    except InitFromError as err:
        raise UsageError(f"invalid spec {args.spec}:\n  {err}") from None


def cmd_train(args) -> int:
    try:
        spec, settings = train_inputs(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        if args.json:
            print(json.dumps(run_summary("failed", 0, error=str(err))))
        return 2
    out = args.out or Path("runs") / run_dir_name(spec.name)
    summary = run_interruptibly(spec, out, settings)
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


def run_interruptibly(spec: TrainingSpec, out: Path, settings: WorkerSettings) -> RunSummary:
    """Train with a progress bar; the first Ctrl-C stops after the step, the second aborts."""
    from workers.trainer import Trainer

    stop = threading.Event()

    def interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        # Not print(): the signal may land while this thread is inside a write to stderr,
        # and a buffered stream refuses the reentrant call (RuntimeError mid-training).
        with contextlib.suppress(OSError):
            os.write(
                sys.stderr.fileno(), b"\nstopping after this step (Ctrl-C again to abort)...\n"
            )

    previous = signal.signal(signal.SIGINT, interrupt)
    bar = ProgressBar()
    trainer = Trainer(spec, out, callback=bar, stop_event=stop, settings=settings)
    try:
        try:
            return trainer.run()
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
    except Exception as err:  # a bug or an environment problem, not a failure the Trainer reports
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0]
        error = f"unexpected {type(err).__name__}: {first_line} (traceback on stderr)"
        return trainer.failed(error)


if __name__ == "__main__":
    sys.exit(main())
