#!/usr/bin/env bash
# vLLM 0.22 + Ray 2.60 + TRL for the lent GPU machine (Python 3.12, torch 2.11.0+cu130, no internet there), and
# NeMo Gym for its environment servers, carried as wheels in chunks under its 64 MiB-a-call limit. Steps and the
# exact call sequence: docs/gpu.md.
#
#   here:  scripts/gpu_setup.sh prepare [DIR]   wheels of scripts/gpu-wheels.txt and scripts/gpu-gym-wheels.txt
#                                               -> DIR/w00, DIR/w01, ... (default .gpu, which .git/info/exclude
#                                               must ignore) and DIR/repo (this checkout's tracked files: the
#                                               device gets /work/main's otherwise)
#   there: scripts/gpu_setup.sh receive CHUNK   one call per chunk, back to back: stash it in /tmp/gw
#   there: scripts/gpu_setup.sh install         reassemble; install into /tmp/site (vLLM, Ray, TRL) and /tmp/gymsite
#                                               (NeMo Gym, run by /tmp/gym-python); check the imports
#   there: scripts/gpu_setup.sh check           a generation with a tiny random model (one engine start)
# Then, in the same warm machine: export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0, and give runs
# --set env_servers.gym_python=/tmp/gym-python (the machine's python3 is a venv: no venv can be made on top of it,
# so the servers' Python is that python3 with NeMo Gym's own pins, e.g. openai, ahead of /tmp/site).
set -euo pipefail
cmd=${1:?prepare, receive, install or check}
case $cmd in
prepare)
  dir=${2:-.gpu}
  here=$(cd "$(dirname "$0")" && pwd)
  work=$(mktemp -d)
  plat=()
  for p in manylinux_2_28 manylinux_2_31 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_34 manylinux_2_35 manylinux_2_24; do
    plat+=(--platform "${p}_x86_64")
  done
  for list in wh:gpu-wheels.txt gym:gpu-gym-wheels.txt; do
    grep -v '# sdist' "$here/${list#*:}" >"$work/binary.txt"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d "$work/${list%%:*}" -r "$work/binary.txt"
    # Pure-Python packages published as source only: a wheel built here serves any Python.
    { grep '# sdist' "$here/${list#*:}" || true; } | sed 's/ *#.*//' | xargs -r python3 -m pip wheel -q --no-deps -w "$work/${list%%:*}"
  done
  # Ray's Java jar (32 MB compressed) serves Java workers only: half a chunk saved.
  (cd "$work/wh" && zip -q -d ray-*.whl 'ray/jars/*')
  rm -rf "$dir"/w[0-9][0-9] "$dir/repo"
  mkdir -p "$dir/repo"
  tar cf - -C "$work" wh gym | split -b 60m -d -a 2 - "$work/part."
  for f in "$work"/part.*; do n=${f##*.}; mkdir -p "$dir/w$n"; mv "$f" "$dir/w$n/"; done
  git -C "$here/.." archive HEAD | tar xf - -C "$dir/repo"
  rm -rf "$work"
  du -sh "$dir"/w[0-9][0-9] "$dir/repo"
  ;;
receive)
  mkdir -p /tmp/gw && cp "${2:?chunk folder}"/part.* /tmp/gw/ && ls -l /tmp/gw
  ;;
install)
  rm -rf /tmp/gw/wh /tmp/gw/gym && cat /tmp/gw/part.* | tar xf - -C /tmp/gw
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/gw/wh/*.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gymsite /tmp/gw/gym/*.whl
  printf '#!/bin/sh\n# NeMo Gym servers: their own pins first, then the harness wheels, then the image.\nPYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/gymsite:/tmp/site" exec python3 "$@"\n' >/tmp/gym-python
  chmod +x /tmp/gym-python
  PYTHONPATH=/tmp/site python3 -c 'import torch, vllm, ray, trl; print("vllm", vllm.__version__, "ray", ray.__version__, "trl", trl.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))'
  PYTHONPATH=$PWD /tmp/gym-python -c 'import nemo_gym, gymrl.envs.serve; print("nemo_gym", nemo_gym.__version__)'
  ;;
check)
  PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 python3 - <<'PY'
import tempfile, time
from pathlib import Path
from gymrl.envs.registry import load_environment
from gymrl.models.spec import TinyModelSpec
from gymrl.models.tiny import build_tiny_model
from vllm import LLM, SamplingParams
path = build_tiny_model(TinyModelSpec(warmup_steps=0), load_environment("arithmetic"), Path(tempfile.mkdtemp()))
llm = LLM(str(path), enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=256)
t = time.perf_counter()
outs = llm.generate([[1, 2, 3]] * 64, SamplingParams(max_tokens=64, ignore_eos=True))
print("generated", sum(len(o.outputs[0].token_ids) for o in outs), "tokens in", round(time.perf_counter() - t, 2), "s")
PY
  ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
