"""A real multi-node Ray cluster on one host: `up N`, `down`, `status`, `env`.

Run it through `deploy/local-cluster.sh`, which picks the Python that belongs to
`$RAY_BIN` (default `.venv/bin/ray`). See that script's header for usage.

How it works
------------
* `up N` runs `ray start --head` once and `ray start --address` N-1 times. Every
  node gets its own CPU share, its own ports (scanned free, recorded in the
  state file), random worker ports, and its own `--temp-dir` (so nodes never
  race for socket names in a shared session directory and every node keeps its
  own logs, like separate hosts would).
* Token authentication stays on: every node runs with `RAY_AUTH_MODE=token` and
  `RAY_AUTH_TOKEN_PATH=<state dir>/auth_token`, one token for the cluster.
* Every process `ray start` spawns inherits `SHARDGRAD_LOCAL_CLUSTER=<id>`.
  `up` records those processes (pid + create time, so a recycled pid is
  never mistaken for ours); `down` signals exactly them and their descendants,
  plus Ray worker processes that still hold files in this cluster's temp dir.
  It never runs a global `ray stop`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workers.ray_private import gcs_nodes  # noqa: E402 - the repo's own module, by path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".ray-local-cluster"
DEFAULT_GCS_PORT = 6380
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
MARKER = "SHARDGRAD_LOCAL_CLUSTER"
MARKER_NODE = "SHARDGRAD_LOCAL_CLUSTER_NODE"
# One lock for every `up` on this host: port scanning and binding must not race.
LOCK_PATH = Path("/tmp/shardgrad-local-cluster.lock")
HEAD_PORTS = ("gcs", "client_server", "dashboard")
NODE_PORTS = (
    "node_manager",
    "object_manager",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "runtime_env_agent",
    "metrics_export",
)
# Unix socket paths are limited to 107 bytes; Ray puts
# <temp>/<node>/session_<date>_<pid>/sockets/plasma_store.N under the temp dir.
MAX_TEMP_DIR_LEN = 40


class ClusterError(RuntimeError):
    """A failure with a message meant for the user."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- state


def resolve_state_dir(arg: str | None) -> Path:
    raw = arg or os.environ.get("SHARDGRAD_CLUSTER_DIR") or str(DEFAULT_STATE_DIR)
    return Path(raw).expanduser().resolve()


def load_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def save_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_dir / STATE_FILE)


def prepare_state_dir(state_dir: Path) -> None:
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
    # Never show up in `git status`, wherever the state dir lives.
    ignore = state_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")


def ensure_token(state_dir: Path) -> tuple[Path, str]:
    """One token for every node and driver: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
    the token left in the state dir by an earlier `up`, or a new random one."""
    path = state_dir / TOKEN_FILE
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    source = "$RAY_AUTH_TOKEN"
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and env_path and Path(env_path).expanduser().resolve() != path:
        try:
            token = Path(env_path).expanduser().read_text().strip()
        except OSError as err:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={env_path} is not readable: {err}") from err
        source = env_path
    if not token and path.exists():
        token = path.read_text().strip()
        source = "existing state-dir token"
    if not token:
        token = secrets.token_hex(32)
        source = "generated"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    os.chmod(path, 0o600)
    return path, source


def driver_env_lines(state: dict) -> list[str]:
    return [
        f"RAY_ADDRESS={state['ray_address']}",
        "RAY_AUTH_MODE=token",
        f"RAY_AUTH_TOKEN_PATH={state['token_path']}",
    ]


# --------------------------------------------------------------------------- ports


