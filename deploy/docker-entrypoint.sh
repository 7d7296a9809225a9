#!/bin/sh
# Entry point of the shardgrad image: one image, four roles.
#
#   ray-head     ray start --head --block          (GCS on $RAY_GCS_PORT, default 6379)
#   ray-worker   wait for the head, then ray start --address=$RAY_ADDRESS --block
#   kuberay      a Ray pod of a RayCluster with ray.io/overwrite-container-cmd: "true":
#                the checks below, then the `ray start` KubeRay generated
#                ($KUBERAY_GEN_RAY_START_CMD), under tini like every other role
#   api          wait for the head (and PostgreSQL), join the cluster at $RAY_ADDRESS
#                as a 0-CPU Ray node, then `shardgrad serve --host 0.0.0.0` in the
#                foreground. A Ray driver must run on a Ray node (it talks to a local
#                raylet); with 0 CPUs no training worker is ever placed on the API
#                container. The job coordinators run here and write every checkpoint
#                under $SHARDGRAD_DATA_DIR; Ray workers never touch the filesystem.
#   <anything>   exec'd as is, e.g. `shardgrad train spec.json`, `ray status`, `bash`
#
# Token auth: RAY_AUTH_MODE=token (the image default) and the cluster's token in
# RAY_AUTH_TOKEN (or a file at RAY_AUTH_TOKEN_PATH) must be set in every container.
# A token, API token or database URL that still holds a placeholder is refused.
# Optional:
#   RAY_NUM_CPUS               overrides Ray's CPU detection on head and worker nodes
#   RAY_OBJECT_STORE_MEMORY    object store size in bytes (--object-store-memory); keep it
#                              below the size of /dev/shm, or Ray falls back to /tmp
#   SHARDGRAD_WAIT_TIMEOUT_S   how long to wait for the Ray head / PostgreSQL (default 300)
#   SHARDGRAD_WAIT_INTERVAL_S  pause between two tries (default 2)
set -eu

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

refuse() {
    echo "error: $*" >&2
    exit 64
}

# A value copied from deploy/k8s/secret.yaml or deploy/env.example, or a Kubernetes
# $(VAR) reference whose Secret key is missing (Kubernetes leaves it unexpanded).
is_placeholder() {
    case "$1" in
    *change-me* | *'<'*'>'* | *'$('*) return 0 ;;
    esac
    return 1
}

require_secrets() {
    if [ "$RAY_AUTH_MODE" = "token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ] &&
        [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
        refuse "RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH is set"
    fi
    if is_placeholder "${RAY_AUTH_TOKEN:-}" || is_placeholder "${SHARDGRAD_API_TOKEN:-}"; then
        refuse "replace the change-me placeholder tokens (see docs/deploy.md, step 4)"
    fi
    if is_placeholder "${SHARDGRAD_DATABASE_URL:-}"; then
        refuse "SHARDGRAD_DATABASE_URL holds a placeholder (change-me, <...> or an" \
            "unset \$(VAR)): set the database password Secret (see docs/deploy.md, step 4)"
    fi
}

require_address() {
    if [ -z "${RAY_ADDRESS:-}" ]; then
        refuse "set RAY_ADDRESS to the Ray head's GCS address (host:6379)"
    fi
}

# wait_until WHAT COMMAND...: run COMMAND until it succeeds, for at most
# SHARDGRAD_WAIT_TIMEOUT_S seconds, then give up with a message naming WHAT.
wait_until() {
    what="$1"
    shift
    timeout="${SHARDGRAD_WAIT_TIMEOUT_S:-300}"
    interval="${SHARDGRAD_WAIT_INTERVAL_S:-2}"
    deadline=$(($(date +%s) + timeout))
    tries=1
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "error: $what did not answer within ${timeout} s ($tries tries of: $*)." >&2
            echo "       Is it running and reachable from here? Raise SHARDGRAD_WAIT_TIMEOUT_S" \
                "to wait longer." >&2
            exit 69
        fi
        [ "$tries" -gt 1 ] || echo "waiting for $what ($*)" >&2
        tries=$((tries + 1))
        sleep "$interval"
    done
}

wait_for_head() {
    wait_until "the Ray head at $RAY_ADDRESS" ray health-check --address "$RAY_ADDRESS"
}

wait_for_database() {
    case "${SHARDGRAD_DATABASE_URL:-}" in
    postgresql*)
        wait_until "the database" python -c \
            'import os, sqlalchemy; sqlalchemy.create_engine(os.environ["SHARDGRAD_DATABASE_URL"]).connect().close()'
        ;;
    esac
}

node_flags=""
if [ -n "${RAY_NUM_CPUS:-}" ]; then
    node_flags="--num-cpus=$RAY_NUM_CPUS"
fi
if [ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]; then
    node_flags="$node_flags --object-store-memory=$RAY_OBJECT_STORE_MEMORY"
fi

role="${1:-api}"
[ $# -gt 0 ] && shift

case "$role" in
ray-head)
    require_secrets
    # The dashboard listens inside the cluster network only; never publish 8265.
    # shellcheck disable=SC2086
    exec ray start --head --block --port="${RAY_GCS_PORT:-6379}" \
        --dashboard-host=0.0.0.0 --disable-usage-stats $node_flags "$@"
    ;;
ray-worker)
    require_secrets
    require_address
    wait_for_head
    # shellcheck disable=SC2086
    exec ray start --block --address="$RAY_ADDRESS" --disable-usage-stats $node_flags "$@"
    ;;
kuberay)
    require_secrets
    if [ -z "${KUBERAY_GEN_RAY_START_CMD:-}" ]; then
        refuse "no KUBERAY_GEN_RAY_START_CMD: the RayCluster needs the annotation" \
            "ray.io/overwrite-container-cmd: \"true\""
    fi
    # What KubeRay's own command does first; a lower hard limit is no reason to fail.
    ulimit -n 65536 2>/dev/null || true
    exec bash -c "$KUBERAY_GEN_RAY_START_CMD $node_flags $*"
    ;;
api)
    require_secrets
    require_address
    wait_for_head
    wait_for_database
    # shellcheck disable=SC2086
    ray start --address="$RAY_ADDRESS" --num-cpus=0 --disable-usage-stats $node_flags
    exec shardgrad serve --host 0.0.0.0 --port "${SHARDGRAD_PORT:-8000}" "$@"
    ;;
*)
    exec "$role" "$@"
    ;;
esac
