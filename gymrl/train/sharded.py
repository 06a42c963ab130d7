"""The sharded trainer (``train.workers`` > 1): N Ray actors, one ``torch.distributed`` rank each (gloo on cpu, NCCL
on cuda), every one holding a shard of the policy and of its AdamW state (FSDP2: one unit per decoder layer, plus
the root).

Each step's batch is split across the ranks by tokens (:func:`split_by_tokens`), and every rank runs the same
micro-batch code as the in-process trainer (:func:`gymrl.train.accumulate.backward_micro_batch`), each micro-batch
weighted by its share of the *whole* batch. FSDP's gradient reduction is set to a sum (divide factor 1), so the
summed gradient on every shard is the one-process gradient of the full batch. Clipping uses the global norm
(``clip_grad_norm_`` on the DTensor gradients).

A push gathers the full weights onto rank 0 tensor by tensor in buckets of at most ``train.push_bucket_mb``, and the
engines load each bucket as it comes, inside one pause (vLLM's layerwise reload over several calls): by bytes each
bucket goes through the driver, which loads it into its own copy of the policy (``session.policy``: what the run
saves at its end and what a restarted engine gets); by ipc or broadcast (``train.weight_sync``) it goes from rank 0's
device, once the driver's copy was refreshed by bytes. A checkpoint is the one-process trainer's folder plus each
rank's shards of the weights and the AdamW state (``torch.distributed.checkpoint``).

A rank that dies or fails (a SIGKILL, an OOM kill, an error) stops the run at once: the driver waits on the ranks'
calls together (:meth:`ShardedTrainer.wait`), raises :class:`TrainerRankError` naming the rank, and kills the others,
which would otherwise wait in a collective; ``train.collective_timeout_s`` bounds a rank that hangs alive.
"""

import functools
import logging
import pickle
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gymrl.config import RunConfig
from gymrl.envs.launcher import free_port
from gymrl.memory import held_bytes, process_memory
from gymrl.models.checkpoint import load_policy
from gymrl.models.checkpoint_files import checkpoint_tensors
from gymrl.resources import ray_node
from gymrl.rollout.runner import Rollout, RolloutBatch
from gymrl.rollout.weight_sync import (
    broadcast,
    broadcast_group,
    cuda_ipc_payload,
    device_uuid,
    pack_flat,
    pack_policy,
    pack_state_dict,
    reloads_last,
    untied,
)
from gymrl.session import Session
from gymrl.train.accumulate import (
    MicroBatch,
    StepResult,
    Totals,
    backward_batch,
    backward_micro_batch,
    batch_advantages,
    loss_setup,
    step_result,
)
from gymrl.train.checkpoint import (
    POLICY,
    SHARDS,
    TRAINER_STATE,
    CheckpointError,
    load_checkpoint,
    read_shards,
    save_checkpoint,
)
from gymrl.train.trainer import TrainerBase, checkpoint_activations, checkpoint_mtp_layer, compile_layers, lr_factor
from gymrl.train.weight_push import RemoteSender, WeightPusher

log = logging.getLogger(__name__)


def split_by_tokens(lengths: list[int], ranks: int) -> list[list[int]]:
    """Indices of the sequences each rank trains on, balanced by tokens: longest first, each to the rank with the
    fewest tokens so far (ties to the lower rank); each rank's indices in batch order."""
    loads, shares = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        rank = loads.index(min(loads))
        loads[rank] += lengths[i]
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, mixed: MixedPrecisionPolicy | None) -> None:
    """FSDP2 in place: one unit per decoder layer, then the root (embeddings, final norm, head)."""
    kwargs = {"mesh": mesh} | ({"mp_policy": mixed} if mixed is not None else {})
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():  # sum, not average, over ranks: each rank's loss is already its share
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


