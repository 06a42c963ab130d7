"""``gymrl bench --suite spec``: vLLM's decode tokens/s without and with speculative decoding (the config's
``engine.speculative_config``, else ngram) on the same prompts and model, one engine at a time, greedy and
sampled, their ratio and the drafts' acceptance; ``spec.json`` and ``spec.md``."""

import platform
from pathlib import Path

import ray
from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import measure_table, summarise, write_json
from gymrl.bench.workload import model_and_prompts

# The ngram config measured on CPU (docs/benchmarks.md); a config's own engine.speculative_config wins.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def run_spec_bench(cfg, out: Path, repeats: int = 3) -> Table:
    """Decode tokens/s of vLLM's own generate without and with speculative decoding, same prompts, same
    model, one engine at a time (started, measured, killed), and the drafts' acceptance. Two workloads:
    greedy (one completion per prompt) and the config's sampling (group_size per prompt), when it samples."""
    import vllm

    from gymrl.config import SamplingConfig, SpeculativeConfig
    from gymrl.rollout.engine import SpecStats
    from gymrl.rollout.pool import start_engines
    from gymrl.rollout.vllm_checks import check_speculative
    from gymrl.session import init_ray

    path, _, prompts = model_and_prompts(cfg)
    spec = cfg.engine.speculative_config or SpeculativeConfig(**NGRAM)
    check_speculative(spec)
    workloads = {"greedy": (1, SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=cfg.sampling.max_tokens))}
    if cfg.sampling.temperature > 0:  # a greedy config has no sampled workload (vLLM refuses n > 1 at temperature 0)
        workloads["sampled"] = (cfg.train.group_size, cfg.sampling)
    init_ray(cfg)
    measured: dict[str, dict] = {}
    for label, engine_cfg in (("off", cfg.engine.model_copy(update={"speculative_config": None})),
                              ("on", cfg.engine.model_copy(update={"speculative_config": spec}))):
        (actor,) = start_engines(str(path.resolve()), engine_cfg, cfg.seed)
        try:
            info = ray.get(actor.ready.remote())
            if label == "on" and not info["speculative"]:
                raise RuntimeError(f"speculative decoding did not start: {info['spec_fallback']}")
            for name, (n, sampling) in workloads.items():
                ray.get(actor.timed_generate.remote(prompts, n, sampling))  # warm-up
                rates, stats = [], []
                for _ in range(repeats):
                    tokens, seconds, stat = ray.get(actor.timed_generate.remote(prompts, n, sampling))
                    rates.append(tokens / seconds)
                    stats.append(stat)
                total = SpecStats.total(stats)
                measured.setdefault(name, {})[label] = {
                    "tokens_per_s": summarise(rates), "load_seconds": info["load_seconds"],
                    "spec": None if total is None else {
                        "drafts": total.drafts, "draft_tokens": total.draft_tokens,
                        "accepted_tokens": total.accepted_tokens, "acceptance": total.acceptance,
                        "mean_accepted_length": total.mean_accepted_length},
                }
        finally:
            ray.kill(actor)
    for name in measured:
        m = measured[name]
        m["on_over_off"] = m["on"]["tokens_per_s"]["median"] / m["off"]["tokens_per_s"]["median"]

    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "versions": {"vllm": vllm.__version__, "ray": ray.__version__},
        "config": {"prompts": len(prompts), "group_size": cfg.train.group_size, "max_tokens": cfg.sampling.max_tokens,
                   "temperature": cfg.sampling.temperature, "model": str(path), "speculative_config": spec.model_dump()},
        "workloads": measured,
    }
    write_json(out, "spec", results)

    def fmt(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    rows = []
    for name, m in measured.items():
        s = m["on"]["spec"]
        rows += [
            (f"{name}: decode tokens/s, no speculative decoding", f"{m['off']['tokens_per_s']['median']:.0f}"),
            (f"{name}: decode tokens/s, {spec.method}", f"{m['on']['tokens_per_s']['median']:.0f}"),
            (f"{name}: with / without", f"{m['on_over_off']:.2f}"),
            (f"{name}: acceptance (accepted / draft tokens)", fmt(s["acceptance"], 3)),
            (f"{name}: mean acceptance length (tokens per verify step)", fmt(s["mean_accepted_length"], 2)),
        ]
    return measure_table(out / "spec.md", rows,
                         f"gymrl bench spec: {len(prompts)} prompts, {spec.model_dump()}, median of {repeats}",
                         f"measure (median of {repeats})")


def run_suite(a: BenchArgs) -> Table:
    return run_spec_bench(a.cfg, a.out, a.repeats)
