"""Settings of the training side: environment variables with the SHARDGRAD_ prefix.

One `WorkerSettings` is made where a run starts (the `shardgrad train` command, the
service's app) and passed explicitly to what needs it: the Trainer, the datasets and the
exchange. Nothing reads or writes `os.environ` behind another's back, so two apps in one
process (or two tests) keep their own settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)
ExchangeChoice = Literal["auto", "replicated", "compiled", "tasks"]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SHARDGRAD_", extra="ignore", populate_by_name=True
    )

    datasets_dir: Path = Field(Path("var/datasets"), description="where uploads are stored")
    jobs_dir: Path | None = Field(
        None, description="the service's job directories, where `init_from.job` ids point"
    )
    exchange: ExchangeChoice = Field(
        "auto", description="the step exchange while a spec says auto ($SHARDGRAD_EXCHANGE)"
    )
    replicated_stages: int = Field(
        16,
        ge=1,
        le=256,
        description="the most steps one execution of the replicated graph runs "
        "($SHARDGRAD_REPLICATED_STAGES)",
    )
    pin_workers: bool = Field(
        True, description="pin compiled-graph workers to free cores ($SHARDGRAD_PIN_WORKERS)"
    )
    head_start: bool = Field(
        True,
        description="a run on workers steps on the coordinator, as its workers would, while "
        "they start ($SHARDGRAD_HEAD_START; workers/headstart.py)",
    )
    reuse_freed_memory: bool = Field(
        True,
        description="the processes that compute steps keep freed memory for the next step "
        "instead of faulting it back in ($SHARDGRAD_REUSE_FREED_MEMORY; workers/malloc.py)",
    )
    placement_timeout_s: float = Field(
        60.0,
        gt=0,
        description="how long a job's workers may take to be placed and start before the job "
        "fails as too big for the cluster ($SHARDGRAD_PLACEMENT_TIMEOUT_S)",
    )
    step_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a compiled step with every worker alive that answers within neither this "
        "nor 50x the slowest step so far falls back to tasks ($SHARDGRAD_STEP_TIMEOUT_S)",
    )
    # What `workers: "auto"` expects an exchange to cost per step (workers/choose.py): a
    # constant per exchange kind, plus the bytes that cross (the parameters out, every
    # worker's gradient sum back) over a bandwidth. Measured on 2 cores (issue 13).
    auto_replicated_step_s: float = Field(
        2e-4,
        ge=0,
        description="a replicated step's fixed cost ($SHARDGRAD_AUTO_REPLICATED_STEP_S)",
    )
    auto_compiled_step_s: float = Field(
        1e-3, ge=0, description="a compiled step's fixed cost ($SHARDGRAD_AUTO_COMPILED_STEP_S)"
    )
    auto_tasks_step_s: float = Field(
        3e-3, ge=0, description="a tasks step's fixed cost ($SHARDGRAD_AUTO_TASKS_STEP_S)"
    )
    auto_bytes_per_s: float = Field(
        2e9, gt=0, description="the exchange's bandwidth ($SHARDGRAD_AUTO_BYTES_PER_S)"
    )
    max_workers: int = Field(
        64,
        ge=1,
        description="the most workers `workers: auto` may choose ($SHARDGRAD_MAX_WORKERS, the "
        "service's admission limit for a stated count)",
    )
    log_max_bytes: int = Field(
        5 * 1024 * 1024,
        ge=1024,
        description="a job's log (logs/job.log under its directory) is rotated past this "
        "size ($SHARDGRAD_LOG_MAX_BYTES)",
    )
    log_backups: int = Field(
        3,
        ge=0,
        description="rotated files of a job's log kept: job.log.1 ... job.log.N "
        "($SHARDGRAD_LOG_BACKUPS)",
    )
    ray_address: str | None = Field(
        None, validation_alias="RAY_ADDRESS", description="the cluster to attach to"
    )

    @field_validator("exchange", mode="before")
    @classmethod
    def _unknown_exchange_means_auto(cls, value):
        """A typo in $SHARDGRAD_EXCHANGE must not stop every run: warned about, then auto."""
        if value not in get_args(ExchangeChoice):
            choices = ", ".join(get_args(ExchangeChoice))
            log.warning("SHARDGRAD_EXCHANGE=%r is not one of %s; using auto", value, choices)
            return "auto"
        return value