class TrainerRank:
    """One rank of the sharded trainer (a Ray actor): its shard of the policy, the reference policy (beta > 0) and
    the AdamW state."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self._flats: dict[int, torch.Tensor] = {}  # rank 0: the newest buckets of a push by ipc or broadcast
        self._group = None  # rank 0: its broadcast group with the engines' workers

    def address(self) -> tuple[str, int]:
        """Where a process group can meet on this rank's node (rank 0 is asked): its address and a free port."""
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def join(self, init_method: str, world: int, model_path: str) -> None:
        """Join the process group, then load the policy (and the reference, beta > 0) and shard it."""
        cfg = self.cfg
        cuda = cfg.train.device == "cuda"
        if cuda:
            torch.cuda.set_device(0)  # Ray gave this actor one GPU
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=self.rank, world_size=world,
                                timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        mesh = init_device_mesh(self.device.type, (world,))  # FSDP's default is a CUDA mesh wherever a GPU is seen
        bf16 = cfg.train.dtype == "bfloat16"
        # On cuda in bfloat16: float32 shards (the AdamW master weights), bfloat16 compute, float32 reductions.
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda and bf16 else None
        self.dtype = dtype = "float32" if mixed is not None else cfg.train.dtype
        policy, tokenizer = load_policy(model_path, dtype)
        self.setup = loss_setup(cfg.train, cfg.sampling.max_tokens, tokenizer, policy, self.device)
        self.reference = None
        if cfg.train.beta > 0:  # the initial policy, sharded the same way, never trained
            self.reference, _ = load_policy(model_path, dtype)
            self.reference.eval().requires_grad_(False)
            shard_model(self.reference, mesh, mixed)
        if cfg.train.activation_checkpointing:
            checkpoint_activations(policy)
        if cfg.train.compile:  # before sharding, as FSDP2 expects
            compile_layers(policy)
        shard_model(policy, mesh, mixed)
        self.policy = policy.train()
        self.optimizer = self.adamw(self.policy)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.steps))

    def adamw(self, model: torch.nn.Module) -> torch.optim.AdamW:
        return torch.optim.AdamW(model.parameters(), lr=self.cfg.train.learning_rate,
                                 weight_decay=self.cfg.train.weight_decay)

    def step(self, rollouts: list[Rollout], advantages: torch.Tensor, totals: Totals, passes: int,
             filler: Rollout) -> tuple[list[MicroBatch], float]:
        """This rank's micro-batches, then ``passes`` - their number uncounted ones on ``filler`` (every rank runs
        as many forward and backward passes as the busiest, or the collectives would wait forever); the global
        gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = backward_batch(self.policy, self.reference, None, rollouts, advantages, self.setup, totals,
                               self.cfg.train.micro_batch_size)
        for _ in range(passes - len(parts)):
            backward_micro_batch(self.policy, self.reference, None, [filler], torch.zeros(1), self.setup, totals,
                                 counted=False)
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return parts, float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def node(self) -> dict[str, str]:
        return ray_node()

    def memory(self, reset_peak: bool = False) -> dict[str, int]:
        """This rank's local bytes of parameters and AdamW state, and its process's resident and peak resident
        bytes (``reset_peak``: the peak restarts from now), for ``gymrl bench --suite scale``."""
        return held_bytes(self.policy, self.optimizer) | process_memory(reset_peak)

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def save_shards(self, folder: str) -> None:
        """Write this rank's shards of the weights and the AdamW state (every rank writes its own files)."""
        model, optim = get_state_dict(self.policy, self.optimizer)
        dcp.save({"model": model, "optim": optim}, checkpoint_id=folder)

    def load_shards(self, folder: str, scheduler: dict) -> None:
        """Read the shards :meth:`save_shards` wrote (by any number of ranks), and the scheduler's state."""
        model, optim = get_state_dict(self.policy, self.optimizer)  # the AdamW state initialised, to be filled
        state = {"model": model, "optim": optim}
        read_shards(state, folder)
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(scheduler)

    def load_one_process(self, folder: str) -> None:
        """Read a checkpoint of the one-process trainer (train.workers=1): the full weights (``policy/``), and the
        AdamW and scheduler state of ``trainer_state.pt``. Its AdamW state is keyed by parameter index; a plain copy
        of the policy with a plain AdamW turns it into the by-name form that ``set_state_dict`` takes, and each rank
        keeps its shard of it. For the while, a rank holds a full copy of the weights and of the AdamW moments
        (those memory-mapped from the file): about three times the model's size besides its shards."""
        plain, _ = load_policy(Path(folder) / POLICY, self.dtype)
        saved = torch.load(Path(folder) / TRAINER_STATE, weights_only=True, mmap=True)
        optimizer = self.adamw(plain)
        optimizer.load_state_dict(saved["optimizer"])
        full = StateDictOptions(full_state_dict=True)
        model, optim = get_state_dict(plain, optimizer, options=full)
        set_state_dict(self.policy, self.optimizer, model_state_dict=model, optim_state_dict=optim, options=full)
        self.scheduler.load_state_dict(saved["scheduler"])

    def bucket_names(self, bucket_bytes: int) -> list[list[str]]:
        """The names of the full weights, in the order a push sends them, grouped in buckets of at most
        ``bucket_bytes`` (a larger tensor alone). A tied weight goes once, under its first name; Mamba-2's ``A_log``
        goes after the rest (:func:`~gymrl.rollout.weight_sync.reload_order`)."""
        ties = ({n for n, _ in self.policy.named_parameters(remove_duplicate=False)}
                - {n for n, _ in self.policy.named_parameters()})  # the second and later names of a shared parameter
        state = self.policy.state_dict()
        names = sorted((n for n in state if n not in ties), key=reloads_last)
        buckets, size = [[]], 0
        for name in names:
            nbytes = state[name].numel() * state[name].element_size()  # a DTensor's numel is the full tensor's
            if buckets[-1] and size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(name)
            size += nbytes
        return buckets

    def gather_bucket(self, index: int, names: list[str], way: str = "bytes", dtype: torch.dtype | None = None):
        """Bucket ``index`` (``names``) of a push, its full tensors gathered one at a time (every rank takes part).
        Rank 0 answers: for bytes, the tensors on CPU; for ipc or broadcast, the engines' payload (and its bytes) of
        one flat buffer of them in ``dtype``, which it keeps on its device while it gathers the next bucket (the
        engines read it meanwhile). The others answer None."""
        state, bucket = self.policy.state_dict(), {}
        for name in names:
            full = state[name].full_tensor() if isinstance(state[name], DTensor) else state[name]
            if self.rank == 0:
                bucket[name] = full.detach().to("cpu", copy=True) if way == "bytes" else full.detach()
            del full
        if self.rank != 0:
            return None
        if way == "bytes":
            return bucket
        self._flats = {i: flat for i, flat in self._flats.items() if i == index - 1}
        flat, layout = pack_flat(checkpoint_tensors(self.policy, bucket), dtype)
        self._flats[index] = flat
        return (cuda_ipc_payload(flat, layout) if way == "ipc" else pickle.dumps((layout, flat.numel()))), flat.numel()

    def device_uuid(self) -> str | None:
        return device_uuid(self.device)

    def join_broadcast(self, host: str, port: int, world: int) -> None:
        """Join the engines' workers in a broadcast group as its sender (rank 0; they join at the same time)."""
        self._group = broadcast_group(host, port, 0, world, self.device)

    def send_bucket(self, index: int) -> None:
        broadcast(self._group, self._flats[index])


