#!/usr/bin/env bash
# Set up .venv and run the det-rl flow on its embedded defaults: an ephemeral Prefect server, a
# local Ray, and profile "auto" (the reference GPU run where a GPU and SGLang are present, the
# tiny CPU profile otherwise). Arguments go to the flow, e.g. --profile tiny-cpu --set train.steps=5.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
exec .venv/bin/python -m flows.detrl_flow "$@"
