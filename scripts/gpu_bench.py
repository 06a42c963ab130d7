"""GPU measurements of gymrl in as few engine start-ups as fit a device call (docs/gpu.md, docs/benchmarks.md).

    python3 scripts/gpu_bench.py build [--config C]          # copy bandwidth; build the model on the GPU
    python3 scripts/gpu_bench.py engines --spec 0,1 [...]    # one engine per k: decode tok/s, acceptance;
                                                            # k=0 also harness vs raw and the weight pushes;
                                                            # --sampled-prompts 1,4,64: sampled at other batches
    python3 scripts/gpu_bench.py drafts --spec 1 [--label L] # one engine, one sequence at a time: each draft's
                                                            # fate and inputs against the trainer's own drafts
    python3 scripts/gpu_bench.py trainer --micro 16,64      # the trainer alone: tokens/s, MFU, a profile
    python3 scripts/gpu_bench.py fsdp [--steps N]            # train.workers=1 under FSDP2 vs the one-process trainer
    python3 scripts/gpu_bench.py train --trl transformers,vllm [--no-peer-eval]  # the push; gymrl sync/async vs TRL

Each part adds to WORK/results.json (WORK: --work, /tmp/gpubench by default, kept between calls while the
machine is warm) and writes results.json + results.md into $OUT when set. All engines are gymrl's own
(``start_engines``: a Ray actor hosting vLLM's AsyncLLM), with the config's engine keys.
"""

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not on the GPU machine


def _median(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def copy_bandwidth(gib: float = 2.0, repeats: int = 20, src_device: str = "cuda:0", dst_device: str = "cuda:0") -> dict:
    """Device-to-device copy of a ``gib`` GiB random buffer (within a GPU, or from one GPU to another), timed with
    CUDA events on the source's stream (median)."""
    import torch

    n = int(gib * 2**30)
    torch.cuda.set_device(torch.device(src_device))
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=src_device)
    dst = torch.empty(n, dtype=torch.uint8, device=dst_device)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    assert torch.equal(dst[:: 2**20], src[:: 2**20])
    t = statistics.median(times)
    return {"bytes": n, "seconds": t, "copied_GBps": n / t / 1e9, "read_plus_written_GBps": 2 * n / t / 1e9}


def part_build(cfg, work: Path) -> dict:
    import torch

    from gymrl.envs.registry import load_environment
    from gymrl.session import resolve_model_path

    torch.set_float32_matmul_precision("high")  # TF32 for the float32 warm-up
    bandwidth = copy_bandwidth() if torch.cuda.is_available() else None  # None: a CPU rehearsal
    started = time.perf_counter()
    envs = [load_environment(e.name, e.args) for e in cfg.envs]
    path = resolve_model_path(cfg.model, envs, [e.weight for e in cfg.envs])
    report = json.loads((path / "warmup.json").read_text())
    from gymrl.models.checkpoint_files import inspect_checkpoint

    info = inspect_checkpoint(path)
    return {"copy_bandwidth": bandwidth, "model": {
        "path": str(path), "architecture": info.architectures, "parameters_in_checkpoint": info.num_parameters,
        "mtp_layers": info.mtp_layers, "build_seconds": time.perf_counter() - started, "warmup": report}}


def _prompts(cfg, tokenizer, count: int) -> list[list[int]]:
    from gymrl.envs.registry import load_environment
    from gymrl.rollout.runner import encode_prompt

    env = load_environment(cfg.envs[0].name, cfg.envs[0].args)
    return [encode_prompt(tokenizer, t, cfg.rollout.chat_template_kwargs) for t in env.tasks("train")[:count]]


def _rate(actor, prompts, n, sampling, repeats: int) -> dict:
    import ray

    from gymrl.rollout.engine import SpecStats

    ray.get(actor.timed_generate.remote(prompts, n, sampling))  # warm-up
    rates, stats, tokens = [], [], []
    for _ in range(repeats):
        t, s, spec = ray.get(actor.timed_generate.remote(prompts, n, sampling))
        rates.append(t / s)
        tokens.append(t)
        stats.append(spec)
    total = SpecStats.total(stats)
    return {"tokens_per_s": _median(rates), "tokens_per_call": _median(tokens), "sequences": len(prompts) * n,
            "mean_completion_tokens": statistics.median(tokens) / (len(prompts) * n), "spec": None if total is None else {
        "drafts": total.drafts, "draft_tokens": total.draft_tokens, "accepted_tokens": total.accepted_tokens,
        "acceptance": total.acceptance, "mean_acceptance_length": total.mean_accepted_length}}


def trace_summary(path: Path) -> dict:
    """What a torch profiler trace (Chrome JSON, gzipped or not) says of the device: the union of its kernels' and
    copies' intervals, and how the host launched them (one cudaGraphLaunch replays a whole CUDA graph; every other
    kernel is a launch of its own)."""
    import gzip

    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, -math.inf
    for start, stop in device:  # the union: overlapping kernels (several streams) count once
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    calls = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            calls[e["name"]] = calls.get(e["name"], 0) + 1
    return {"device_busy_s": busy / 1e6, "device_ops": len(device), "graph_launches": calls.get("cudaGraphLaunch", 0),
            "kernel_launches": sum(n for name, n in calls.items() if "LaunchKernel" in name)}


def _profiled_rate(actor, prompts, n, sampling, trace_dir: Path) -> dict:
    """One generate call under vLLM's profiler, summarised per engine step: the device's busy time against the
    call's wall time, and the host's launches. Steps: a sequence's tokens without drafts, its drafts with them."""
    import ray

    ray.get(actor.profile.remote(True))
    try:
        tokens, seconds, spec = ray.get(actor.timed_generate.remote(prompts, n, sampling))
    finally:
        ray.get(actor.profile.remote(False))
    traces = sorted(trace_dir.rglob("*.json*"), key=lambda f: f.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"vLLM's profiler wrote no trace into {trace_dir}")
    sequences = len(prompts) * n
    steps = (spec.drafts if spec is not None and spec.drafts else tokens) / sequences
    out = {"trace": str(traces[-1]), "sequences": sequences, "tokens": tokens, "wall_s": seconds, "steps": steps,
           **trace_summary(traces[-1])}
    out["per_step_ms"] = {key: out[key] * 1e3 / steps for key in ("wall_s", "device_busy_s")}
    out["per_step_launches"] = {key: out[key] / steps for key in ("graph_launches", "kernel_launches")}
    return out


