"""The trainer's side of a weight push (``train.weight_sync``): which way the weights go, and sending them.

bytes: one safetensors blob through Ray's object store (works anywhere). ipc: one flat CUDA buffer whose IPC
handle the engines map (trainer and engines on one GPU). broadcast: the same flat buffer sent by one collective
broadcast to every engine worker (NCCL from the trainer's own GPU, gloo on CPU). The engines' side is
:class:`gymrl.rollout.weight_sync.WeightSyncExtension`.
"""

import logging
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ray
import torch

from gymrl.envs.launcher import free_port
from gymrl.rollout.pool import EnginePool
from gymrl.rollout.weight_sync import (
    broadcast,
    broadcast_group,
    cuda_ipc_payload,
    device_uuid,
    pack_flat,
    pack_policy,
    pack_state_dict,
    policy_tensors,
    unpack_flat,
)

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """``train.weight_sync`` asks for a way that this placement of trainer and engines cannot use."""


def choose_method(wanted: str, trainer_gpu: str | None, engine_gpus: list[str | None]) -> str:
    """The way a push goes, given the GPU (UUID; None on CPU) of the trainer (the sharded trainer's rank 0) and of
    every engine worker."""
    if wanted == "bytes" or (wanted == "auto" and trainer_gpu is None):
        return "bytes"
    shared = [g == trainer_gpu for g in engine_gpus] if trainer_gpu is not None else [False] * len(engine_gpus)
    if wanted == "auto":
        return "ipc" if all(shared) else "broadcast" if not any(shared) else "bytes"
    if wanted == "ipc" and not all(shared):
        raise WeightSyncError("train.weight_sync: ipc needs every engine on the trainer's GPU, and "
                              f"{shared.count(False)} of {len(shared)} engine workers are not; use broadcast or auto")
    if wanted == "broadcast" and any(shared):
        raise WeightSyncError("train.weight_sync: broadcast needs the trainer on a device of its own (NCCL refuses "
                              f"two members on one GPU), and {shared.count(True)} engine worker(s) share its GPU; use "
                              "ipc or auto")
    return wanted


# The engine workers' method that loads one bucket of a push in parts, by way.
PART_METHODS = {"bytes": "gymrl_load_part", "ipc": "gymrl_load_part_ipc", "broadcast": "gymrl_load_part_broadcast"}
Part = tuple[bytes, int, Callable[[], None] | None]  # a bucket's payload for the engines, its bytes, its sending


@dataclass(frozen=True)
class RemoteSender:
    """The sender of a broadcast when it is not this process (rank 0 of the sharded trainer): where the group can
    meet, on its node (host, port), and joining the group as its rank 0 (host, port, world size)."""

    address: Callable[[], tuple[str, int]]
    join: Callable[[str, int, int], None]


