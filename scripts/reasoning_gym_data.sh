#!/usr/bin/env bash
# Writes configs/data/reasoning_gym_addition.jsonl, the tasks of configs/reasoning_gym.yaml, with NeMo Gym's own
# dataset script (resources_servers/reasoning_gym/scripts/create_dataset.py, unchanged): reasoning_gym's
# basic_arithmetic task, additions of two numbers 0-10, seed 0. The hub dataset the server's config names
# (nvidia/Nemotron-RL-ReasoningGym-v1) cannot be downloaded here; this is how NeMo Gym makes such files.
set -euo pipefail
cd "$(dirname "$0")/.."
server=$(ls -d .venv-gym/lib/python3.*/site-packages/resources_servers/reasoning_gym)
# reasoning_gym's own requirements (the reasoning-gym package): installed once, as a run would
.venv/bin/python -c "from pathlib import Path; from gymrl.envs.server_deps import ensure_installed as e; \
e('reasoning_gym', Path('$server'), Path('.venv-gym/bin/python'))"
PYTHONPATH=.venv-gym/server-deps/reasoning_gym .venv-gym/bin/python "$server/scripts/create_dataset.py" \
  --task basic_arithmetic --size 300 --seed 0 \
  --config '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
             "allow_negation": false, "allow_parentheses": false}' \
  --output configs/data/reasoning_gym_addition.jsonl