def _greedy_match(pool, policy, prompts, sampling) -> dict:
    """How much of the engine's greedy text is the trainer's own greedy choice, teacher-forced on that text: drafts
    must not change what a greedy engine writes, so an MTP engine should score as the plain one does (both bf16, so
    near-ties may differ)."""
    from gymrl.train.policy import greedy_hits

    gen = pool.generate(prompts, 1, sampling)
    same = total = whole = 0
    first_miss = []
    for prompt, (completion,) in zip(prompts, gen.groups):
        hits = greedy_hits(policy, prompt, completion.token_ids)
        same, total, whole = same + sum(hits), total + len(hits), whole + all(hits)
        first_miss.append(hits.index(False) if not all(hits) else len(hits))
    return {"tokens_matching_trainer": same / total, "sequences_matching_trainer": whole / len(prompts),
            "first_mismatch_token": _median(first_miss)}


def _pushes(pool, policy, prompts, repeats: int) -> dict:
    """The same bf16 weights pushed into the live engine two ways, and a check that each lands."""
    import torch

    from gymrl.models.checkpoint_files import checkpoint_tensors
    from gymrl.rollout.weight_sync import cuda_ipc_payload, pack_flat, pack_state_dict

    state = checkpoint_tensors(policy, policy.state_dict())  # vLLM reloads checkpoint names (experts split)
    seqs = [p + p[:8] for p in prompts[:4]]
    base = pool.score(seqs)

    def gap(scores) -> float:
        return max(abs(a - b) for s, t in zip(scores, base) for a, b in zip(s, t))

    out: dict = {}
    version = 1
    for label in ("bytes", "ipc") if torch.cuda.is_available() else ("bytes",):
        total, load, pack = [], [], []
        for _ in range(repeats):
            if torch.cuda.is_available():  # a CPU rehearsal has nothing to wait for
                torch.cuda.synchronize()
            started = time.perf_counter()
            if label == "bytes":  # the CPU path: safetensors blob through Ray, reload in the worker
                blob, method = pack_state_dict(state), "gymrl_load_weights"
                size = len(blob)
            else:  # one GPU: one flat CUDA buffer, its IPC handle through Ray, reload from views of it
                flat, layout = pack_flat(state)
                torch.cuda.synchronize()
                blob, method = cuda_ipc_payload(flat, layout), "gymrl_load_weights_ipc"
                size = flat.numel()
            pack.append(time.perf_counter() - started)
            (update,) = pool.update_weights(blob, version, method=method)
            total.append(time.perf_counter() - started)
            load.append(update.load_seconds)
            version += 1
        out[label] = {"weight_bytes": size, "push_s": _median(total), "pack_s": _median(pack),
                      "engine_load_s": _median(load), "push_GBps": size / statistics.median(total) / 1e9,
                      "logprob_gap_after_same_weights": gap(pool.score(seqs))}
    if not torch.cuda.is_available():
        return out
    # An IPC push of changed weights must change the engine's logprobs; the bytes path then restores them.
    # The input embedding: ``embed_tokens`` (Qwen2, DeepSeek-V3), ``backbone.embeddings`` (Nemotron-H).
    embedding = next(k for k in state if k.endswith(("embed_tokens.weight", "embeddings.weight")))
    changed = {**state, embedding: state[embedding] * 0.5}
    flat, layout = pack_flat(changed)
    pool.update_weights(cuda_ipc_payload(flat, layout), version, method="gymrl_load_weights_ipc")
    out["ipc_changed_weights_logprob_gap"] = gap(pool.score(seqs))
    pool.update_weights(pack_state_dict(state), version + 1)
    out["restored_logprob_gap"] = gap(pool.score(seqs))
    return out


def async_speedup(runs: dict) -> dict:
    """Async over sync steps/s, achieved (sync s/step over async s/step) and ideal: the sync step's decoding and
    training fully overlapped, (decode + train) / max(decode, train)."""
    p = runs["gymrl sync"]["phases"]
    return {"achieved": runs["gymrl sync"]["step_s"]["median"] / runs["gymrl async"]["step_s"]["median"],
            "ideal": (p["engine_decode_s"] + p["train_s"]) / max(p["engine_decode_s"], p["train_s"])}


