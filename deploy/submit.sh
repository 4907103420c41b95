#!/usr/bin/env bash
# Submit the nightly job to a Ray cluster without KubeRay (`ray job submit`, needs ray[default]).
# The submission id is fixed per day, so a retried submit never starts the job twice:
# status first; submit only when that id is unknown.
#   RAY_ADDRESS=http://head:8265 deploy/submit.sh [CONFIG] [DAY]
set -euo pipefail
config="${1:-/config/job.yaml}"
day="${2:-$(date -u +%Y%m%d)}"
id="camlabel-${day}"
if status=$(ray job status "$id" 2>/dev/null); then
  echo "submission $id already exists: $status"
  exit 0
fi
exec ray job submit --submission-id "$id" --no-wait -- camlabel annotate --config "$config" --incremental
