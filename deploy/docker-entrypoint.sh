#!/bin/sh
# Entry point of the shardgrad image: one image, three roles.
#
#   ray-head     ray start --head --block          (GCS on $RAY_GCS_PORT, default 6379)
#   ray-worker   ray start --address=$RAY_ADDRESS --block
#   api          join the cluster at $RAY_ADDRESS as a 0-CPU Ray node, then
#                `shardgrad serve --host 0.0.0.0` in the foreground. A Ray driver
#                must run on a Ray node (it talks to a local raylet); with 0 CPUs
#                no training worker is ever placed on the API container. The job
#                coordinators run here and write every checkpoint under
#                $SHARDGRAD_DATA_DIR; Ray workers never touch the filesystem.
#   <anything>   exec'd as is, e.g. `shardgrad train spec.json`, `ray status`, `bash`
#
# Token auth: RAY_AUTH_MODE=token (the image default) and the cluster's token in
# RAY_AUTH_TOKEN (or a file at RAY_AUTH_TOKEN_PATH) must be set in every container.
# Optional: RAY_NUM_CPUS overrides Ray's CPU detection on head and worker nodes.
set -eu

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

require_token() {
    if [ "$RAY_AUTH_MODE" = "token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ] &&
        [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
        echo "error: RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH is set" >&2
        exit 64
    fi
    case "${RAY_AUTH_TOKEN:-}${SHARDGRAD_API_TOKEN:-}" in
    *change-me*)
        echo "error: replace the change-me placeholder tokens (deploy/k8s/secret.yaml)" >&2
        exit 64
        ;;
    esac
}

require_address() {
    if [ -z "${RAY_ADDRESS:-}" ]; then
        echo "error: set RAY_ADDRESS to the Ray head's GCS address (host:6379)" >&2
        exit 64
    fi
}

cpu_flag=""
if [ -n "${RAY_NUM_CPUS:-}" ]; then
    cpu_flag="--num-cpus=$RAY_NUM_CPUS"
fi

role="${1:-api}"
[ $# -gt 0 ] && shift

case "$role" in
ray-head)
    require_token
    # The dashboard listens inside the cluster network only; never publish 8265.
    # shellcheck disable=SC2086
    exec ray start --head --block --port="${RAY_GCS_PORT:-6379}" \
        --dashboard-host=0.0.0.0 --disable-usage-stats $cpu_flag "$@"
    ;;
ray-worker)
    require_token
    require_address
    # shellcheck disable=SC2086
    exec ray start --block --address="$RAY_ADDRESS" --disable-usage-stats $cpu_flag "$@"
    ;;
api)
    require_token
    require_address
    ray start --address="$RAY_ADDRESS" --num-cpus=0 --disable-usage-stats
    exec shardgrad serve --host 0.0.0.0 --port "${SHARDGRAD_PORT:-8000}" "$@"
    ;;
*)
    exec "$role" "$@"
    ;;
esac