def part_train(cfg, work: Path, steps: int, repeats: int, trl: tuple[str, ...], evaluate_peer: bool = True) -> dict:
    """The trainer on a GPU of its own (bf16; the engine on GPU 0, the trainer on the last GPU): the weight push by
    NCCL broadcast against a copy between the two GPUs, then gymrl sync and async GRPO, and with ``trl`` TRL's
    GRPOTrainer (gymrl's vs-trl suite: same model, tasks, reward, batch, lengths, lr and seed; ``evaluate_peer``:
    score TRL's policies, which restarts the engines)."""
    import torch

    from gymrl.bench.vs_trl import compare_with_trl
    from gymrl.session import start_session
    from gymrl.train.policy import pad_batch, token_logprobs
    from gymrl.train.trainer import GRPOTrainer

    gpus = torch.cuda.device_count()
    out: dict = {"gpus": gpus, "copy_bandwidth": {}}  # no GPU: a CPU rehearsal
    if gpus:
        out["copy_bandwidth"]["within_gpu0"] = copy_bandwidth(src_device="cuda:0", dst_device="cuda:0")
    if gpus > 1:
        out["copy_bandwidth"][f"gpu{gpus - 1}_to_gpu0"] = copy_bandwidth(src_device=f"cuda:{gpus - 1}", dst_device="cuda:0")
    session = start_session(cfg)
    try:
        trainer = GRPOTrainer(session)  # moves the policy to its GPU; its pusher picks the way (auto)
        pushes = []
        for version in range(1, repeats + 2):
            trainer.version = version
            trainer.push_weights()
            pushes.append(trainer.pusher.last)
        pushes = pushes[1:]  # the first forms the broadcast group
        size = pushes[0]["bytes"]
        out["weight_push"] = {"method": trainer.pusher.method, "trainer_device": str(trainer.device),
                              "weight_bytes": size, "push_s": _median([p["total_s"] for p in pushes]),
                              "send_s": _median([p["send_s"] for p in pushes]),
                              "pack_s": _median([p["pack_s"] for p in pushes]),
                              "push_GBps": size / statistics.median(p["total_s"] for p in pushes) / 1e9,
                              # ipc has no send phase of its own (the engines map the trainer's buffer)
                              "send_GBps": size / send / 1e9 if (send := statistics.median(p["send_s"] for p in pushes)) else None}
        # The engine now holds the trainer's bf16 weights: its logprobs and the trainer's of the same tokens.
        prompts = _prompts(cfg, session.tokenizer, 4)
        seqs = [p + p[:8] for p in prompts]
        engine = session.pool.score(seqs)
        ids, attn, _ = pad_batch([s[:1] for s in seqs], [s[1:] for s in seqs], session.tokenizer.pad_token_id)
        with torch.no_grad():
            ours = token_logprobs(session.policy, ids.to(trainer.device), attn.to(trainer.device)).cpu()
        out["weight_push"]["max_logprob_gap_engine_vs_trainer"] = max(
            abs(a - float(b)) for e, o, s in zip(engine, ours, seqs) for a, b in zip(e, o[: len(s) - 1]))
        del trainer  # the runs build trainers of their own: this one (its reference copy, its buffers) must not stay
        try:
            out["vs_trl"] = compare_with_trl(session, work / "vs-trl", steps, trl, evaluate_peer)
            out["async_speedup"] = async_speedup(out["vs_trl"]["runs"])
        except Exception as err:  # keep the push figures above; the log has the traceback
            traceback.print_exc()
            out["vs_trl"] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        session.close()
    return out


def part_fsdp(cfg, work: Path, steps: int) -> dict:
    """``train.workers: 1`` under FSDP2 (one NCCL rank, a Ray actor with the GPU) against the one-process trainer on
    the same rollout batches (sampled once by the engine, which is then released): the loss and gradient norm of
    every step and the weights after the last, in float32 (both float32 throughout) and in bfloat16 (the
    one-process trainer holds bf16 weights; FSDP2 float32 shards with bf16 compute), and each trainer's s/step
    and peak GPU memory."""
    import ray
    import torch

    from gymrl.models.checkpoint import load_policy
    from gymrl.session import Session, start_session
    from gymrl.train.loop import TaskSampler
    from gymrl.train.sharded import ShardedTrainer
    from gymrl.train.trainer import GRPOTrainer

    session = start_session(cfg)
    try:
        sampler = TaskSampler(session, cfg.seed, cfg.train.prompts_per_step)
        batches = [session.runner.run(sampler.batch(b), cfg.train.group_size, cfg.sampling, 0, seed=b)
                   for b in range(steps)]
    finally:
        session.close()
    # What is compared is the trainers' arithmetic: rewards by completion length, so that every group has
    # advantages (the model's sudoku rewards are mostly all-zero groups, which give no gradient).
    for batch in batches:
        for r in batch.rollouts:
            r.reward = len(r.completion_ids) % 3 / 2
    model_path = session.model_path
    out: dict = {"steps": steps, "sequences_per_step": len(batches[0].rollouts),
                 "tokens_per_step": statistics.mean(b.num_tokens for b in batches)}

    def run(trainer) -> dict:
        times, results = [], []
        for batch in batches:
            started = time.perf_counter()
            results.append(trainer.step(batch))
            times.append(time.perf_counter() - started)
        return {"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
                "step_s": _median(times[1:] or times)}

    for dtype in ("float32", "bfloat16"):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"dtype": dtype, "workers": 1})})

        def session_of(c=c):
            policy, tokenizer = load_policy(model_path, c.train.dtype)
            return Session(c, {}, model_path, policy, tokenizer, pool=None, runner=None)

        cuda = torch.cuda.is_available()  # else a CPU rehearsal (gloo)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        one = GRPOTrainer(session_of())
        single = run(one)
        single["peak_gpu_GB"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        expected = {k: v.detach().float().cpu() for k, v in one.policy.state_dict().items()}
        del one
        if cuda:
            torch.cuda.empty_cache()
        sharded = ShardedTrainer(session_of())
        try:
            fsdp = run(sharded)
            fsdp["peak_gpu_GB"] = ray.get(sharded.ranks[0].__ray_call__.remote(
                lambda rank: torch.cuda.max_memory_allocated() / 1e9)) if cuda else None
            sharded.gather()
            got = {k: v.detach().float() for k, v in sharded.policy.state_dict().items()}
        finally:
            sharded.close()
        out[dtype] = {"one_process": single, "fsdp2_one_rank": fsdp,
                      "max_loss_gap": max(abs(a - b) for a, b in zip(single["loss"], fsdp["loss"])),
                      "max_grad_norm_gap": max(abs(a - b) for a, b in zip(single["grad_norm"], fsdp["grad_norm"])),
                      "max_weight_gap": max(float((got[k] - w).abs().max()) for k, w in expected.items())}
        print(json.dumps(out[dtype], indent=1), flush=True)
    return out


def _gpu_bytes(reset_peak: bool = False, peak: bool = False) -> int:
    """This process's allocated GPU bytes now (``reset_peak``: and the peak restarts here) or at their peak; 0 on CPU
    (a rehearsal)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    if reset_peak:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()


def part_push(cfg, work: Path, buckets_mb: list[int]) -> dict:
    """The sharded trainer's push (one NCCL rank, ``ShardedTrainer``) into the engine beside it on the one GPU, bucket
    by bucket from rank 0's device (ipc: Ray is told of two GPUs and sets no CUDA_VISIBLE_DEVICES, so the rank and
    the engine share GPU 0), per train.push_bucket_mb: its time, rank 0's peak GPU memory over it, and the engine's
    logprobs after it against those of the same weights pushed whole by bytes (the engine is first given other
    weights, so a push that did not land shows)."""
    import ray
    import torch

    from gymrl.rollout.weight_sync import pack_policy, pack_state_dict, policy_tensors
    from gymrl.session import start_session
    from gymrl.train.sharded import ShardedTrainer

    if torch.cuda.is_available():  # else a CPU rehearsal, by bytes
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # before Ray starts: its workers inherit it
        ray.init(num_gpus=2, include_dashboard=False, logging_level="WARNING")
    session = start_session(cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": 1})}))
    out: dict = {"buckets": []}
    try:
        pool, policy = session.pool, session.policy
        seqs = [p + p[:8] for p in _prompts(cfg, session.tokenizer, 4)]
        pool.update_weights(pack_policy(policy), 1)
        base = pool.score(seqs)
        state = policy_tensors(policy)  # a tied head once, as the embedding: a second, old copy would fight it
        embedding = next(k for k in state if k.endswith(("embed_tokens.weight", "embeddings.weight")))
        other = pack_state_dict({**state, embedding: state[embedding] * 0.5})

        def gap() -> float:
            return max(abs(a - b) for s, t in zip(pool.score(seqs), base) for a, b in zip(s, t))

        sharded = ShardedTrainer(session)
        rank0 = sharded.ranks[0]
        try:
            for mb in buckets_mb:
                pool.update_weights(other, 2)
                moved = gap()
                sharded.cfg = sharded.cfg.model_copy(update={"train": sharded.cfg.train.model_copy(
                    update={"push_bucket_mb": mb})})
                before = ray.get(rank0.__ray_call__.remote(lambda r: _gpu_bytes(reset_peak=True)))
                seconds = sharded.push_weights()
                peak = ray.get(rank0.__ray_call__.remote(lambda r: _gpu_bytes(peak=True)))
                row = {"push_bucket_mb": mb, "method": sharded.pusher.method, "push_s": seconds,
                       "rank0_peak_growth_GB": (peak - before) / 1e9, "logprob_gap_before": moved,
                       "logprob_gap_after": gap()} | sharded.pusher.last
                out["buckets"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            sharded.close()
    finally:
        session.close()
    return out


H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (the H200 has the same)


def active_matmul_parameters(policy) -> int:
    """The parameters one token multiplies by: all but the embedding lookup (a tied lm_head counted), and of a
    mixture of experts' stacked expert weights ([n_routed_experts, ...]) only the num_experts_per_tok it is routed to."""
    config = policy.config
    experts, per_token = getattr(config, "n_routed_experts", None), getattr(config, "num_experts_per_tok", None)
    total = 0
    for name, p in policy.named_parameters():
        if "embed_tokens" in name:
            continue
        stacked = experts and per_token and ".experts." in name and p.ndim == 3 and p.shape[0] == experts
        total += p.numel() * per_token // experts if stacked else p.numel()
    if getattr(config, "tie_word_embeddings", False):
        total += policy.get_input_embeddings().weight.numel()  # the tied lm_head multiplies too
    return total


