"""Training checkpoints: what a run needs to continue exactly where it stopped, written atomically.

Layout: ``<run_dir>/checkpoints/step_000010/`` holds ``policy/`` (a plain HF folder, as ``save_policy``
writes it) and ``trainer_state.pt`` (optimizer, scheduler, RNG states, step and the caller's state: data
cursor, policy version, trace and metrics offsets); the sharded trainer's adds ``shards/``, its ranks' weights
and AdamW state. Either trainer resumes a checkpoint of either. A checkpoint is built in a hidden sibling folder,
flushed to disk and renamed into place, so a run killed mid-write leaves at most a hidden temp folder
that :func:`latest_checkpoint` never picks and the next save removes.

:class:`StopSignal` turns SIGTERM and Ctrl-C into a request that the loop sees between steps, so it can
finish the step, checkpoint and exit. :func:`export_hf` copies a checkpoint's policy out as an HF model
folder that transformers and vLLM load.
"""

import errno
import logging
import os
import random
import re
import shutil
import signal
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gymrl.models.checkpoint import load_policy, save_policy
from gymrl.models.checkpoint_files import fsync_tree, replace_dir
from gymrl.models.lora import adapter_state, is_lora
from gymrl.models.mtp import load_mtp_layer

CHECKPOINTS = "checkpoints"
POLICY = "policy"
TRAINER_STATE = "trainer_state.pt"
SHARDS = "shards"  # the sharded trainer's weight and AdamW shards (torch.distributed.checkpoint)
FINAL_CHECKPOINT = "checkpoint"  # the end-of-run HF folder train() writes
_STEP_DIR = re.compile(r"step_(\d{6,})")
log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names its folder."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete checkpoints, oldest first; temp folders are not among them."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _check_plain(value, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse at resume time, now, while it can be fixed."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint state {where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        raise TypeError(f"checkpoint state {where}: {type(value).__name__} is not plain data "
                        "(dict, list, tuple, str, int, float, bool, None or a tensor)")


def rng_state() -> dict:
    """The global random streams: Python's, NumPy's, torch's CPU generator and, when present, every CUDA one."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove(path: Path) -> None:
    """Take a folder out of the checkpoint namespace by a rename first, so a crash mid-delete leaves a
    hidden folder rather than a half-deleted checkpoint."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    try:
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    except OSError as err:
        log.warning("could not remove old checkpoint %s: %s", path, err)