def port_is_free(port: int) -> bool:
    """True if nothing listens on `port` on any interface (IPv4 or IPv6)."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        with sock:
            try:
                sock.bind((host, port))
            except OSError as err:
                if family == socket.AF_INET6 and err.errno == errno.EADDRNOTAVAIL:
                    continue
                return False
    return True


def allocate_ports(num_nodes: int, gcs_port: int | None) -> tuple[dict, list[dict]]:
    """Head ports and one block of ports per node, all free right now."""
    if gcs_port is not None:
        if not port_is_free(gcs_port):
            raise ClusterError(f"port {gcs_port} is in use; pick another with --port")
        start = gcs_port
    else:
        start = DEFAULT_GCS_PORT
    wanted = len(HEAD_PORTS) + num_nodes * len(NODE_PORTS)
    found: list[int] = []
    port = start
    while len(found) < wanted:
        if port > 65535:
            raise ClusterError(f"could not find {wanted} free ports from {start} upwards")
        if port_is_free(port):
            found.append(port)
        port += 1
    head = dict(zip(HEAD_PORTS, found[: len(HEAD_PORTS)], strict=True))
    rest = found[len(HEAD_PORTS) :]
    k = len(NODE_PORTS)
    nodes = [
        dict(zip(NODE_PORTS, rest[i * k : (i + 1) * k], strict=True)) for i in range(num_nodes)
    ]
    return head, nodes


# --------------------------------------------------------------------------- processes


# A process is known by its pid and create time, so a recycled pid is never mistaken for
# ours. psutil's create time is the boot time plus the kernel's start ticks, and the boot
# time it reads may move by a second when the clock is adjusted: hence the tolerance.
SAME_START_S = 1.0
GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
ATTRS = ["ppid", "create_time", "status", "name"]


def process_table() -> dict[int, dict]:
    """pid -> {ppid, create_time, status, name} of every process."""
    return {p.pid: p.info for p in psutil.process_iter(ATTRS) if p.info["ppid"] is not None}


def same_start(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < SAME_START_S


def is_running(pid: int, start_time: float | None = None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() in GONE:
            return False
        return start_time is None or same_start(proc.create_time(), start_time)
    except psutil.Error:
        return False


def proc_name(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).name()
    return ""


def own_lineage() -> set[int]:
    """This process and its ancestors: never signalled."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def marked_pids(table: dict, cluster_id: str, node: int | None = None) -> set[int]:
    found = set()
    for pid in table:
        with contextlib.suppress(psutil.Error):
            env = psutil.Process(pid).environ()
            ours = env.get(MARKER) == cluster_id
            if ours and (node is None or env.get(MARKER_NODE) == str(node)):
                found.add(pid)
    return found


def is_orphaned_worker(pid: int, temp_dir: str) -> bool:
    """A Ray worker (`ray::...`) that holds files open under this cluster's temp dir."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if " ".join(proc.cmdline()).startswith("ray::"):
            return any(f.path.startswith(temp_dir + "/") for f in proc.open_files())
    return False


def with_descendants(table: dict, roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info["ppid"], []).append(pid)
    result, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in result or pid not in table:
            continue
        result.add(pid)
        todo.extend(children.get(pid, ()))
    return result


def cluster_processes(state: dict) -> dict[int, float]:
    """pid -> create time of every live process that belongs to this cluster."""
    table = process_table()
    roots = {
        rec["pid"]
        for rec in state.get("processes", [])
        if rec["pid"] in table and same_start(table[rec["pid"]]["create_time"], rec["start_time"])
    }
    roots |= marked_pids(table, state["cluster_id"])
    # Ray workers rename themselves (`ray::...`), which clobbers their environment;
    # orphans of a killed raylet are recognised by the log files they hold open.
    temp_dir = state["temp_dir"]
    roots |= {pid for pid in table if pid not in roots and is_orphaned_worker(pid, temp_dir)}
    pids = with_descendants(table, roots) - own_lineage()
    return {pid: table[pid]["create_time"] for pid in pids if table[pid]["status"] not in GONE}


def snapshot(state: dict) -> list[dict]:
    return [
        {"pid": pid, "start_time": start, "comm": proc_name(pid)}
        for pid, start in sorted(cluster_processes(state).items())
    ]


def terminate(procs: dict[int, float], grace: float) -> dict[int, float]:
    """Stop `procs` in `ray stop`'s order: raylets, then everything else, then the GCS.

    Each group gets SIGTERM, up to `grace` seconds, then SIGKILL. Returns survivors."""

    def alive(group: dict[int, float]) -> dict[int, float]:
        return {pid: st for pid, st in group.items() if is_running(pid, st)}

    def phase(pid: int) -> int:
        comm = proc_name(pid)
        return 0 if comm == "raylet" else 2 if comm == "gcs_server" else 1

    groups: list[dict[int, float]] = [{}, {}, {}]
    for pid, start in procs.items():
        groups[phase(pid)][pid] = start
    for group in groups:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in alive(group):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not alive(group):
                break
    return alive(procs)


# --------------------------------------------------------------------------- GCS


def gcs_reachable(address: str, timeout: float = 1.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def query_nodes(address: str, timeout: float = 5.0) -> list[dict] | None:
    """Every node the GCS knows (alive and dead), or None if the GCS is unreachable.

    Needs RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH in os.environ before the first call."""
    if not gcs_reachable(address):
        return None
    try:
        return gcs_nodes(address, timeout)
    except Exception as err:  # report, never crash `status`
        log(f"warning: GCS query failed: {err}")
        return None


def use_cluster_auth(token_path: Path | str) -> None:
    """Make this process (and the GCS client it creates) use the cluster's token."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    # Fail fast instead of Ray's default 30+ s when the GCS is down.
    os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "5")


