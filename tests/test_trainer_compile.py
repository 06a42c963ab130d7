"""train.compile: the decoder layers through torch.compile (inductor, here on CPU) train as the eager trainer does, over
micro-batches of different lengths (dynamic shapes), and keep their parameters' names (pushes and checkpoints)."""

from pathlib import Path
from types import SimpleNamespace

from gymrl.bench.scale import fixed_batch
from gymrl.config import load_config
from gymrl.envs.registry import load_environment
from gymrl.models.checkpoint import load_policy
from gymrl.session import resolve_model_path
from gymrl.train.trainer import GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_layers_train_as_the_eager_ones(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", {
        "run_dir": str(tmp_path), "model.cache_dir": str(ROOT / ".cache" / "models"), "train.prompts_per_step": 4,
        "train.group_size": 4, "train.micro_batch_size": 6, "sampling.max_tokens": 24})
    envs = [load_environment(e.name, e.args) for e in cfg.envs]
    path = resolve_model_path(cfg.model, envs, [e.weight for e in cfg.envs])
    results = {}
    for compiled in (False, True):
        policy, tokenizer = load_policy(path)
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": compiled})})
        trainer = GRPOTrainer(SimpleNamespace(cfg=c, policy=policy, model_path=path, tokenizer=tokenizer, pool=None))
        steps = [trainer.step(fixed_batch(c, tokenizer, policy.config.vocab_size, seed, min_tokens=4))
                 for seed in range(2)]  # 16 sequences of 4-24 tokens: three micro-batches of their own widths
        assert all((layer._compiled_call_impl is not None) == compiled for layer in policy.model.layers)
        results[compiled] = steps, {n: p.detach() for n, p in policy.named_parameters()}
    (eager, eager_weights), (compiled, compiled_weights) = results[False], results[True]
    assert list(compiled_weights) == list(eager_weights)  # no "_orig_mod." in the names the engines are pushed
    for a, b in zip(eager, compiled):
        assert abs(a.loss - b.loss) < 1e-5 and abs(a.grad_norm - b.grad_norm) < 1e-4 * max(1.0, a.grad_norm)
        assert a.grad_norm > 0
    gap = max(float((eager_weights[n] - compiled_weights[n]).abs().max()) for n in eager_weights)
    moved = max(float((eager_weights[n] - w.detach()).abs().max()) for n, w in load_policy(path)[0].named_parameters())
    # Both trainers moved the weights alike. AdamW's normalised update turns float32 rounding in near-zero gradients
    # into differences of up to its step size: 1.4e-5 of 6.0e-4 moved on an AMX Xeon (2026-12-07), under 1e-5 before.
    assert 1e-5 < moved and gap < 0.05 * moved