class TrainerRankError(RuntimeError):
    """A rank of the sharded trainer died or failed; every rank has been stopped, the run cannot go on."""


class ShardedTrainer(TrainerBase):
    """The trainer of ``train.workers`` > 1: the driver's side, with :class:`~gymrl.train.loop.GRPOTrainer`'s
    interface (step, push_weights, learning_rate, checkpoints)."""

    def __init__(self, session: Session):
        self.s, self.cfg = session, session.cfg
        train = self.cfg.train
        self.policy = session.policy  # the driver's full copy: loaded with each push, saved at the end of the run
        self.mtp = checkpoint_mtp_layer(session)  # frozen (train.mtp_loss_weight is refused): saved as it was loaded
        self.version = 0
        # On cpu the ranks reserve no Ray CPU (the engines hold them, as the in-process trainer does not either).
        resources = {"num_gpus": 1, "num_cpus": 0} if train.device == "cuda" else {"num_cpus": 0}
        if train.ray_resources:  # the nodes that have them
            resources["resources"] = dict(train.ray_resources)
        actor = ray.remote(**resources)(TrainerRank)
        self.ranks = [actor.remote(self.cfg, rank) for rank in range(train.workers)]
        host, port = self.wait([self.ranks[0].address.remote()], "startup")[0]
        self.wait([r.join.remote(f"tcp://{host}:{port}", train.workers, str(session.model_path)) for r in self.ranks],
                  "startup")
        sender = RemoteSender(lambda: self.wait([self.ranks[0].address.remote()], "a broadcast's setup")[0],
                              lambda *group: self.wait([self.ranks[0].join_broadcast.remote(*group)],
                                                       "a broadcast's setup"))
        self.pusher = WeightPusher(session.pool, train.weight_sync, torch.device(train.device), self.cfg.engine.dtype,
                                   sender)
        log.info("sharded trainer: %d ranks (%s)", train.workers, "nccl" if train.device == "cuda" else "gloo")

    def step(self, batch: RolloutBatch) -> StepResult:
        started = time.perf_counter()
        rollouts = batch.rollouts
        advantages = batch_advantages(batch, self.cfg.train.scale_rewards)
        totals = Totals(tokens=max(1, batch.num_tokens), sequences=len(rollouts))
        shares = split_by_tokens([len(r.prompt_ids) + len(r.completion_ids) for r in rollouts], len(self.ranks))
        mb = self.cfg.train.micro_batch_size
        passes = max(-(-len(share) // mb) for share in shares)
        filler = min(rollouts, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
        results = self.wait([rank.step.remote([rollouts[i] for i in share], advantages[share], totals, passes, filler)
                             for rank, share in zip(self.ranks, shares)], f"step {self.version + 1}")
        self.version += 1
        return step_result([p for parts, _ in results for p in parts], totals, started, results[0][1])

    def wait(self, refs: list, what: str) -> list:
        """The results of one call per rank (``refs[i]``: rank i's), taken as they finish, so that the first rank
        to die or fail stops the run at once (:meth:`failed`) rather than after the others' collectives time out."""
        rank_of, results, pending = {ref: i for i, ref in enumerate(refs)}, {}, list(refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayError as err:
                raise self.failed(rank_of[ref], what, err) from err
        return [results[i] for i in range(len(refs))]

    def failed(self, rank: int, what: str, err: Exception) -> TrainerRankError:
        """Kill every rank (the survivors would wait in a collective) and say which one failed, and how. A rank
        that raised because a peer's connection closed is not the cause: a rank found dead is named instead."""
        if not isinstance(err, ray.exceptions.RayActorError):
            pings = {r.__ray_ready__.remote(): i for i, r in enumerate(self.ranks) if i != rank}
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=5.0) if pings else ([], [])
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as dead:
                    rank, err = pings[ref], dead
                    break
        self.close()
        if isinstance(err, ray.exceptions.RayActorError):
            how = "died"
        else:
            how, err = "failed", getattr(err, "cause", None) or err
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        return TrainerRankError(f"trainer rank {rank} of {len(self.ranks)} {how} during {what}; every rank was "
                                f"stopped ({detail[:400]})")

    def close(self) -> None:
        """Stop the ranks (the driver's copy of the policy, loaded at every push, outlives them)."""
        for actor in self.ranks:
            ray.kill(actor)

    def learning_rate(self) -> float:
        return self.wait([self.ranks[0].learning_rate.remote()], "a learning-rate query")[0]

    def nodes(self) -> list[dict[str, str]]:
        """The Ray node of each rank (train.ray_resources places them)."""
        return self.wait([r.node.remote() for r in self.ranks], "a placement query")

    def gathered(self, what: str, way: str = "bytes") -> Iterator[tuple[int, Any]]:
        """Rank 0's answer to each bucket's gather (:meth:`TrainerRank.gather_bucket`, train.push_bucket_mb), with
        the bucket's index. Rank 0 gathers the next bucket while the caller uses this one: it holds two at most."""
        plan = self.wait([self.ranks[0].bucket_names.remote(self.cfg.train.push_bucket_mb * 2**20)], what)[0]
        names = set(untied(self.policy.state_dict()))
        if {n for bucket in plan for n in bucket} != names:
            raise RuntimeError(f"the ranks' weights differ from the driver's policy: "
                               f"{sorted(names.symmetric_difference(n for b in plan for n in b))[:3]}")

        def gather(i: int) -> list:
            return [r.gather_bucket.remote(i, plan[i], way, self.pusher.dtype) for r in self.ranks]

        gathering = gather(0)
        for i in range(len(plan)):
            refs = gathering
            if i + 1 < len(plan):  # the ranks run their calls in order: this one starts as soon as the last ends
                gathering = gather(i + 1)
            yield i, self.wait(refs, what)[0]

    def buckets(self, what: str) -> Iterator[dict[str, torch.Tensor]]:
        """The ranks' full weights on CPU, bucket by bucket, each loaded into the driver's policy before it is
        yielded."""
        for _, bucket in self.gathered(what):
            self.policy.load_state_dict(bucket, strict=False)
            yield bucket

    def gather(self) -> None:
        """Load the ranks' full weights into the driver's policy (what a checkpoint and the run's end save)."""
        for _ in self.buckets(f"the gathering of the weights after step {self.version}"):
            pass

    def push_weights(self) -> float:
        """Push the ranks' weights into every engine bucket by bucket, inside one pause of the engines (train.
        push_bucket_mb). By bytes each bucket goes through the driver, which loads it into its own policy as it
        passes. By ipc or broadcast each goes from rank 0's device, once the driver's policy was brought up to date
        (an engine restarted later, and the run's end, take that). Returns the wall time."""
        started = time.perf_counter()
        what = f"the push after step {self.version}"
        way = self.pusher.method or self.pusher.choose(self.wait([self.ranks[0].device_uuid.remote()], what)[0])

        def by_bytes():
            for bucket in self.buckets(what):
                blob = pack_state_dict(checkpoint_tensors(self.policy, bucket))
                yield blob, len(blob), None

        def from_rank0():
            for i, (payload, size) in self.gathered(what, way):
                send = (lambda i=i: self.wait([self.ranks[0].send_bucket.remote(i)], what)) if way == "broadcast" else None
                yield payload, size, send

        if way != "bytes":
            self.gather()
        self.pusher.push_parts(by_bytes() if way == "bytes" else from_rank0(), self.version,
                               self.cfg.engine.recompute_kv_on_update, replay=lambda: pack_policy(self.policy))
        return time.perf_counter() - started

    def load_checkpoint(self, path: Path) -> dict:
        """Restore the driver's policy and RNG states, and every rank's weights, AdamW state and scheduler: from the
        shards of a checkpoint of the sharded trainer (written by any number of ranks), or from the full state of
        one of the one-process trainer."""
        saved = load_checkpoint(path, self.policy, None, None, self.mtp, sharded=True)
        shards = Path(path) / SHARDS
        refs = ([r.load_shards.remote(str(shards), saved["rank_scheduler"]) for r in self.ranks] if shards.is_dir()
                else [r.load_one_process.remote(str(path)) for r in self.ranks])
        try:
            self.wait(refs, f"the restore of checkpoint '{path}'")
        except TrainerRankError as err:
            raise CheckpointError(f"cannot restore checkpoint '{path}' on the ranks: {err}") from err
        self.version = saved["policy_version"]
        return saved

    def save_checkpoint(self, run_dir: Path, step: int, state: dict, keep: int) -> None:
        """The one-process checkpoint's folder (the full policy, an HF folder; the run's state) plus ``shards/``:
        each rank's weights and AdamW state (torch.distributed.checkpoint, so the ranks need one filesystem)."""
        self.gather()
        scheduler = self.wait([self.ranks[0].scheduler_state.remote()], f"the checkpoint of step {step}")[0]
        save_checkpoint(run_dir, step, self.policy, self.s.tokenizer, None, None, state | {"rank_scheduler": scheduler},
                        keep=keep, mtp_layer=self.mtp,
                        write_shards=lambda folder: self.wait([r.save_shards.remote(str(folder)) for r in self.ranks],
                                                                 f"the checkpoint of step {step}"))