# --------------------------------------------------------------------------- up


def resolve_ray_bin() -> str:
    ray_bin = os.environ.get("RAY_BIN") or str(REPO_ROOT / ".venv" / "bin" / "ray")
    if not (os.path.isfile(ray_bin) and os.access(ray_bin, os.X_OK)):
        raise ClusterError(
            f"ray executable not found at {ray_bin} (create the venv with `make test` "
            "or point RAY_BIN at one)"
        )
    return ray_bin


def cpu_shares(num_nodes: int, cpus_per_node: int | None) -> list[int]:
    if cpus_per_node is not None:
        return [cpus_per_node] * num_nodes
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base, extra = divmod(total or 1, num_nodes)
    return [max(1, base + (1 if i < extra else 0)) for i in range(num_nodes)]


def node_command(state: dict, node: dict, gcs_address: str | None) -> list[str]:
    ports, head_ports = node["ports"], state["head_ports"]
    cmd = [state["ray_bin"], "start"]
    if node["index"] == 0:
        cmd += [
            "--head",
            f"--port={head_ports['gcs']}",
            f"--ray-client-server-port={head_ports['client_server']}",
            "--include-dashboard=false",
            f"--dashboard-port={head_ports['dashboard']}",
        ]
    else:
        cmd += [f"--address={gcs_address}"]
    cmd += [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={node['num_cpus']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--metrics-export-port={ports['metrics_export']}",
        # 0/0 = every worker process binds a kernel-chosen free port, so raylets
        # sharing this host never hand out the same worker port.
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--object-store-memory={state['object_store_bytes']}",
        f"--temp-dir={node['temp_dir']}",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
    ]
    return cmd


def node_environment(state: dict, index: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": state["token_path"],
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: state["cluster_id"],
            MARKER_NODE: str(index),
        }
    )
    return env


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_nodes(state: dict, state_dir: Path, deadline: float) -> None:
    """Head first (its address is needed), then all worker nodes in parallel."""
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)

    def launch(node: dict, gcs_address: str | None) -> tuple[subprocess.Popen, Path]:
        index = node["index"]
        cmd = node_command(state, node, gcs_address)
        log_path = logs / f"ray-start-node{index}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=node_environment(state, index),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT),
            )
        return proc, log_path

    def finish(node: dict, proc: subprocess.Popen, log_path: Path) -> None:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as err:
            proc.kill()
            proc.wait()
            raise ClusterError(
                f"`ray start` for node {node['index']} did not finish in time; "
                f"log {log_path}:\n{log_tail(log_path)}"
            ) from err
        if code != 0:
            raise ClusterError(
                f"`ray start` for node {node['index']} failed (exit {code}); "
                f"log {log_path}:\n{log_tail(log_path)}"
            )

    head = state["nodes"][0]
    proc, log_path = launch(head, None)
    finish(head, proc, log_path)
    address_file = Path(head["temp_dir"]) / "ray_current_cluster"
    try:
        gcs_address = address_file.read_text().strip()
    except OSError as err:
        raise ClusterError(f"head started but {address_file} is missing") from err
    state["ray_address"] = gcs_address
    log(f"head node up at {gcs_address}")

    started = [(node, *launch(node, gcs_address)) for node in state["nodes"][1:]]
    for node, proc, log_path in started:
        finish(node, proc, log_path)


