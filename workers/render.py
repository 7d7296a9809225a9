"""What the `shardgrad` commands print: JSON documents, tables, the job view, attributions,
the training summary, and the one progress bar that `train` and `submit --follow` share.

Everything here takes plain dicts (a Trainer event, the service's job JSON) and writes text;
nothing here parses arguments or talks HTTP.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

from tqdm import tqdm

from workers.events import Event, RunSummary
from workers.health import new_warnings


def print_json(doc) -> None:
    """`doc` as one JSON document on stdout (what `--json` prints)."""
    print(json.dumps(doc, indent=2))


def number(v: float | None, spec: str = ".6g") -> str:
    return "nan" if v is None else format(v, spec)


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows of cells (the first is the header) in left-aligned columns, no trailing spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


# -- progress ----------------------------------------------------------------------------------


class ProgressBar:
    """A tqdm bar of steps on stderr, drawn when `enabled` (by default: when stderr is a
    terminal). Lines written through it (warnings, status changes) appear above the bar, or
    on stderr while there is no bar. Fed by a Trainer (`bar(event)`, its callback) or by a
    job's event stream (`bar.job_event(kind, data)`)."""

    def __init__(self, enabled: bool | None = None):
        self.bar = None
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def start(self, total: int, step: int = 0, status: str | None = None) -> None:
        if self.enabled and self.bar is None:
            self.bar = tqdm(total=total, initial=step, unit="step", desc=status)

    def advance(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def status(self, line: str, status: str) -> None:
        """A new status: the bar's label, or `line` while there is no bar."""
        if self.bar is None:
            self.write(line)
        else:
            self.bar.set_description(status)

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line, file=sys.stderr)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: Event) -> None:
        """A Trainer event (its `callback`); health warnings are written once each, even
        without a bar."""
        kind = event["type"]
        if kind == "health":
            for w in new_warnings(event):
                self.write(f"warning: {w['kind']} at step {w['first_step']}: {w['message']}")
        elif kind == "started":
            self.start(event["total_steps"], event["step"])
        elif kind == "step":
            postfix = {"epoch": event["epoch"], "loss": f"{event['train_loss']:.4f}"}
            if event.get("samples_per_s"):
                postfix["samples/s"] = f"{event['samples_per_s']:.0f}"
            if event.get("val_accuracy") is not None:
                postfix["val_acc"] = f"{event['val_accuracy']:.3f}"
            self.advance(event["step"], postfix)
        elif kind == "worker_failure" and self.bar is not None:
            self.write(f"worker failure: {event['reason']}; recomputing the step")
        elif kind == "workers_joined" and self.bar is not None:
            self.write(f"{event['exchange']} workers took over at step {event['step']}")

    def job_event(self, kind: str, data: dict) -> None:
        """An event of a job's stream (GET /jobs/{id}/events)."""
        if kind == "status":
            self.status(f"{data['id']}: {data['status']}", data["status"])
        elif kind == "progress" and data["progress"]["total_steps"]:
            p = data["progress"]
            self.start(p["total_steps"], status=data["status"])
            postfix = {"epoch": p["epoch"]}
            loss = data["metrics"].get("train_loss")
            if loss is not None:
                postfix["loss"] = f"{loss:.4g}"
            self.advance(p["step"], postfix)


# -- the training summary (`shardgrad train`) -------------------------------------------------


def print_summary(summary: RunSummary) -> None:
    """The summary for people: one aligned line per key, '-' for what is unknown."""
    if summary["status"] != "succeeded":
        print(f"failed: {summary.get('error')}")
    for key, value in summary.items():
        if key not in ("status", "error"):
            print(f"{key:>18}: {summary_value(key, value)}")


def summary_value(key: str, value) -> str:
    """One value of a run summary as text: no Python reprs."""
    if value is None or value == []:
        return "-"
    if isinstance(value, bool):  # stopped_early
        return "yes" if value else "no"
    if key == "health":
        warned = ", ".join(f"{w['kind']} {w['layer']}" for w in value["warnings"]) or "none"
        return f"{value['checked_steps']} checks; warnings: {warned}"
    if key == "worker_nodes":  # Ray's node ids are 56 hex digits; 8 tell them apart
        return ", ".join(node[:8] for node in value)
    if key == "elapsed_s":
        return f"{value:.1f} s"
    if isinstance(value, float):
        return number(value, ".4g")
    return str(value)