def attention_layers(config) -> int:
    """Layers with softmax attention: all of a transformer's, the '*' of a hybrid's pattern (Nemotron-H: "attention"
    or "full_attention" by transformers version; its Mamba layers are "mamba" or "linear_attention")."""
    kinds = getattr(config, "layers_block_type", None)
    return sum(k in ("attention", "full_attention") for k in kinds) if kinds else config.num_hidden_layers


def part_trainer(cfg, work: Path, steps: int, micro_batch_sizes: list[int], compile_modes: list[bool]) -> dict:
    """The one-process trainer alone on the GPU (no engine): s/step, trained tokens/s and model FLOP utilisation on
    synthetic batches of the config's shape (:func:`gymrl.bench.scale.fixed_batch`, completions 40 to
    sampling.max_tokens long), per train.micro_batch_size and train.compile, and a profile of one step (the top CUDA
    kernels; the device's busy time, the sum of its kernels' own time, against the step's wall time: the rest is
    the device waiting for the host). FLOPs per trained token: 6 x the parameters of the matrix multiplies (forward
    2N, backward 4N; :func:`active_matmul_parameters`: the lm_head counted, the embedding lookup not, a routed
    expert's only for the tokens routed to it) plus attention's 6 x 2 x attention layers x hidden x the mean sequence length
    (QK^T and AV, forward and backward, causal halved). The old logprobs are the same forward's (TIS) or the
    engine's, so no extra scoring pass runs; beta > 0 would add a 2N reference forward."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from gymrl.bench.scale import fixed_batch
    from gymrl.envs.registry import load_environment
    from gymrl.models.checkpoint import load_policy
    from gymrl.session import Session, resolve_model_path
    from gymrl.train.trainer import GRPOTrainer

    envs = {e.name: load_environment(e.name, e.args) for e in cfg.envs}
    path = resolve_model_path(cfg.model, list(envs.values()), [e.weight for e in cfg.envs])
    out: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": {}}
    for compiled, mb in itertools.product(compile_modes, micro_batch_sizes):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": mb,
                                                                         "compile": compiled})})
        policy, tokenizer = load_policy(path, c.train.dtype)
        trainer = GRPOTrainer(Session(c, envs, path, policy, tokenizer, pool=None, runner=None))
        config = policy.config
        matmul = active_matmul_parameters(policy)
        batches = [fixed_batch(c, tokenizer, config.vocab_size, seed, min(40, c.sampling.max_tokens))
                   for seed in range(steps)]
        times = []
        for batch in batches:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            trainer.step(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        tokens = statistics.mean(sum(len(r.prompt_ids) + len(r.completion_ids) for r in b.rollouts) for b in batches)
        mean_len = tokens / len(batches[0].rollouts)
        per_token = 6 * matmul + 6 * 2 * attention_layers(config) * config.hidden_size * mean_len / 2
        step_s = statistics.median(times[1:])
        run = {"micro_batch_size": mb, "compile": compiled, "step_s": _median(times[1:]), "tokens_per_step": tokens,
               "tokens_per_s": tokens / step_s, "matmul_parameters": matmul, "flops_per_token": per_token,
               "mfu": tokens * per_token / step_s / H100_BF16_PEAK,
               "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
        if mb == micro_batch_sizes[0]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                trainer.step(batches[-1])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall = time.perf_counter() - started
            averages = prof.key_averages()
            # Only the kernels' own rows: an operator's row repeats the time of the kernels it launched.
            busy = (sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e6
                    if torch.cuda.is_available() else None)
            run["profiled_step"] = {"wall_s": wall, "device_busy_s": busy,
                                    "device_busy_fraction": None if busy is None else busy / wall}
            key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            run["profile"] = averages.table(sort_by=key, row_limit=25)
            print(run["profile"], flush=True)
        out["runs"][f"{mb}{' compiled' if compiled else ''}"] = run
        print(json.dumps({k: v for k, v in run.items() if k != "profile"}, indent=1), flush=True)
        del trainer, policy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return out


def _spec_engine(cfg, k: int, **engine_keys):
    """The config's engine with MTP k (0: none; the config's other speculative keys kept), one of it."""
    from gymrl.config import SpeculativeConfig

    base = cfg.engine.speculative_config
    if base is None or base.method != "mtp":
        base = SpeculativeConfig(method="mtp", num_speculative_tokens=1)
    spec = base.model_copy(update={"num_speculative_tokens": k}) if k else None
    return cfg.engine.model_copy(update={"speculative_config": spec, "num_engines": 1, **engine_keys})


def part_engines(cfg, work: Path, ks: list[int], repeats: int, greedy_prompts: int, sampled_prompts: list[int],
                 decode_only: bool, results: dict, save, profile_prompts: int = 0) -> None:
    """One engine per k into ``results``, saved after each (a call cut at its time limit keeps the ks it did).
    ``sampled_prompts``: further batch sizes (prompts, each sampled group_size times) of the sampled rate.
    ``decode_only``: leave out k=0's harness-vs-raw rates and weight pushes (about a minute at 1.25B).
    ``profile_prompts``: also profile one sampled call of that many prompts (:func:`_profiled_rate`), its trace
    under WORK/profile/mtp_K and vLLM's operator table copied into $OUT.
    Every engine runs vLLM's stat loggers (``engine.log_stats``): an MTP engine on vLLM 0.22 must, its drafts are
    counted through them, so k=0 does too, for like-for-like steps."""
    import ray
    import torch
    import vllm

    from gymrl.config import SamplingConfig
    from gymrl.models.checkpoint import load_policy
    from gymrl.rollout.pool import EnginePool, start_engines
    from gymrl.session import init_ray

    model = json.loads((work / "results.json").read_text())["build"]["model"]["path"]
    policy, tokenizer = load_policy(model)
    if torch.cuda.is_available():
        policy = policy.to("cuda", torch.bfloat16)  # the trainer's copy, as a bf16 CUDA trainer holds it
    greedy = (_prompts(cfg, tokenizer, greedy_prompts), 1,
              SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=cfg.sampling.max_tokens))
    sampled = (_prompts(cfg, tokenizer, cfg.train.prompts_per_step), cfg.train.group_size, cfg.sampling)
    batches = {p: (_prompts(cfg, tokenizer, p), cfg.train.group_size, cfg.sampling) for p in sampled_prompts}
    init_ray(cfg)
    results["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__, "ray": ray.__version__}
    for k in ks:
        key = f"mtp_{k}"
        trace_dir = work / "profile" / key
        extra_args = cfg.engine.extra_args
        if profile_prompts:  # the workers' trace only (no frontend's), without Python stacks: less host overhead
            extra_args = {**extra_args, "profiler_config": {"profiler": "torch", "torch_profiler_dir": str(trace_dir),
                                                            "torch_profiler_with_stack": False, "ignore_frontend": True}}
        engine_cfg = _spec_engine(cfg, k, log_stats=True, extra_args=extra_args)
        started = time.perf_counter()
        try:
            pool = EnginePool(start_engines(model, engine_cfg, cfg.seed))
        except Exception as err:  # noqa: BLE001 - record it and go on with the next k
            results[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            save()
            continue
        actor = pool.actors[0]
        try:
            info = ray.get(actor.ready.remote())
            r = {"engine_start_s": time.perf_counter() - started, "load_seconds": info["load_seconds"],
                 "speculative": info["speculative"], "spec_fallback": info["spec_fallback"],
                 "greedy": _rate(actor, *greedy, repeats), "sampled": _rate(actor, *sampled, repeats),
                 "sampled_by_prompts": {str(p): _rate(actor, *b, repeats) for p, b in batches.items()}}
            if profile_prompts:
                try:
                    r["profile"] = _profiled_rate(actor, _prompts(cfg, tokenizer, profile_prompts), cfg.train.group_size,
                                                  cfg.sampling, trace_dir)
                    if out := os.environ.get("OUT"):
                        for table in trace_dir.glob("*profiler_out*.txt"):  # one per worker: rank 0 alone here
                            (Path(out) / f"profile_{key}.txt").write_text(table.read_text())
                except Exception as err:  # noqa: BLE001 - keep the throughput figures
                    r["profile_error"] = f"{type(err).__name__}: {err}"[-2000:]
            try:
                r["greedy_vs_trainer"] = _greedy_match(pool, policy, greedy[0], greedy[2])
            except Exception as err:  # noqa: BLE001 - keep the throughput figures
                r["greedy_vs_trainer_error"] = f"{type(err).__name__}: {err}"[-2000:]
            if k == 0 and not decode_only:
                prompts, n, sampling = sampled
                raw, harness = [], []
                for _ in range(repeats):
                    t, s, _ = ray.get(actor.timed_generate.remote(prompts, n, sampling))
                    raw.append(t / s)
                    t0 = time.perf_counter()
                    gen = pool.generate(prompts, n, sampling)
                    harness.append(sum(len(c.token_ids) for g in gen.groups for c in g) / (time.perf_counter() - t0))
                r["raw_tokens_per_s"], r["pool_tokens_per_s"] = _median(raw), _median(harness)
                r["pool_over_raw"] = statistics.median(h / w for h, w in zip(harness, raw))
                try:
                    r["weight_push"] = _pushes(pool, policy, greedy[0], repeats)
                except Exception as err:  # noqa: BLE001 - keep the throughput figures
                    r["weight_push_error"] = f"{type(err).__name__}: {err}"[-2000:]
            results[key] = r
        except Exception as err:  # noqa: BLE001
            results[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        finally:
            ray.kill(actor)
            time.sleep(5)  # the engine's processes gone and its GPU memory free before the next one
        print(key, json.dumps(results[key])[:600], flush=True)
        save()


def part_drafts(cfg, work: Path, k: int, prompts: int) -> dict:
    """One MTP engine serving one sequence at a time (``max_num_seqs: 1``, greedy): each step's first draft
    traced in the workers (``gymrl.rollout.draft_trace``), its fate split by the previous draft's, and its draft,
    input tokens and hidden state set against the float32 trainer's own on the finished text."""
    import ray
    import torch

    from gymrl.config import SamplingConfig
    from gymrl.models.checkpoint import load_policy
    from gymrl.models.mtp import load_mtp_layer
    from gymrl.rollout import draft_trace
    from gymrl.rollout.engine import SpecStats
    from gymrl.rollout.pool import EnginePool, start_engines
    from gymrl.session import init_ray

    model = json.loads((work / "results.json").read_text())["build"]["model"]["path"]
    policy, tokenizer = load_policy(model)
    policy = policy.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    layer = load_mtp_layer(policy, Path(model)).eval()
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=cfg.sampling.max_tokens)
    engine_cfg = _spec_engine(cfg, k, extra_args={**cfg.engine.extra_args, "max_num_seqs": 1})
    init_ray(cfg)
    pool = EnginePool(start_engines(model, engine_cfg, cfg.seed))
    actor = pool.actors[0]
    try:
        ray.get(actor.ready.remote())
        rows, spec = draft_trace.trace_greedy(pool, policy, layer, _prompts(cfg, tokenizer, prompts), greedy)
        total = SpecStats.total(spec)
        return {"engine_args": engine_cfg.extra_args, "speculative_tokens": k, "prompts": prompts,
                "engine_acceptance": None if total is None else total.acceptance,
                "steps": draft_trace.split_by_previous(rows)}
    finally:
        ray.kill(actor)