class WeightPusher:
    """Pushes the trainer's policy into every engine of ``pool`` the configured way (chosen at the first push,
    when the engines' devices are known). ``sender``: who sends a broadcast, if not this process."""

    def __init__(self, pool: EnginePool, wanted: str, device: torch.device, engine_dtype: str,
                 sender: RemoteSender | None = None):
        self.pool, self.wanted, self.device = pool, wanted, device
        self.sender = sender
        self.dtype = None if engine_dtype == "auto" else getattr(torch, engine_dtype)  # what the engines hold
        self.method: str | None = None
        self._group = None
        self._group_restarts = -1  # the pool's restart count when the group formed: a new engine must join
        self._flat: torch.Tensor | None = None  # kept alive: IPC maps it, a restarted engine is loaded from it
        self.last: dict[str, float] = {}  # the newest push: bytes sent, seconds packing, sending, in all

    def push(self, policy, mtp, version: int, recompute_kv: bool) -> float:
        """Load the policy (and the MTP layer, if given) into every engine; returns the wall time."""
        started = time.perf_counter()
        self.choose(device_uuid(self.device))
        sent = {"send_s": 0.0}
        if self.method == "bytes":
            blob = pack_policy(policy, mtp)
            packed, size = time.perf_counter(), len(blob)
            self.pool.update_weights(blob, version, recompute_kv)
        else:
            self._flat = None  # the last push's buffer goes before the new one is built
            flat, layout = pack_flat(policy_tensors(policy, mtp), self.dtype)
            self._flat = flat
            packed, size = time.perf_counter(), flat.numel()
            replay = lambda: pack_state_dict({k: v.cpu() for k, v in unpack_flat(flat, layout).items()})  # noqa: E731
            if self.method == "ipc":
                self.pool.update_weights(cuda_ipc_payload(flat, layout), version, recompute_kv,
                                         "gymrl_load_weights_ipc", replay=replay)
            else:
                self._join()

                def send() -> None:
                    begin = time.perf_counter()
                    broadcast(self._group, flat)
                    sent["send_s"] = time.perf_counter() - begin

                self.pool.update_weights(pickle.dumps((layout, flat.numel())), version, recompute_kv,
                                         "gymrl_load_weights_broadcast", meanwhile=send, replay=replay)
        total = time.perf_counter() - started
        self.last = {"bytes": float(size), "pack_s": packed - started, "total_s": total} | sent
        return total

    def choose(self, trainer_gpu: str | None) -> str:
        """The way every push goes, chosen once (:func:`choose_method`)."""
        if self.method is None:
            gpus = [g for per_engine in self.pool.worker_call("gymrl_device_uuid") for g in per_engine]
            self.method = choose_method(self.wanted, trainer_gpu, gpus)
            log.info("weight sync: %s (train.weight_sync=%s)", self.method, self.wanted)
        return self.method

    def push_parts(self, parts: Iterable[Part], version: int, recompute_kv: bool, replay: Callable[[], bytes]) -> float:
        """Load weights that come bucket by bucket (the sharded trainer gathers each while the engines load the one
        before) into every engine, inside one pause, the chosen way: each part is a bucket's payload for the engines'
        :data:`PART_METHODS` worker method, its size, and the sending that a broadcast needs. ``replay``: all the
        weights in one blob, for an engine restarted meanwhile or later. Returns the wall time."""
        started = time.perf_counter()
        if self.method == "broadcast":
            self._join()
        sent = {"bytes": 0.0, "buckets": 0.0, "largest_bytes": 0.0}
        method = PART_METHODS[self.method]

        def calls():
            yield "gymrl_begin_reload", None, None
            for payload, size, send in parts:
                sent["bytes"] += size
                sent["buckets"] += 1
                sent["largest_bytes"] = max(sent["largest_bytes"], float(size))
                yield method, payload, send
            yield "gymrl_end_reload", None, None

        self.pool.update_weights_in_parts(calls(), version, recompute_kv, replay)
        total = time.perf_counter() - started
        self.last = sent | {"total_s": total}
        return total

    def _join(self) -> None:
        """Form the broadcast group (the trainer is rank 0; engine e's workers follow in order), again after an
        engine restart, since a new engine was not in the old group."""
        if self._group_restarts == self.pool.restarts:
            return
        restarts = self.pool.restarts
        sizes = [len(w) for w in self.pool.worker_call("gymrl_device_uuid")]
        world = 1 + sum(sizes)
        if self.sender is None:
            host = ray.util.get_node_ip_address()
            port = free_port(host)
        else:
            host, port = self.sender.address()
        joins = [pickle.dumps((host, port, world, 1 + sum(sizes[:e]))) for e in range(len(sizes))]
        group = None

        def join_as_sender():
            nonlocal group
            group = broadcast_group(host, port, 0, world, self.device)

        send = join_as_sender if self.sender is None else lambda: self.sender.join(host, port, world)
        self.pool.worker_call("gymrl_join_broadcast", joins, meanwhile=send)
        self._group, self._group_restarts = group, restarts
        log.info("weight broadcast group: %d members", world)
