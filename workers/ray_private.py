"""Every use of a private Ray API, in one place.

Ray changes its private modules between releases without notice. Each function here says
why shardgrad needs it and what happens without it; each degrades to the behaviour Ray
has without it (never an error), so a Ray upgrade that breaks one costs speed or polish,
not a run. Nothing else in workers/ or service/ touches a private Ray name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


def skip_torch_probe() -> None:
    """Tell Ray's compiled-graph loop in this worker that torch is not there.

    Why: our channels carry NumPy arrays only, but when torch is installed Ray's channel
    context imports it on a worker's first compiled step just to pick a device (seconds,
    and hundreds of MB, per worker). There is no public switch; the context caches the
    answer in `ChannelContext._torch_available`.
    Without it: every worker of a compiled graph imports torch, and starts that much slower.
    """
    try:
        from ray.experimental.channel.common import ChannelContext

        ChannelContext.get_current()._torch_available = False
    except Exception:  # noqa: BLE001 - renamed or moved in another Ray: only slower
        log.debug("could not skip Ray's torch probe", exc_info=True)


def dashboard_url() -> str | None:
    """The URL of the connected cluster's Ray dashboard, or None.

    Why: `ray.init()` returns it only to the process that called it, and only as that
    call's result; the service asks later (GET /cluster) and may have attached to a
    cluster it did not start. Ray keeps it in `ray._private.worker.get_dashboard_url`.
    Without it: GET /cluster and the dashboard show no link to Ray's dashboard.
    """
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url()
    except Exception:  # noqa: BLE001 - a missing dashboard must not break /cluster
        log.debug("no Ray dashboard URL", exc_info=True)
        return None


# The logger of Ray's token-auth set-up (ray/_private/authentication), and the start of
# the notice it logs whenever `ray.init()` starts a local cluster with token auth on.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_ON = "Token authentication is enabled for this Ray cluster"


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_ON)


@contextlib.contextmanager
def quiet_token_auth_notice() -> Iterator[None]:
    """Around the `ray.init()` of an embedded Ray: drop Ray's "token authentication is
    enabled ... set RAY_AUTH_MODE=disabled to opt out" notice.

    Why: an embedded Ray lives and dies with the shardgrad process, on a token nobody else
    uses; the notice asks a user of `shardgrad train` to decide about a cluster they never
    started. It comes from a private module's logger, so its name is kept here. Every
    other message of that logger (the warning that auth is *disabled*, errors) still shows.
    Without it: each local run starts with that one warning line on stderr.
    """
    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    notice = _DropTokenAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


@functools.cache
def _gcs_client(address: str):
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def gcs_nodes(address: str, timeout: float = 5.0) -> list[dict]:
    """Every node the GCS at `address` knows, alive or dead: node_id, alive and
    node_manager_port. For deploy/local_cluster.py, which is not a Ray driver.

    Why: `ray.nodes()` and the state API need a driver (ray.init) or the dashboard; the
    cluster script asks a GCS that may be half down, many times, and must not become a
    driver of the cluster it is tearing down. `ray._raylet.GcsClient` asks the GCS directly.
    Without it: `local-cluster.sh status` and `down` cannot tell live nodes from dead ones.
    Raises what the client raises (the caller reports it); a failed client is not kept.
    """
    try:
        infos = _gcs_client(address).get_all_node_info(timeout=timeout)
    except Exception:
        _gcs_client.cache_clear()
        raise
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    return [
        {
            "node_id": node_id.hex(),
            "alive": info.state == GcsNodeInfo.ALIVE,
            "node_manager_port": info.node_manager_port,
        }
        for node_id, info in infos.items()
    ]


# The name under which `ray.init(log_to_driver=True)` registers the handler that prints the
# workers' output on the driver's stdout/stderr, and the name of ours.
RAY_PRINT_HANDLER, JOB_LOGS_HANDLER = "ray_print_logs", "shardgrad_job_logs"


def route_worker_output(handler: Callable[[str, int | str, bool, list[str]], None]) -> bool:
    """Give each batch of the workers' output that Ray ships to this driver to
    `handler(ip, pid, is_err, lines)` instead of printing it; True if Ray ships it here.

    Why: with `log_to_driver=True`, each node's log monitor publishes what the node's
    worker processes write to stdout and stderr, tagged with the worker's node IP and pid,
    and the driver's log thread passes every batch to the handlers of
    `ray._private.ray_logging.global_worker_stdstream_dispatcher`; Ray's own prints them on
    the driver's stdout. There is no public hook: shardgrad puts each job's workers' lines
    in that job's log (workers/worker_output.py) and keeps them off the service's stdout.
    Idempotent; call it after every `ray.init`, which adds Ray's printing handler again.
    Without it: workers' stdout and stderr are in Ray's worker log files only.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as streams

        def dispatch(batch: dict) -> None:
            pid = batch.get("pid")  # a worker's pid as a string; "raylet", "autoscaler" ...
            pid = int(pid) if isinstance(pid, str) and pid.isdigit() else pid
            handler(batch.get("ip"), pid, bool(batch.get("is_err")), batch.get("lines", []))

        streams.remove_handler(RAY_PRINT_HANDLER)
        streams.remove_handler(JOB_LOGS_HANDLER)
        streams.add_handler(JOB_LOGS_HANDLER, dispatch)
        return worker_output_routed()
    except Exception:  # noqa: BLE001 - moved in another Ray: no workers' lines in job logs
        log.debug("could not route the workers' output", exc_info=True)
        return False


def worker_output_routed() -> bool:
    """Whether the workers' output reaches `route_worker_output`'s handler now: it is
    installed and this driver's log thread (started by `log_to_driver=True`) runs.

    Why: a driver that called `ray.init(log_to_driver=False)` gets no output to wait for.
    Without it: a pool waits for lines that never come (workers/worker_output.py).
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as streams
        from ray._private.worker import global_worker

        thread = getattr(global_worker, "logger_thread", None)
        installed = any(name == JOB_LOGS_HANDLER for name, _ in streams.handlers)
        return installed and thread is not None and thread.is_alive()
    except Exception:  # noqa: BLE001
        log.debug("cannot tell whether the workers' output is routed", exc_info=True)
        return False