# -- the service's jobs -------------------------------------------------------------------------


def print_submitted(job: dict) -> None:
    print(f"submitted {job['id']} ({job['name']}): {job['status']}")
    if job.get("pending_reason"):
        print(f"  {job['pending_reason']}")


def print_jobs(page: dict, limit: int) -> None:
    """A page of GET /jobs as a table, and how to see more."""
    rows = [("ID", "NAME", "STATUS", "PROGRESS", "LOSS", "ATTEMPTS", "CREATED")]
    for j in page["items"]:
        p = j["progress"]
        progress = f"{p['step']}/{p['total_steps']}" if p["total_steps"] else "-"
        if j["status"] == "queued":
            progress = f"#{j['queue_position']} in queue"
        loss = j["metrics"].get("train_loss")
        created = j["created_at"][:19].replace("T", " ")
        loss = f"{loss:.4g}" if loss is not None else "-"
        attempts = str(j["attempts"])
        rows.append((j["id"], j["name"][:24], j["status"], progress, loss, attempts, created))
    print_table(rows)
    if page["next_cursor"]:
        print(f"(more: --limit {limit * 2})")


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


def print_job_status(job: dict) -> None:
    print(f"{job['id']}: {job['status']}")


def print_outputs(result: dict) -> None:
    """POST /jobs/{id}/predict's outputs, one comma-separated row per input."""
    for row in result["outputs"]:
        print(",".join(number(v) for v in row))


# -- attributions (`shardgrad explain`) ----------------------------------------------------------


def print_attributions(job_id: str, result: dict, predicted: bool) -> None:
    """Per row: its outputs and the one explained, then a bar per feature, scaled to the
    largest attribution of all rows, with the signed value (an image's: a shaded grid per
    channel); integrated gradients' gap."""
    print(f"{job_id}: {result['method']} from checkpoint {result['checkpoint']}")
    rows = result["attributions"]
    flat = [a for a in _leaves(rows) if a is not None]
    scale = max(map(abs, flat), default=0.0)
    gaps = result["completeness_gap"] or [None] * len(rows)
    rows_of = zip(result["outputs"], rows, result["targets"], gaps, strict=True)
    for i, (outputs, row, explained, gap) in enumerate(rows_of):
        why = " (predicted)" if predicted and len(outputs) > 1 else ""
        values = ", ".join(number(v) for v in outputs)
        head = f"row {i}  outputs [{values}]  target {explained}{why}"
        print(f"{head} = {number(outputs[explained])}")
        if row and isinstance(row[0], list):
            print_image(row, scale)
        for k, a in enumerate(row if row and not isinstance(row[0], list) else []):
            chart = bar(abs(a) / scale) if a is not None and scale else ""
            print(f"  x{k:<3} {number(a, '+.4g'):>10}  {chart}")
        if gap is not None:
            print(f"  completeness gap {number(gap, '+.3g')}")


def _leaves(nested):
    for item in nested:
        if isinstance(item, list):
            yield from _leaves(item)
        else:
            yield item


# An image's cell by the size of its attribution (a quarter of the largest per step).
POSITIVE = ("  ", "░░", "▒▒", "▓▓", "██")
NEGATIVE = ("  ", "--", "==", "≡≡", "##")


def print_image(image: list, scale: float) -> None:
    """A C x H x W image's attributions, a grid of cells per channel: ░▒▓█ positive,
    -=≡# negative, by size relative to `scale`; blank for zero (or none)."""
    print(f"  {''.join(POSITIVE[1:])} positive, {''.join(NEGATIVE[1:])} negative, by size")
    for c, channel in enumerate(image):
        print(f"  channel {c}")
        for line in channel:
            cells = (_cell(a, scale) for a in line)
            print("  |" + "".join(cells) + "|")


def _cell(a: float | None, scale: float) -> str:
    if a is None or not scale:
        return "  "
    level = min(4, math.ceil(4 * abs(a) / scale))
    return (NEGATIVE if a < 0 else POSITIVE)[level]


EIGHTHS = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")  # a bar's last, partial cell


def bar(fraction: float, width: int = 30) -> str:
    """`fraction` (0 to 1) of `width` cells in unicode blocks, to an eighth of a cell."""
    full, part = divmod(round(fraction * width * 8), 8)
    return "█" * full + EIGHTHS[part]