def wait_for_nodes(state: dict, deadline: float) -> list[dict]:
    expected = {node["ports"]["node_manager"] for node in state["nodes"]}
    last: list[dict] | None = None
    while True:
        nodes = query_nodes(state["ray_address"])
        if nodes is not None:
            last = nodes
            alive = {n["node_manager_port"] for n in nodes if n["alive"]}
            if expected <= alive:
                return nodes
        if time.monotonic() > deadline:
            seen = 0 if last is None else sum(n["alive"] for n in last)
            raise ClusterError(
                f"timed out waiting for {len(expected)} alive nodes "
                f"({seen} alive at {state['ray_address']}); see {state['state_dir']}/logs "
                f"and {state['temp_dir']}/node*/session_latest/logs"
            )
        time.sleep(0.5)


def raylet_pid(state: dict, index: int) -> tuple[int, float] | None:
    table = process_table()
    for pid in marked_pids(table, state["cluster_id"], index):
        if table[pid]["name"] == "raylet":
            return pid, table[pid]["create_time"]
    return None


def cmd_up(args) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    if args.nodes < 1:
        raise ClusterError("N must be at least 1")
    if args.cpus_per_node is not None and args.cpus_per_node < 1:
        raise ClusterError("--cpus-per-node must be a whole number >= 1 (ray start needs integers)")
    ray_bin = resolve_ray_bin()
    prepare_state_dir(state_dir)

    LOCK_PATH.touch(exist_ok=True)
    with open(LOCK_PATH) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = load_state(state_dir)
        if old is not None:
            if cluster_processes(old):
                raise ClusterError(
                    f"a local cluster is already running from {state_dir} "
                    f"(RAY_ADDRESS={old.get('ray_address')}); run `down` first"
                )
            teardown(state_dir, old, keep_logs=False, quiet=True)

        token_path, token_source = ensure_token(state_dir)
        use_cluster_auth(token_path)
        cluster_id = secrets.token_hex(4)
        tmp_root = os.environ.get("SHARDGRAD_CLUSTER_TMP", "/tmp")
        temp_dir = os.path.join(tmp_root, f"sgray-{cluster_id}")
        if len(temp_dir) > MAX_TEMP_DIR_LEN:
            raise ClusterError(
                f"temp dir {temp_dir} is too long for Ray's unix sockets; "
                "set SHARDGRAD_CLUSTER_TMP to a short path"
            )
        head_ports, node_ports = allocate_ports(args.nodes, args.port)
        shares = cpu_shares(args.nodes, args.cpus_per_node)
        state = {
            "cluster_id": cluster_id,
            "state_dir": str(state_dir),
            "created": time.time(),
            "ray_bin": ray_bin,
            "ray_address": None,
            "token_path": str(token_path),
            "temp_dir": temp_dir,
            "object_store_bytes": args.object_store_mb * 1024 * 1024,
            "head_ports": head_ports,
            "nodes": [
                {
                    "index": i,
                    "role": "head" if i == 0 else "worker",
                    "num_cpus": shares[i],
                    "ports": node_ports[i],
                    "temp_dir": os.path.join(temp_dir, f"node{i}"),
                }
                for i in range(args.nodes)
            ],
            "processes": [],
        }
        # Saved before anything starts, so `down` can clean up a half-finished `up`.
        save_state(state_dir, state)
        log(
            f"starting {args.nodes} Ray node(s) (CPUs per node: {shares}, token: {token_source}, "
            f"temp dir: {temp_dir})"
        )
        begin = time.monotonic()
        deadline = begin + args.timeout
        try:
            start_nodes(state, state_dir, deadline)
            save_state(state_dir, state)
            infos = wait_for_nodes(state, deadline)
        except BaseException:
            state["processes"] = snapshot(state)
            save_state(state_dir, state)
            log(f"start-up failed; stopping what was started (Ray logs kept in {temp_dir})")
            teardown(state_dir, state, keep_logs=True, quiet=True)
            raise

    by_port = {info["node_manager_port"]: info for info in infos if info["alive"]}
    for node in state["nodes"]:
        node["node_id"] = by_port[node["ports"]["node_manager"]]["node_id"]
        found = raylet_pid(state, node["index"])
        node["raylet_pid"], node["raylet_start_time"] = found if found else (None, None)
    state["processes"] = snapshot(state)
    save_state(state_dir, state)
    log(f"{args.nodes} node(s) alive after {time.monotonic() - begin:.1f}s")
    for line in driver_env_lines(state):
        print(line)
    print(f"SHARDGRAD_CLUSTER_DIR={state_dir}")
    log(
        f'drivers: eval "$({Path(__file__).parent / "local-cluster.sh"} env)" '
        "then `shardgrad train ...` or `shardgrad serve ...`"
    )
    return 0


