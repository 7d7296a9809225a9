#!/usr/bin/env bash
# deploy/local-cluster.sh — a real multi-node Ray cluster on this host.
#
#   deploy/local-cluster.sh up N [--cpus-per-node K] [--port P] [--object-store-mb M] [--timeout S]
#   deploy/local-cluster.sh status [--json]       # exit 0 = all nodes alive, 1 = some dead, 3 = none
#   deploy/local-cluster.sh env                   # `export` lines for drivers (eval them)
#   deploy/local-cluster.sh down [--keep-logs] [--purge]
#
# `up N` starts one head (`ray start --head`) and N-1 worker nodes
# (`ray start --address`), each with --node-ip-address 127.0.0.1 (Ray maps it to
# this host's reachable IP), its own --num-cpus share (nproc split across the
# nodes, at least 1 each; --cpus-per-node overrides), its own free ports and
# its own --temp-dir. It waits until all N nodes are alive in the GCS, then
# prints, one per line on stdout:
#
#   RAY_ADDRESS=<ip>:<port>
#   RAY_AUTH_MODE=token
#   RAY_AUTH_TOKEN_PATH=<state dir>/auth_token
#   SHARDGRAD_CLUSTER_DIR=<state dir>
#
# What a driver needs (shardgrad train/serve, a notebook, `ray status`):
#
#   export RAY_ADDRESS=<ip>:<port> RAY_AUTH_MODE=token
#   export RAY_AUTH_TOKEN_PATH=<state dir>/auth_token   # or RAY_AUTH_TOKEN=<the token>
#   # or simply:  eval "$(deploy/local-cluster.sh env)"
#   shardgrad train examples/moons.json --workers 3      # or --ray-address <ip>:<port>
#   shardgrad serve --ray-address <ip>:<port>
#
# Token auth is always on: all nodes and drivers share one token. It is taken
# from $RAY_AUTH_TOKEN, else the file at $RAY_AUTH_TOKEN_PATH, else the token
# an earlier `up` left in the state dir, else a new random one (mode 0600).
# Without RAY_AUTH_MODE=token *and* the token a driver cannot connect.
#
# `down` stops exactly the processes this cluster started (recorded pids plus
# processes that inherited SHARDGRAD_LOCAL_CLUSTER=<id>), never a global
# `ray stop`, and removes Ray's temp dir (--keep-logs keeps it). The token
# stays for the next `up` unless --purge.
#
# Environment:
#   RAY_BIN                ray executable (default <repo>/.venv/bin/ray, else `ray` on PATH;
#                          VENV=<dir> picks <dir>/bin/ray)
#   SHARDGRAD_CLUSTER_DIR  state dir (default <repo>/.ray-local-cluster; --state-dir overrides)
#   SHARDGRAD_CLUSTER_TMP  parent of Ray's per-cluster temp dir (default /tmp; keep it short)
#   Any RAY_* setting (e.g. RAY_health_check_period_ms) is passed on to every node.
#
# The script itself is a thin wrapper: the logic lives in deploy/local_cluster.py
# and runs on the Python interpreter that owns $RAY_BIN.
set -euo pipefail

deploy_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(dirname "$deploy_dir")
# RAY_BIN if set; else $VENV/bin/ray if VENV is set; else the repo's .venv; else `ray` on PATH.
if [[ -z ${RAY_BIN:-} ]]; then
    venv=${VENV:-$repo_root/.venv}
    if [[ -n ${VENV:-} || -x $venv/bin/ray ]]; then
        RAY_BIN=$venv/bin/ray
    else
        RAY_BIN=$(command -v ray || true)
    fi
fi

if [[ -z $RAY_BIN || ! -x $RAY_BIN ]]; then
    echo "error: ray executable not found (${RAY_BIN:-no $repo_root/.venv/bin/ray, no ray on PATH}):" \
        "run \`make run\` to create .venv, put ray on PATH, or set RAY_BIN" >&2
    exit 2
fi

# The interpreter that runs $RAY_BIN: the first of the python next to it and the one its
# shebang names that can import ray (a `ray` on PATH may sit beside another Python).
imports_ray() {
    [[ -n $1 && -x $1 ]] &&
        "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ray") is None)' 2>/dev/null
}
shebang_python() {
    local shebang words
    read -r shebang <"$RAY_BIN" || true
    [[ $shebang == '#!'* ]] || return 0
    read -r -a words <<<"${shebang#\#!}"
    if [[ ${words[0]:-} == */env ]]; then
        command -v "${words[1]:-python3}" || true
    else
        echo "${words[0]:-}"
    fi
}
python=""
for candidate in "$(dirname "$RAY_BIN")/python3" "$(dirname "$RAY_BIN")/python" "$(shebang_python)"; do
    if imports_ray "$candidate"; then
        python=$candidate
        break
    fi
done
if [[ -z $python ]]; then
    echo "error: could not find the Python that runs $RAY_BIN (with ray importable)" >&2
    exit 2
fi

export RAY_BIN
exec "$python" "$deploy_dir/local_cluster.py" "$@"