def markdown(res: dict) -> str:
    rows = []
    b = res.get("build", {})
    if b.get("copy_bandwidth"):
        bw, m = b["copy_bandwidth"], b["model"]
        rows += [("device-to-device copy, 2 GiB (GB/s copied; read+written)",
                  f"{bw['copied_GBps']:.0f}; {bw['read_plus_written_GBps']:.0f}"),
                 ("model: parameters (checkpoint, incl. MTP layer)", f"{m['parameters_in_checkpoint']:,}"),
                 ("model build on the GPU (warm-up + MTP training) (s)", f"{m['build_seconds']:.0f}"),
                 ("MTP draft agreement with the model, before / after training",
                  f"{m['warmup'].get('mtp', {}).get('agreement_before')} / {m['warmup'].get('mtp', {}).get('agreement_after')}")]
    eng = res.get("engines", {})
    base = {w: eng.get("mtp_0", {}).get(w, {}).get("tokens_per_s", {}).get("median") for w in ("greedy", "sampled")}
    for k in range(4):
        r = eng.get(f"mtp_{k}")
        if r is None:
            continue
        if "error" in r:
            rows.append((f"mtp k={k}", "failed: " + r["error"][:200].replace("|", "/").replace("\n", " ")))
            continue
        for w in ("greedy", "sampled"):
            x = r[w]
            tps = x["tokens_per_s"]["median"]
            cell = f"{tps:,.0f} tok/s"
            if k and base[w]:
                cell += f" ({tps / base[w]:.2f}x)"
            if x["spec"]:
                cell += f", acceptance {x['spec']['acceptance']:.3f}, mean acceptance length {x['spec']['mean_acceptance_length']:.2f}"
            rows.append((f"{w}: decode, {'no speculative decoding' if k == 0 else f'MTP k={k}'}", cell))
        for prompts, x in r.get("sampled_by_prompts", {}).items():
            tps, b = x["tokens_per_s"]["median"], eng.get("mtp_0", {}).get("sampled_by_prompts", {}).get(prompts)
            cell = f"{tps:,.0f} tok/s, {x['mean_completion_tokens']:.0f} tokens a sequence"
            if k and b:
                cell += f" ({tps / b['tokens_per_s']['median']:.2f}x)"
            if x["spec"]:
                cell += f", acceptance {x['spec']['acceptance']:.3f}"
            rows.append((f"sampled, {x['sequences']} sequences: decode, k={k}", cell))
        if "greedy_vs_trainer" in r:
            g = r["greedy_vs_trainer"]
            rows.append((f"greedy text, k={k}: tokens / whole sequences that are the trainer's greedy choice",
                         f"{g['tokens_matching_trainer']:.3f} / {g['sequences_matching_trainer']:.3f}"))
        if pr := r.get("profile"):
            rows.append((f"profiled, {pr['sequences']} sequences, k={k}: per engine step, wall / device busy (ms); "
                         "CUDA graph / kernel launches",
                         f"{pr['per_step_ms']['wall_s']:.2f} / {pr['per_step_ms']['device_busy_s']:.2f}; "
                         f"{pr['per_step_launches']['graph_launches']:.1f} / "
                         f"{pr['per_step_launches']['kernel_launches']:.1f}"))
        rows.append((f"engine start, k={k} (s)", f"{r['engine_start_s']:.0f}"))
    r0 = eng.get("mtp_0", {})
    if "pool_over_raw" in r0:
        rows += [("raw vLLM in the actor / gymrl pool through Ray (tok/s)",
                  f"{r0['raw_tokens_per_s']['median']:,.0f} / {r0['pool_tokens_per_s']['median']:,.0f}"),
                 ("pool / raw", f"{r0['pool_over_raw']:.2f}")]
        wp = r0.get("weight_push", {})
        if "weight_push_error" in r0:
            rows.append(("weight push", "failed: " + r0["weight_push_error"][-300:].replace("|", "/").replace("\n", " ")))
        for label in (x for x in ("bytes", "ipc") if x in wp):
            p = wp[label]
            rows.append((f"weight push, {label} ({p['weight_bytes'] / 1e9:.2f} GB bf16): s, GB/s, of which engine load s",
                         f"{p['push_s']['median']:.3f}, {p['push_GBps']:.1f}, {p['engine_load_s']['median']:.3f}"))
        if "ipc" in wp:
            rows.append(("max logprob change: same weights bytes / ipc; changed via ipc; restored",
                         f"{wp['bytes']['logprob_gap_after_same_weights']:.3g} / {wp['ipc']['logprob_gap_after_same_weights']:.3g}; "
                         f"{wp['ipc_changed_weights_logprob_gap']:.3g}; {wp['restored_logprob_gap']:.3g}"))
    for key, d in res.get("drafts", {}).items():
        for split, m in d["steps"].items():
            if m["steps"]:
                rows.append((f"[drafts {key}] {split}: "
                             "steps; accepted; draft is the trainer's; trainer's draft accepted; inputs are the text's; "
                             "hidden-state cosine", f"{m['steps']}; {m['accepted']:.3f}; {m['draft_is_trainers']:.3f}; "
                             f"{m['trainers_draft_accepted']:.3f}; {m['inputs_match_text']:.3f}; "
                             f"{m['hidden_cosine']:.4f}"))
    for key, t in res.get("train", {}).items():
        rows += _train_rows(key, t)
    for mb, r in res.get("trainer", {}).get("runs", {}).items():
        rows.append((f"[trainer, micro_batch_size {mb}] s/step median [min-max]; tokens/s; MFU; peak GPU GB",
                     f"{r['step_s']['median']:.3f} [{r['step_s']['min']:.3f}-{r['step_s']['max']:.3f}]; "
                     f"{r['tokens_per_s']:,.0f}; {r['mfu']:.3f}; {r['peak_gpu_GB']}"))
        if "profiled_step" in r:
            ps = r["profiled_step"]
            rows.append((f"[trainer, micro_batch_size {mb}] profiled step: wall s; device busy s (fraction)",
                         f"{ps['wall_s']:.3f}; " + ("- (no GPU)" if ps["device_busy_s"] is None else
                                                    f"{ps['device_busy_s']:.3f} ({ps['device_busy_fraction']:.2f})")))
    for dtype in ("float32", "bfloat16"):
        f = res.get("fsdp", {}).get(dtype)
        if f:
            one, sh = f["one_process"], f["fsdp2_one_rank"]
            rows.append((f"[fsdp, {dtype}] one process / FSDP2 one rank: s/step; peak GPU GB; max gap in loss, "
                         "grad norm, weights",
                         f"{one['step_s']['median']:.3f} / {sh['step_s']['median']:.3f}; {one['peak_gpu_GB']} / "
                         f"{sh['peak_gpu_GB']}; {f['max_loss_gap']:.3g}, {f['max_grad_norm_gap']:.3g}, "
                         f"{f['max_weight_gap']:.3g}"))
    return "\n".join(["| measure | value |", "| --- | --- |"] + [f"| {a} | {v} |" for a, v in rows]) + "\n"