def save_checkpoint(run_dir: str | Path, step: int, policy, tokenizer, optimizer, scheduler, state: dict,
                    keep: int = 2, mtp_layer=None, write_shards: Callable[[Path], None] | None = None) -> Path:
    """Write ``<run_dir>/checkpoints/step_{step:06d}`` atomically and keep the newest ``keep`` checkpoints.

    ``scheduler`` may be None; so may ``optimizer`` when ``write_shards`` is given: the sharded trainer's ranks
    then write their shards of the weights and the optimizer into the folder it is called with (``shards/``); ``mtp_layer`` (the model's MTP layer, if the trainer holds one) goes into the
    policy folder where the model's own checkpoints keep it. ``state`` is the caller's plain data (data cursor, policy version, trace and
    metrics offsets), returned by :func:`load_checkpoint`. After the new checkpoint is in place, those with
    a lower step beyond ``keep`` are removed, and so are any with a higher step: they belong to a run that
    was resumed from an earlier checkpoint, and :func:`latest_checkpoint` must not pick them over this one.
    A failed write (a full disk, say) raises :class:`CheckpointError` and leaves the existing checkpoints as
    they were.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if "step" in state:
        raise ValueError("checkpoint state: 'step' is the checkpoint's own field; give it as the step argument")
    _check_plain(state, "state")
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step_*"):  # temp folders of writes that were killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        save_policy(policy, tokenizer, tmp / POLICY, mtp_layer)
        if write_shards is not None:
            write_shards(tmp / SHARDS)
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "adapter": adapter_state(policy),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(), "state": state}, tmp / TRAINER_STATE)
        fsync_tree(tmp)
        replace_dir(tmp, final)
    except Exception as err:  # a full disk surfaces as OSError, torch's RuntimeError or a SafetensorError
        free = shutil.disk_usage(root).free / 2**20  # measured before the temp folder goes: ~0 when it filled the disk
        full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or free < 16
        kept = ", ".join(p.name for _, p in list_checkpoints(run_dir)) or "none"
        raise CheckpointError(f"{'disk full: ' if full else ''}could not write checkpoint '{final}' "
                              f"({type(err).__name__}: {err}); {free:.0f} MiB free on its filesystem. Nothing of it "
                              f"was kept; the previous checkpoints are untouched ({kept})") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = list_checkpoints(run_dir)
    older = [p for s, p in found if s < step]
    for path in older[: max(0, len(older) - keep + 1)] + [p for s, p in found if s > step]:
        _remove(path)
    return final


def load_checkpoint(path: str | Path, policy, optimizer, scheduler, mtp_layer=None, sharded: bool = False) -> dict:
    """Restore the policy's weights (and ``mtp_layer``'s, if given), the optimizer, the scheduler (None if the run
    has none) and the RNG states from a checkpoint folder written by either trainer; returns the caller's state with
    ``step`` added.

    ``sharded``: the sharded trainer restores (``optimizer`` and ``scheduler`` None): its ranks then read the AdamW
    state themselves (from ``shards/``, or from ``trainer_state.pt`` for a checkpoint of the one-process trainer),
    and the returned ``rank_scheduler`` is the scheduler state they load, whichever trainer wrote it. The one-process
    trainer restores a sharded checkpoint's AdamW state from ``shards/`` (:func:`load_sharded_optimizer`) and its
    scheduler from the ranks' state the checkpoint keeps."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at '{path}'")
    for part in (TRAINER_STATE, f"{POLICY}/config.json"):
        if not (path / part).is_file():
            raise FileNotFoundError(f"incomplete checkpoint '{path}': no {part}")
    has_shards = (path / SHARDS).is_dir()
    try:  # the sharded trainer's driver reads no optimizer state: it stays on disk (memory-mapped)
        saved = torch.load(path / TRAINER_STATE, weights_only=True, mmap=sharded)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"corrupt checkpoint '{path}': cannot read {TRAINER_STATE} ({err})") from err
    _check_trainer_kinds(path, saved, has_shards, sharded, policy, optimizer)
    schedule = saved["state"].get("rank_scheduler") if has_shards else saved["scheduler"]
    if (schedule is None) != (scheduler is None and not sharded):
        has = "has no" if schedule is None else "has a"
        raise CheckpointError(f"checkpoint '{path}' {has} scheduler state, and the run "
                              f"{'has a' if scheduler is not None or sharded else 'has no'} scheduler")
    try:
        if saved.get("adapter") is not None:  # a LoRA policy: its base is the run's model, its adapters are here
            unexpected = policy.load_state_dict(saved["adapter"], strict=False).unexpected_keys
            if unexpected or not is_lora(policy):
                raise ValueError(f"the checkpoint holds LoRA adapters that this policy does not have: {unexpected[:3]}")
        else:
            weights, _ = load_policy(path / POLICY)
            policy.load_state_dict(weights.state_dict())
        if mtp_layer is not None:
            mtp_layer.load_state_dict(load_mtp_layer(policy, path / POLICY).state_dict())
        if optimizer is not None and has_shards:
            load_sharded_optimizer(path / SHARDS, policy, optimizer)
        elif optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(schedule)
    except Exception as err:  # noqa: BLE001 - safetensors, shape and parameter-group mismatches all land here
        raise CheckpointError(f"cannot restore checkpoint '{path}': {err}") from err
    set_rng_state(saved["rng"])
    return saved["state"] | {"step": saved["step"]} | ({"rank_scheduler": schedule} if sharded else {})


def _check_trainer_kinds(path: Path, saved: dict, has_shards: bool, sharded: bool, policy, optimizer) -> None:
    """Refuse, naming the key, what one trainer kind wrote and the other cannot take: the sharded trainer trains no
    LoRA adapters and no MTP layer (train.lora, train.mtp_loss_weight > 0 are refused with train.workers > 1)."""
    if sharded and not has_shards:
        if saved.get("adapter") is not None:
            raise CheckpointError(f"checkpoint '{path}' holds LoRA adapters (train.lora), which the sharded trainer "
                                  "(train.workers > 1) does not train; resume it with train.workers=1")
        if saved["optimizer"] is None or len(saved["optimizer"]["param_groups"]) != 1:
            raise CheckpointError(f"checkpoint '{path}' holds AdamW state for an MTP layer (train.mtp_loss_weight "
                                  "> 0), which the sharded trainer (train.workers > 1) does not train; resume it "
                                  "with train.workers=1")
    if has_shards and not sharded:
        if is_lora(policy):
            raise CheckpointError(f"checkpoint '{path}' was written by the sharded trainer (train.workers > 1), "
                                  "which trains no LoRA adapters; resume it without train.lora")
        if optimizer is not None and len(optimizer.param_groups) != 1:
            raise CheckpointError(f"checkpoint '{path}' was written by the sharded trainer (train.workers > 1), "
                                  "which has no AdamW state for an MTP layer; resume it with train.mtp_loss_weight 0")


