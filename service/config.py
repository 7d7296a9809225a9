"""Service settings: environment variables with the SHARDGRAD_ prefix, then `serve` flags."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.config import WorkerSettings
from workers.spec import MAX_DATASET_VALUES

MB = 1024 * 1024
GB = 1024 * MB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHARDGRAD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    access_log: bool = Field(
        False, description="one log line per request (uvicorn's access log; costs ~20% CPU)"
    )
    data_dir: Path = Path("var")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/shardgrad.db"
    )
    datasets_dir: Path | None = Field(None, description="uploads; default <data_dir>/datasets")
    api_token: SecretStr | None = Field(None, description="bearer token every API call needs")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names answered without a token besides loopback ones (comma-separated)",
    )

    ray_address: str | None = Field(None, description="attach to this cluster ($RAY_ADDRESS)")
    ray_num_cpus: int | None = Field(None, description="CPUs of the embedded Ray (default: all)")
    ray_dashboard: bool = False

    max_concurrent_jobs: int = Field(2, ge=0)
    paused: bool = Field(False, description="accept and queue jobs but start none")
    autoscaling: bool = Field(False, description="queue jobs larger than the cluster")
    allow_file_data: bool = Field(False, description="accept data.type=file (server paths)")

    max_json_bytes: int = Field(1 * MB, ge=1)
    max_sweep_trials: int = Field(1000, ge=1, le=10_000, description="trials of one sweep")
    max_attempts: int = Field(
        5,
        ge=1,
        description="a job whose attempts end this many times in a row with the "
        "service's death fails (resume tries again)",
    )
    max_sse_connections: int = Field(100, ge=1, description="open event streams; 503 past it")
    max_upload_bytes: int = Field(100 * MB, ge=1)

    # Admission limits (service/limits.py): a spec or request over one gets a 422 that
    # names the field, the limit and the setting.
    max_model_params: int = Field(20_000_000, ge=1, description="parameters of one model")
    max_job_memory_bytes: int = Field(
        4 * GB,
        ge=1,
        description="a job's memory in the coordinator: parameters, gradients, optimizer "
        "state, its data and an evaluation chunk; also at most the node's memory",
    )
    max_workers: int = Field(64, ge=1, description="worker actors (processes) of one job")
    max_total_steps: int = Field(10_000_000, ge=1, description="epochs x steps per epoch")
    max_keep_checkpoints: int = Field(100, ge=1)
    max_dataset_values: int = Field(
        MAX_DATASET_VALUES,
        ge=1,
        description="values (samples x columns) of a dataset, decompressed",
    )
    max_predict_flops: int = Field(
        10**10, ge=1, description="multiply-adds of one predict request (rows x model)"
    )
    max_explain_flops: int = Field(
        10**11, ge=1, description="multiply-adds of one explain request, at worst"
    )
    predict_cache_bytes: int = Field(
        512 * MB, ge=0, description="models kept in memory for predict, explain and graph"
    )

    instance_id: str | None = Field(None, description="owner name of claimed jobs")
    poll_interval_s: float = Field(0.5, gt=0)
    heartbeat_s: float = Field(2.0, gt=0)
    lease_s: float = Field(20.0, gt=0, description="a running job's owner is dead after this")

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty SHARDGRAD_API_TOKEN= (a template left unfilled) must not mean "no auth".
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("SHARDGRAD_API_TOKEN is empty: set a token or unset the variable")
        return token

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, hosts):
        return (
            [h.strip() for h in hosts.split(",") if h.strip()] if isinstance(hosts, str) else hosts
        )

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'shardgrad.db'}"

    @property
    def uploads_dir(self) -> Path:
        return self.datasets_dir or self.data_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def owner(self) -> str:
        return self.instance_id or f"{socket.gethostname()}:{self.port}"

    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None

    def worker_settings(self) -> WorkerSettings:
        """The training side's settings for this service's jobs and uploads: its datasets
        and jobs directories and cluster; the rest (exchange, pinning, timeouts) from the
        environment. Made anew on each call (about a millisecond), so a changed setting is seen."""
        given = {
            "datasets_dir": self.uploads_dir,
            "jobs_dir": self.jobs_dir,
            "ray_address": self.ray_address,
            "max_workers": self.max_workers,
        }
        return WorkerSettings(**{k: v for k, v in given.items() if v is not None})