# --------------------------------------------------------------------------- down


def teardown(state_dir: Path, state: dict, *, keep_logs: bool, quiet: bool = False) -> bool:
    """Stop every process of this cluster; remove its state. True if nothing survived."""
    procs = cluster_processes(state)
    if not quiet:
        log(f"stopping {len(procs)} process(es) of cluster {state['cluster_id']}")
    survivors = terminate(procs, grace=10.0)
    # Workers of a node whose raylet was already gone exit on their own; catch stragglers.
    stragglers = cluster_processes(state)
    if stragglers:
        survivors.update(terminate(stragglers, grace=5.0))
    if survivors:
        log(f"error: still running after SIGKILL: {sorted(survivors)}")
        return False
    temp_dir = state.get("temp_dir")
    if temp_dir and not keep_logs:
        shutil.rmtree(temp_dir, ignore_errors=True)
    elif temp_dir and not quiet:
        log(f"Ray logs kept in {temp_dir}")
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    if not keep_logs:
        shutil.rmtree(state_dir / "logs", ignore_errors=True)
    return True


def cmd_down(args) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    state = load_state(state_dir)
    if state is None:
        log(f"no local cluster recorded in {state_dir}; nothing to stop")
        return 0
    ok = teardown(state_dir, state, keep_logs=args.keep_logs)
    if ok and args.purge:
        for name in (TOKEN_FILE, ".gitignore"):
            with contextlib.suppress(FileNotFoundError):
                (state_dir / name).unlink()
        with contextlib.suppress(OSError):
            state_dir.rmdir()
    if ok:
        log("local cluster stopped")
    return 0 if ok else 1


# --------------------------------------------------------------------------- status


