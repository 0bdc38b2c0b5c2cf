#!/usr/bin/env bash
# Submit `flowgrpo train` as a Ray Job to a local Ray head on loopback, starting the head if
# none runs. Run from anywhere; extra arguments go to `flowgrpo train`.
#
#   deploy/jobs/submit_local.sh                                   # tiny CPU config
#   deploy/jobs/submit_local.sh deploy/configs/tiny_cpu.yaml --set run.iterations=5
#
# Env: NUM_CPUS (2), NUM_GPUS (detected), RAY_PORT (6379), DASHBOARD_PORT (8265), METRICS_PORT
# (8080), RAY_START_ARGS (more `ray start` options), JOB_ENV (names of variables passed to the
# job, default "FLOWGRPO_DATASETS HF_TOKEN"). Stop the head with `ray stop`.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"   # the head runs the job with this PATH

# Loopback only, no token auth, no usage stats: a developer machine, not a shared cluster.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT:-8265}

config=${1:-deploy/configs/tiny_cpu.yaml}
[ $# -gt 0 ] && shift

if ! ray status --address "127.0.0.1:${RAY_PORT:-6379}" >/dev/null 2>&1; then
  ray start --head --port="${RAY_PORT:-6379}" --num-cpus="${NUM_CPUS:-2}" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} \
    --dashboard-host=127.0.0.1 --dashboard-port="${DASHBOARD_PORT:-8265}" \
    --metrics-export-port="${METRICS_PORT:-8080}" ${RAY_START_ARGS:-}
fi

# The job runs in a copy of the working dir under /tmp/ray: give the run folder an absolute path.
args=("$@")
if [[ " $* " != *" --run-dir "* && " $* " != *" --resume "* ]]; then
  args+=(--run-dir "$PWD/runs/$(basename "$config" .yaml)-$(date +%Y%m%d-%H%M%S)")
fi

# The driver inherits the environment of `ray start`, not this shell's: pass what it needs.
runtime_env=$(JOB_ENV="${JOB_ENV-FLOWGRPO_DATASETS HF_TOKEN}" python3 -c '
import json, os
names = os.environ["JOB_ENV"].split()
print(json.dumps({"env_vars": {n: os.environ[n] for n in names if os.environ.get(n)}}))')

exec ray job submit --working-dir . --runtime-env-json "$runtime_env" \
  -- flowgrpo train --config "$config" "${args[@]}"