def load_sharded_optimizer(folder: Path, policy, optimizer) -> None:
    """Fill a one-process optimizer (over ``policy.parameters()``) from the AdamW shards the sharded trainer's ranks
    wrote into ``folder``, whatever their number. In this process, without a process group: the optimizer's state by
    parameter name (initialised by a step with zero gradients and learning rate, which moves no weight) is the
    template ``torch.distributed.checkpoint`` reads each tensor into, whole; then it goes back into the optimizer.
    The weights come from ``policy/``, as for a one-process checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(policy, optimizer)}
    read_shards(state, folder)
    set_optimizer_state_dict(policy, optimizer, state["optim"])


def read_shards(state: dict, folder: str | Path) -> None:
    """Fill ``state``'s tensors from the shards in ``folder`` (``torch.distributed.checkpoint.load``: in each rank,
    or in one process without a process group); a failure is a RuntimeError, not dcp's CheckpointException, which is
    a BaseException that ``except Exception`` misses."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # in one process, one process is what is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=folder)
        except CheckpointException as err:
            failures = "; ".join(f"{type(e).__name__}: {e}" for e in err.failures.values())
            raise RuntimeError(f"cannot read the shards in '{folder}' ({failures})") from None


class StopSignal:
    """A context manager under which SIGTERM and Ctrl-C only set :attr:`requested`, so the loop can finish
    its step, checkpoint and exit cleanly; a Ctrl-C after that raises KeyboardInterrupt at once (the user
    who presses it twice wants out now). The previous handlers come back on exit. Main thread only, as
    Python's signal handlers are."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        # os.write: print() from a handler can hit a reentrant buffered write to stderr.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step "
                    f"(a checkpoint is written; Ctrl-C again to abort now)\n".encode())

    def __enter__(self) -> "StopSignal":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def find_checkpoint(source: str | Path, step: int | None = None) -> Path:
    """What ``gymrl export SOURCE`` exports: a checkpoint folder or an HF folder as given, else a run folder's
    step checkpoint (``step``, or its latest), else the run's end-of-run ``checkpoint/``."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"no run or checkpoint folder at '{source}'")
    is_checkpoint = (source / TRAINER_STATE).is_file() or (source / POLICY).is_dir()
    is_hf = (source / "config.json").is_file() and any(source.glob("*.safetensors"))
    if is_checkpoint or is_hf:
        if step is not None:
            raise ValueError(f"--step picks a checkpoint of a run folder; '{source}' is a checkpoint itself")
        return source
    found = list_checkpoints(source)
    if step is not None:
        path = checkpoint_dir(source, step)
        if not path.is_dir():
            have = ", ".join(str(s) for s, _ in found) or "none"
            raise FileNotFoundError(f"no checkpoint of step {step} in '{source}' (steps checkpointed: {have})")
        return path
    if found:
        return found[-1][1]
    if (source / FINAL_CHECKPOINT / "config.json").is_file():
        return source / FINAL_CHECKPOINT
    raise FileNotFoundError(f"'{source}' has no checkpoints ({CHECKPOINTS}/step_*/ or {FINAL_CHECKPOINT}/)")


def policy_folder(checkpoint: str | Path) -> Path:
    """The HF model folder of a checkpoint (its ``policy/``, or the folder itself when it is one)."""
    checkpoint = Path(checkpoint)
    source = checkpoint / POLICY if (checkpoint / POLICY).is_dir() else checkpoint
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no HF model (config.json) in checkpoint '{checkpoint}'")
    if not any(source.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint '{checkpoint}' has no safetensors weights in '{source}'")
    return source


def export_gguf(checkpoint: str | Path, out_file: str | Path) -> Path:
    """Write a checkpoint's policy as one GGUF file (llama.cpp), built beside ``out_file`` and renamed into
    place; an existing file is refused, as an export folder that is not empty is."""
    from gymrl.models.gguf_export import write_gguf

    source = policy_folder(checkpoint)
    out = Path(out_file)
    if out.exists():
        raise FileExistsError(f"GGUF file '{out}' exists; give a new file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fsync_tree(write_gguf(source, tmp / out.name).parent)
        os.rename(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> list[str]:
    """Copy a checkpoint's policy (or an HF folder) to ``out_dir`` as a plain HF safetensors model folder:
    config.json, safetensors weights, tokenizer files, generation config. ``out_dir`` must be new or
    empty, so an export never mixes with another model's files. Returns the file names written."""
    source = policy_folder(checkpoint)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export folder '{out}' exists and is not empty; give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = sorted(f.name for f in source.iterdir() if f.is_file())
        for name in files:
            shutil.copy2(source / name, tmp / name)
        fsync_tree(tmp)
        os.rename(tmp, out)  # onto a missing or empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files
