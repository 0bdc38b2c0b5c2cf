#!/usr/bin/env bash
# Submit `flowgrpo train` as a Ray Job to a running cluster (deploy/ray/cluster.yaml, a KubeRay
# RayCluster, ...) through its Jobs API, and return; extra arguments go to `flowgrpo train`.
#
#   RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 deploy/jobs/submit_cluster.sh deploy/configs/sd35_geneval.yaml
#
# RAY_API_SERVER_ADDRESS: the head's dashboard address (after `ray dashboard deploy/ray/cluster.yaml`
# or `kubectl port-forward svc/<cluster>-head-svc 8265`). With token auth on the cluster, export
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN here too. RUN_ROOT: run folders on the head (/runs).
# JOB_ENV: names of local variables passed to the job (default "HF_TOKEN"); their values show in
# the job's details on the dashboard, so prefer setting secrets on the nodes where you can.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${RAY_API_SERVER_ADDRESS:?set it to the dashboard address of the head, e.g. http://127.0.0.1:8265}"
export RAY_API_SERVER_ADDRESS

config=${1:-deploy/configs/sd35_geneval.yaml}
[ $# -gt 0 ] && shift
name=$(basename "$config" .yaml)-$(date +%Y%m%d-%H%M%S)

args=("$@")
if [[ " $* " != *" --run-dir "* && " $* " != *" --resume "* ]]; then
  args+=(--run-dir "${RUN_ROOT:-/runs}/$name")
fi

runtime_env=$(JOB_ENV="${JOB_ENV-HF_TOKEN}" python3 -c '
import json, os
names = os.environ["JOB_ENV"].split()
print(json.dumps({"env_vars": {n: os.environ[n] for n in names if os.environ.get(n)}}))')

ray job submit --no-wait --submission-id "$name" --working-dir . --runtime-env-json "$runtime_env" \
  -- flowgrpo train --config "$config" "${args[@]}"
echo "follow:  ray job logs --follow $name    status: ray job status $name    stop: ray job stop $name"