def _train_rows(key: str, t: dict) -> list[tuple[str, str]]:
    """The ``train`` part's rows: copy bandwidths, the push, and every runner's step (and trainer) throughput."""
    from gymrl.bench.vs_trl import SLEEP_RUN, reward_text

    if "error" in t:
        return [(f"train ({key})", "failed: " + t["error"][:300].replace("|", "/").replace("\n", " "))]
    rows = [(f"[{key}] copy 2 GiB, {name} (GB/s copied)", f"{bw['copied_GBps']:.0f}")
            for name, bw in t["copy_bandwidth"].items()]
    w = t["weight_push"]
    rows += [(f"[{key}] weight push ({w['method']}, trainer on {w['trainer_device']}, {w['weight_bytes'] / 1e9:.2f} GB): "
              "s in all, GB/s; broadcast s, GB/s; pack s",
              f"{w['push_s']['median']:.3f}, {w['push_GBps']:.1f}; {w['send_s']['median']:.3f}, "
              f"{'-' if w['send_GBps'] is None else format(w['send_GBps'], '.1f')}; "
              f"{w['pack_s']['median']:.3f}"),
             (f"[{key}] max logprob gap, engine vs trainer after the push", f"{w['max_logprob_gap_engine_vs_trainer']:.3g}")]
    v = t["vs_trl"]
    if "error" in v:
        return rows + [(f"[{key}] gymrl / TRL runs", "failed: " + v["error"][:300].replace("|", "/").replace("\n", " "))]
    for name, r in v["runs"].items():
        ph = r["phases"]
        train_s = ph.get("train_s", ph.get("rest_s"))
        tokens = r["tokens_per_s"]["median"] * r["step_s"]["median"]  # completion tokens of a median step
        rows.append((f"[{key}] {name}: s/step median [min-max]; generated tok/s; trainer s/step, its tok/s; "
                     "held-out reward",
                     f"{r['step_s']['median']:.2f} [{r['step_s']['min']:.2f}-{r['step_s']['max']:.2f}]; "
                     f"{r['tokens_per_s']['median']:,.0f}; {train_s:.2f}, {tokens / train_s:,.0f}; "
                     f"{reward_text(r['held_out_reward'])}"))
    for name, r in v["ratios"].items():
        rows.append((f"[{key}] {name}: steps/s ratio; tok/s ratio", f"x{r['steps_per_s']:.2f}; x{r['tokens_per_s']:.2f}"))
    # Results written before the fixed cost was split have no parts: nan there.
    p = {"rollout_overhead_s": math.nan, "outside_rollouts_s": math.nan, "verify_s": math.nan} | v["runs"]["gymrl sync"]["phases"]
    rows.append((f"[{key}] gymrl sync step (s): vLLM decoding; trainer; weight push; fixed (the rest: waiting for "
                 "rollouts beyond decoding + outside the wait; /verify summed over the groups)",
                 f"{p['engine_decode_s']:.2f}; {p['train_s']:.2f}; {p['push_s']:.2f}; {p['fixed_s']:.2f} "
                 f"({100 * p['fixed_fraction']:.0f}% of {p['step_s']:.2f}: {p['rollout_overhead_s']:.2f} + "
                 f"{p['outside_rollouts_s']:.2f}; {p['verify_s']:.2f})"))
    if (asleep := v["runs"].get(SLEEP_RUN)) is not None:
        q = asleep["phases"]
        rows.append((f"[{key}] {SLEEP_RUN} (engine.sleep_while_training): engines to sleep and awake again; trainer (s)",
                     f"{q['sleep_s']:.2f}; {q['train_s']:.2f}"))
    if "async_speedup" in t:
        a = t["async_speedup"]
        rows.append((f"[{key}] async / sync steps/s: achieved / ideal ((decode + train) / max(decode, train) of the "
                     "sync step)", f"x{a['achieved']:.2f} / x{a['ideal']:.2f}"))
    rows.append((f"[{key}] gymrl async: weight push with requests in flight (the engines' pause inside it) (s)",
                 f"{v['runs']['gymrl async']['phases']['push_s']:.3f}"))
    if (peer := v.get("peer_start")) and peer["device_free_GB"] is not None:
        rows.append((f"[{key}] when TRL started (gymrl's engines stopped): GB the bench process held, allocated / "
                     "reserved; GB free of the GPU's",
                     f"{peer['driver_allocated_GB']:.2f} / {peer['driver_reserved_GB']:.2f}; "
                     f"{peer['device_free_GB']:.1f} of {peer['device_total_GB']:.1f}"))
    return rows


