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
#   here:  scripts/gpu_setup.sh prepare-mamba [DIR]   the sources of the Mamba-2 training kernels (mamba-ssm,
#                                               causal-conv1d; no wheel for torch 2.11 + CUDA 13 exists) -> DIR/mamba,
#                                               patched to build for the H100/H200's sm_90 only (minutes, not an hour)
#   there: scripts/gpu_setup.sh build-mamba DIR build their wheels (nvcc; /tmp/mamba-wheels), install them into
#                                               /tmp/mambasite (PYTHONPATH=/tmp/mambasite:... turns them on, so a run
#                                               with and one without compare), check that transformers' Nemotron-H
#                                               takes them; /tmp/mamba-build.done when finished
# Then, in the same warm machine: export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0, and give runs
# --set env_servers.gym_python=/tmp/gym-python (the machine's python3 is a venv: no venv can be made on top of it,
# so the servers' Python is that python3 with NeMo Gym's own pins, e.g. openai, ahead of /tmp/site).
set -euo pipefail
cmd=${1:?prepare, receive, install, check, prepare-mamba or build-mamba}
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
prepare-mamba)
  dir=${2:-.gpu}/mamba
  rm -rf "$dir" && mkdir -p "$dir"
  python3 - "$dir" <<'PY'
import io, json, re, sys, tarfile, urllib.request
PINS = {"mamba-ssm": "2.3.2.post1", "causal-conv1d": "1.7.0"}
for name, version in PINS.items():
    meta = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json"))
    url = next(u["url"] for u in meta["releases"][version] if u["packagetype"] == "sdist")
    tarfile.open(fileobj=io.BytesIO(urllib.request.urlopen(url).read())).extractall(sys.argv[1], filter="data")
    setup = next(p for p in __import__("pathlib").Path(sys.argv[1]).glob(f"{name.replace('-', '_')}-{version}/setup.py"))
    text = setup.read_text()
    # Every -gencode pair but sm_90's goes: the machine's GPUs are Hopper, and ten architectures take ten times as long.
    text = re.sub(r'[ \t]*cc_flag\.append\("-gencode"\)\n[ \t]*cc_flag\.append\("arch=compute_(\d+)a?,code=sm_\1a?"\)\n',
                  lambda m: m.group(0) if m.group(1) == "90" else "", text)
    text = re.sub(r'^([ \t]*)(if bare_metal_version >= Version\("[\d.]+"\):)\n(?!\1[ \t])',
                  lambda m: f"{m.group(1)}{m.group(2)}\n{m.group(1)}    pass\n", text, flags=re.M)
    compile(text, str(setup), "exec")
    assert re.findall(r"arch=compute_\d+", text) == ["arch=compute_90"], f"{setup}: the architecture patch no longer fits"
    setup.write_text(text)
    print("prepared", setup.parent)
PY
  ;;
build-mamba)
  src=${2:?the folder prepare-mamba filled}
  wheels=/tmp/mamba-wheels && mkdir -p $wheels
  for pkg in "$src"/causal_conv1d-* "$src"/mamba_ssm-*; do
    (cd "$pkg" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
      python3 -m pip wheel -q --no-build-isolation --no-deps -w $wheels .)
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/mambasite $wheels/*.whl
  PYTHONPATH=/tmp/mambasite:/tmp/site python3 - <<'PY'
import causal_conv1d, mamba_ssm
from transformers.models.nemotron_h import modeling_nemotron_h as m

def kernel_of(f, depth=0):
    """The module of the kernel a transformers wrapper calls: mamba_ssm/causal_conv1d, or transformers' torch path."""
    for cell in getattr(f, "__closure__", None) or ():
        v = cell.cell_contents
        if callable(v) and getattr(v, "__module__", "").split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            return v.__module__
        if callable(v) and depth < 3 and (found := kernel_of(v, depth + 1)):
            return found
    return None

print("causal_conv1d", causal_conv1d.__version__, "mamba_ssm", mamba_ssm.__version__)
for name in ("causal_conv1d_fn", "mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined"):
    print(name, "->", kernel_of(getattr(m, name)) or "transformers' PyTorch path")
PY
  touch /tmp/mamba-build.done
  ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