def cluster_status(state: dict) -> dict:
    use_cluster_auth(state["token_path"])
    infos = query_nodes(state["ray_address"]) if state.get("ray_address") else None
    by_port: dict[int, dict] = {}
    for info in infos or []:
        # A restarted raylet on the same port registers a new node id; prefer the alive one.
        current = by_port.get(info["node_manager_port"])
        if current is None or info["alive"]:
            by_port[info["node_manager_port"]] = info
    nodes = []
    for node in state["nodes"]:
        info = by_port.get(node["ports"]["node_manager"])
        pid = node.get("raylet_pid")
        running = bool(pid) and is_running(pid, node.get("raylet_start_time"))
        gcs_state = "UNKNOWN" if infos is None else ("ALIVE" if info and info["alive"] else "DEAD")
        nodes.append(
            {
                "index": node["index"],
                "role": node["role"],
                "num_cpus": node["num_cpus"],
                "node_id": info["node_id"] if info else node.get("node_id"),
                "raylet_pid": pid,
                "raylet_running": running,
                "state": gcs_state,
                "ports": node["ports"],
            }
        )
    return {
        "cluster_id": state["cluster_id"],
        "ray_address": state.get("ray_address"),
        "token_path": state["token_path"],
        "state_dir": state["state_dir"],
        "gcs_reachable": infos is not None,
        "alive": sum(n["state"] == "ALIVE" for n in nodes),
        "nodes": nodes,
    }


def cmd_status(args) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    state = load_state(state_dir)
    if state is None:
        if args.json:
            print(json.dumps({"state_dir": str(state_dir), "running": False, "nodes": []}))
        else:
            print(f"no local cluster recorded in {state_dir}")
        return 3
    status = cluster_status(state)
    status["running"] = True
    if args.json:
        print(json.dumps(status))
    else:
        print(f"RAY_ADDRESS={status['ray_address']}")
        print(
            f"cluster {status['cluster_id']}: {status['alive']}/{len(status['nodes'])} nodes alive"
            + ("" if status["gcs_reachable"] else " (GCS unreachable)")
        )
        print(
            f"{'node':<5} {'role':<7} {'cpus':>4} {'raylet':>8} {'process':<8} {'gcs':<7} node_id"
        )
        for n in status["nodes"]:
            print(
                f"{n['index']:<5} {n['role']:<7} {n['num_cpus']:>4} {n['raylet_pid'] or '-':>8} "
                f"{'running' if n['raylet_running'] else 'gone':<8} {n['state']:<7} "
                f"{n['node_id'] or '-'}"
            )
    return 0 if status["alive"] == len(status["nodes"]) else 1


def cmd_env(args) -> int:
    state = load_state(resolve_state_dir(args.state_dir))
    if state is None or not state.get("ray_address"):
        log("no local cluster is up; run `deploy/local-cluster.sh up N` first")
        return 3
    for line in driver_env_lines(state):
        print(f"export {line}")
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local-cluster.sh", description="A real multi-node Ray cluster on this host."
    )
    parser.add_argument(
        "--state-dir",
        help="where state, token and logs live (default $SHARDGRAD_CLUSTER_DIR "
        "or <repo>/.ray-local-cluster)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a head and N-1 worker nodes; wait until all are alive")
    up.add_argument("nodes", type=int, help="number of Ray nodes, head included")
    up.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: nproc split)")
    up.add_argument(
        "--port", type=int, help=f"GCS port (default: first free from {DEFAULT_GCS_PORT})"
    )
    up.add_argument("--object-store-mb", type=int, default=200, help="object store per node (MiB)")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for all nodes")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop every process this cluster started")
    down.add_argument("--keep-logs", action="store_true", help="keep Ray's temp dir (logs)")
    down.add_argument("--purge", action="store_true", help="also delete the token and state dir")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="nodes and their state (exit 0 = all alive)")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_status)

    env = sub.add_parser("env", help="print `export` lines for drivers")
    env.set_defaults(func=cmd_env)

    # Accept --state-dir after the subcommand too.
    for p in (up, down, status, env):
        p.add_argument("--state-dir", dest="state_dir_sub", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.state_dir = getattr(args, "state_dir_sub", None) or args.state_dir
    try:
        return args.func(args)
    except ClusterError as err:
        log(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