def main() -> None:
    from gymrl.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("build", "engines", "drafts", "train", "fsdp", "trainer", "push", "report"))
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu_bench.yaml"))
    p.add_argument("--work", default="/tmp/gpubench")
    p.add_argument("--spec", default="0,1,2,3", help="num_speculative_tokens values (0 = off), one engine each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--greedy-prompts", type=int, default=64, help="engines: greedy prompts; drafts: prompts traced")
    p.add_argument("--sampled-prompts", default="", help="engines: further sampled batches in prompts, e.g. 1,4,64")
    p.add_argument("--decode-only", action="store_true", help="engines: no harness-vs-raw rates or pushes at k=0")
    p.add_argument("--profile-prompts", type=int, default=0,
                   help="engines: profile one sampled call of this many prompts (device busy and launches per step)")
    p.add_argument("--label", default="", help="drafts: a name for this run's engine keys (e.g. no-async)")
    p.add_argument("--steps", type=int, default=6, help="train: GRPO steps of each runner (step 1 warms up)")
    p.add_argument("--trl", default="", help="train: TRL generations to compare with, e.g. transformers,vllm")
    p.add_argument("--no-peer-eval", action="store_true",
                   help="train: leave TRL's policies unscored (no engine restart after TRL: 1-2 min of a GPU call)")
    p.add_argument("--micro", default="64", help="trainer: train.micro_batch_size values, e.g. 16,64,128")
    p.add_argument("--layers", default="eager", help="trainer: eager and/or compiled (train.compile), e.g. eager,compiled")
    p.add_argument("--buckets", default="64,256,1024", help="push: train.push_bucket_mb values")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (YAML value)")
    args = p.parse_args()
    import yaml

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(args.config, {"model.cache_dir": str(work / "models"), **overrides})
    file = work / "results.json"
    res = json.loads(file.read_text()) if file.exists() else {}
    res.setdefault("machine", {"platform": platform.platform(), "python": platform.python_version()})

    def save() -> str:
        md = markdown(res)
        for folder in (work, Path(os.environ["OUT"])) if os.environ.get("OUT") else (work,):
            (folder / "results.json").write_text(json.dumps(res, indent=2))
            (folder / "results.md").write_text(md)
        return md

    if args.part == "build":
        import torch

        res["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        res["build"] = part_build(cfg, work)
    elif args.part == "engines":
        ks = [int(k) for k in args.spec.split(",")]
        part_engines(cfg, work, ks, args.repeats, args.greedy_prompts,
                     [int(x) for x in args.sampled_prompts.split(",") if x], args.decode_only,
                     res.setdefault("engines", {}), save, args.profile_prompts)
    elif args.part == "drafts":
        for k in (int(k) for k in args.spec.split(",")):
            res.setdefault("drafts", {})[f"mtp_{k}" + (f"_{args.label}" if args.label else "")] = part_drafts(
                cfg, work, k, args.greedy_prompts)
            save()
    elif args.part == "train":
        trl = tuple(g for g in args.trl.split(",") if g)
        res.setdefault("train", {})["trl_" + "_".join(trl) if trl else "gymrl"] = part_train(
            cfg, work, args.steps, args.repeats, trl, not args.no_peer_eval)
    elif args.part == "trainer":
        res["trainer"] = part_trainer(cfg, work, args.steps, [int(m) for m in args.micro.split(",")],
                                      [{"eager": False, "compiled": True}[v] for v in args.layers.split(",")])
    elif args.part == "fsdp":
        res["fsdp"] = part_fsdp(cfg, work, args.steps)
    elif args.part == "push":
        res["sharded_push"] = part_push(cfg, work, [int(m) for m in args.buckets.split(",")])
    print(save())


if __name__ == "__main__":
    main()
