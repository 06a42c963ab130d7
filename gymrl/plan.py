"""``gymrl train --dry-run``: a run config checked and its placement laid out, with nothing started.

It checks what a run checks before its engines start (the config, the environments and their options,
the parser names, the speculative config against the model's MTP layers, prompt lengths when a tokenizer
is at hand) and shows where everything would run: Ray, the engines and their GPUs, the trainer, the
memory of a trainer rank and an engine GPU (gymrl.memory), the environment servers and the sampling. It
reads the checkpoint's config.json and safetensors headers only: no weights are loaded (the memory plan
builds the model on the meta device), no tiny model is built, and no Ray, engine or server is started.

An error a run would hit anywhere raises (the CLI prints it as one line, exit 2). What only stops the
plan on *this* machine (too few GPUs, a model folder that lives on the GPU node) is a warning: the plan
is still printed, so it can be checked on a laptop or login node before a GPU job. Memory is the exception:
a plan that cannot fit the GPUs declared in ``cluster`` (or, for a local run, the GPUs here) is refused.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gymrl.config import RunConfig
from gymrl.envs.base import Environment
from gymrl.envs.sources import gym_python_of, open_environments
from gymrl.memory import (
    GPU_KINDS,
    EngineMemory,
    ModelShape,
    count,
    describe_layout,
    engine_memory,
    engine_width,
    fewest_gpus,
    gb,
    model_shape,
    trainer_memory,
)
from gymrl.models.checkpoint_files import CheckpointInfo, inspect_checkpoint
from gymrl.models.tiny import is_complete, model_dir_name
from gymrl.resources import memory_problem, placement_problem

Rows = list[tuple[str, str]]


@dataclass
class Plan:
    sections: dict[str, Rows] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what stops or is unchecked on this machine only
    gpus_needed: int = 0
    gpus_visible: int = 0


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gpus() -> tuple[int, int | None]:
    """(visible CUDA devices, the smallest one's memory in bytes) as torch sees them; no CUDA context is kept."""
    import torch

    n = torch.cuda.device_count()
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) if n else None
    return n, memory


def _model(cfg: RunConfig, envs: list[Environment], plan: Plan) -> tuple[Path | None, CheckpointInfo | None]:
    """The checkpoint a run would use, inspected if it is here; the tiny model is named, never built."""
    rows: Rows = []
    if cfg.model.build_tiny is not None:
        from gymrl.session import WarmupMix

        source = envs[0] if len(envs) == 1 else WarmupMix(envs, [e.weight for e in cfg.envs])
        path = Path(cfg.model.cache_dir) / model_dir_name(cfg.model.build_tiny, source)
        cached = is_complete(path)
        rows.append(("source", f"tiny {cfg.model.build_tiny.architecture} model built offline (model.build_tiny)"))
        minutes = "2.5 minutes" if cfg.model.build_tiny.architecture == "deepseek_v3" else "a minute"
        rows.append(("cache", f"{path}: " + ("cached" if cached else f"not built yet; a run builds it first (about "
                                              f"{minutes} on 2 CPU cores)")))
    else:
        path = cfg.model.path
        cached = (path / "config.json").is_file()
        rows.append(("path", f"{path}" + ("" if cached else ": not here")))
        if not cached:
            plan.warnings.append(f"model.path: no HF checkpoint (config.json) at '{path}' on this machine; gymrl "
                                 "downloads no weights, so a run here would stop at once")
    info = inspect_checkpoint(path) if cached else None
    if info is not None:
        rows.append(("architecture", f"{', '.join(info.architectures) or '?'} (model_type {info.model_type})"))
        if info.num_parameters is not None:
            rows.append(("parameters", f"{count(info.num_parameters)} in {gb(info.weight_bytes)} of safetensors "
                                       f"({', '.join(info.weight_dtypes)})"))
        rows.append(("MTP layers", f"{info.mtp_layers} ({info.mtp_field})" if info.mtp_layers else "none"))
    plan.sections["model"] = rows
    return path, info


def _names(cfg: RunConfig, model_path: Path, info: CheckpointInfo | None, has_tools: bool, plan: Plan) -> Rows:
    """Parsers and the speculative config checked against the installed vLLM, as a run checks them."""
    rows: Rows = []
    if has_tools:
        from gymrl.rollout.tool_calls import parser_class

        parser_class(cfg.rollout.tool_call_parser)
        rows.append(("tool-call parser", f"{cfg.rollout.tool_call_parser} (found in vLLM)"))
    else:
        rows.append(("tool-call parser", f"{cfg.rollout.tool_call_parser} (unused: no task has tools)"))
    if cfg.rollout.reasoning_parser is not None:
        from gymrl.rollout.vllm_checks import reasoning_parser_class, reasoning_plugin_path

        plugin = reasoning_plugin_path(cfg, model_path)
        name = cfg.rollout.reasoning_parser
        if plugin is not None and not plugin.is_file():
            rows.append(("reasoning parser", f"{name} from {plugin} (not checked: the file is not here)"))
            plan.warnings.append(f"rollout.reasoning_parser_plugin: no file at '{plugin}' here, so "
                                 f"reasoning_parser '{name}' was not checked")
        else:
            reasoning_parser_class(name, plugin)
            rows.append(("reasoning parser", f"{name} (found in vLLM{' after ' + str(plugin) if plugin else ''})"))
    if cfg.engine.extra_args:
        from gymrl.rollout.vllm_checks import check_engine_args

        check_engine_args(cfg.engine.extra_args)
    from gymrl.rollout.vllm_checks import check_cpu_mamba_spec, check_cpu_mla

    tiny = cfg.model.build_tiny
    check_cpu_mla(cfg.engine, info.mla if info is not None else tiny is not None and tiny.architecture == "deepseek_v3")
    check_cpu_mamba_spec(cfg.engine, info.mamba if info is not None else
                         tiny is not None and tiny.architecture == "nemotron_h" and "M" in tiny.hybrid_pattern)
    spec = cfg.engine.speculative_config
    if spec is not None:
        from gymrl.rollout.vllm_checks import check_mtp, check_speculative, is_mtp

        check_speculative(spec)
        if info is not None:
            check_mtp(spec, info, cfg.engine.dtype)
        elif is_mtp(spec.method) and not (tiny is not None and tiny.architecture in ("deepseek_v3", "nemotron_h")):  # it has one
            plan.warnings.append("engine.speculative_config: MTP needs MTP layers in the checkpoint; not checked "
                                 "(no checkpoint here)")
        if is_mtp(spec.method) and cfg.engine.device == "cpu" and info is not None and info.relu2_moe:
            plan.warnings.append("engine.speculative_config: vLLM's CPU build cannot run this Nemotron-H's MoE layers "
                                 "(non-gated relu2 MoE is CUDA/ROCm/XPU only); use device cuda, or an attention-only "
                                 "MTP layer and no E layers (build_tiny: mtp_pattern '*')")
    return rows


def _check_prompts(cfg: RunConfig, envs: list[Environment], model_path: Path, info: CheckpointInfo | None) -> str:
    """Every prompt must leave room for max_tokens (the run's own check), when a tokenizer is here."""
    if info is None or not info.has_tokenizer:
        return "not checked (no tokenizer here)"
    from transformers import AutoTokenizer

    from gymrl.rollout.runner import check_prompts_fit, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    tasks = [t for env in envs for split in ("train", "eval") for t in env.tasks(split)]
    kwargs = cfg.rollout.chat_template_kwargs
    check_prompts_fit(tokenizer, tasks, cfg.sampling.max_tokens, cfg.engine.max_model_len, kwargs)
    longest = max(len(encode_prompt(tokenizer, t, kwargs)) for t in tasks)
    return (f"all {len(tasks)} fit: longest {longest} + max_tokens {cfg.sampling.max_tokens} <= "
            f"{cfg.engine.max_model_len}")


def _engines(cfg: RunConfig, model_path: Path, info: CheckpointInfo | None, plan: Plan) -> None:
    from gymrl.rollout.engine import engine_kwargs
    from gymrl.rollout.pool import actor_resources

    eng = cfg.engine
    cpus_total = cfg.ray_num_cpus or os.cpu_count() or 1
    cpus_needed = eng.num_engines * eng.cpus_per_engine
    if cfg.ray_address is None:
        plan.sections["ray"] = [("cluster", f"local, started by the run with {cpus_total} CPUs"
                                            f"{'' if cfg.ray_num_cpus else ' (all of this machine)'}")]
        if cpus_needed > cpus_total:
            plan.warnings.append(f"engines reserve {cpus_needed:g} Ray CPUs, the local Ray has {cpus_total}: "
                                 "the engines would wait forever")
    else:
        plan.sections["ray"] = [("cluster", f"{cfg.ray_address} (not contacted)")]
    for problem in (memory_problem(cfg), placement_problem(cfg)) if cfg.ray_address is None else ():
        if problem:
            plan.warnings.append(problem)

    res = actor_resources(eng)
    ranks = cfg.train.workers if cfg.train.workers > 1 and cfg.train.device == "cuda" else 0  # one GPU per rank
    plan.gpus_needed = int(eng.num_engines * res["num_gpus"]) + ranks
    plan.gpus_visible, _ = _gpus()
    rows: Rows = [
        ("engines", f"{eng.num_engines} x vLLM on {eng.device}, one Ray actor each"),
        ("per engine", f"{res['num_cpus']:g} CPU(s), {res['num_gpus']} GPU(s), "
                       f"tensor parallel {eng.tensor_parallel_size}"
                       + (f", Ray resources {json.dumps(res['resources'])}" if "resources" in res else "")),
        ("context", f"max_model_len {eng.max_model_len}, dtype {eng.dtype}, gpu_memory_utilization "
                    f"{eng.gpu_memory_utilization}, enforce_eager {eng.enforce_eager}"),
        ("speculative", json.dumps(eng.speculative_config.model_dump()) if eng.speculative_config else "off"),
    ]
    shown = engine_kwargs(str(model_path), eng, cfg.seed)
    rows.append(("AsyncEngineArgs(...)", json.dumps({k: v for k, v in shown.items() if k != "model"}, default=str)))
    plan.sections["engines"] = rows

    split = (f" ({eng.num_engines} engines x tensor parallel {eng.tensor_parallel_size}"
             f"{f' + {ranks} trainer ranks' if ranks else ''})" if plan.gpus_needed else "")
    plan.sections["gpus"] = [("needed", f"{plan.gpus_needed}{split}"),
                             ("visible", f"{plan.gpus_visible} here (torch.cuda.device_count())")]
    declared = cfg.cluster.gpus
    if declared is not None:
        plan.sections["gpus"].append(("declared", f"{declared} (cluster.gpus)"))
        if plan.gpus_needed > declared:
            raise ValueError(f"cluster.gpus: this plan needs {plan.gpus_needed} GPUs{split}, the cluster has {declared}: "
                             "lower engine.num_engines, engine.tensor_parallel_size or train.workers")
    elif cfg.ray_address is None and plan.gpus_needed > plan.gpus_visible:
        plan.warnings.append(f"this plan needs {plan.gpus_needed} GPUs and this machine shows {plan.gpus_visible}: "
                             "it cannot run here (the engines would wait for Ray GPUs forever)")


def _trainer(cfg: RunConfig, plan: Plan) -> None:
    from gymrl.resources import trainer_gpu

    tr = cfg.train
    gpu = trainer_gpu(cfg, plan.gpus_visible) if tr.device == "cuda" else None
    if gpu is None:
        where = "cpu: this process"
    elif plan.gpus_visible == 0:
        where = (f"cuda: this process, on a GPU of its own when the machine has more than the {plan.gpus_needed} the "
                 "engines reserve, else on GPU 0 beside them (no GPU visible here)")
    elif plan.gpus_visible > plan.gpus_needed:
        where = f"cuda:{gpu}: this process, a GPU of its own (Ray gets the others)"
    else:
        where = "cuda:0: this process, sharing GPU 0 with the engines"
    rows: Rows = [
        ("device", f"{where}; {tr.dtype} policy, AdamW; weight sync {tr.weight_sync}"),
        ("schedule", f"{tr.steps} steps; batch {tr.prompts_per_step} prompts x {tr.group_size} samples = "
                     f"{tr.prompts_per_step * tr.group_size} rollouts; micro-batch {tr.micro_batch_size}"),
        ("objective", f"{tr.loss_type}, lr {tr.learning_rate:g}, beta {tr.beta:g}, clip "
                      f"[{tr.epsilon_low:g}, {tr.epsilon_high:g}]; eval every {cfg.eval.every} steps"),
    ]
    if cfg.engine.device == "cuda" and tr.device == "cpu":
        plan.warnings.append("engines run on cuda, but the trainer runs on this process's CPU (train.device cpu): "
                             "fine for small models, not for a multi-billion-parameter policy")
    plan.sections["trainer"] = rows


def _memory(cfg: RunConfig, model_path: Path, info: CheckpointInfo | None, plan: Plan) -> None:
    """Bytes per trainer rank and engine GPU from config.json (gymrl.memory), the fewest H100s and H200s the config
    needs, and what does not fit, naming the key to change: refused for declared GPUs (``cluster``) and for this
    machine's when the run would use them, a warning for a remote cluster's."""
    if info is None:
        return
    shape = model_shape(model_path, info, cfg.train.lora)
    if shape is None:
        plan.sections["memory"] = [("plan", f"none: the installed transformers cannot lay out model_type "
                                            f"'{info.model_type}' from config.json")]
        return
    eng, tr = cfg.engine, cfg.train
    kinds = ", ".join(f"{n} {k}" for k, n in shape.layer_kinds.items())
    mtp = f" + MTP layer {count(shape.mtp_params)}" if shape.mtp_params else ""
    rows: Rows = [("parameters", f"{count(shape.params)}{mtp} (config.json, built on the meta device); {shape.layers} "
                                 f"layers: {kinds}")]
    parts = trainer_memory(cfg, shape)
    need = sum(p.bytes for p in parts)
    rows.append(("trainer rank", f"{gb(need)} on each of {tr.workers} rank(s) (train.workers)"))
    rows += [(f"  {p.name}", f"{gb(p.bytes)} = {p.how}") for p in parts]
    declared = cfg.cluster.gpu_memory_gb
    gpu_memory = declared * 1e9 if declared is not None else _gpus()[1]
    here = "a declared GPU (cluster.gpu_memory_gb)" if declared is not None else "a GPU here"
    engine_gpu = gpu_memory if eng.device == "cuda" else None
    em = engine_memory(eng, shape, info, engine_gpu)
    tp = eng.tensor_parallel_size
    rows.append(("engine GPU" if eng.device == "cuda" else "engine", f"weights {gb(em.weights)} (/ tensor_parallel_size "
                 f"{tp}); one max_model_len sequence's KV cache{' and Mamba state' if shape.mamba_ssm_elems else ''} "
                 f"{gb(em.sequence)}" + (
                     f"; gpu_memory_utilization {eng.gpu_memory_utilization} of {gb(engine_gpu)} leaves "
                     f"{gb(max(em.left, 0))} for the KV cache" if engine_gpu else "")))
    rows.append(("weight push", f"{gb(shape.params * engine_width(eng, info))} per push ({eng.dtype})"))
    if eng.device == "cuda" or tr.device == "cuda":
        for kind, size in GPU_KINDS.items():
            rows.append((f"{kind} ({size / 1e9:.0f} GB)", describe_layout(cfg, fewest_gpus(cfg, shape, info, size))))
    plan.sections["memory"] = rows

    misfits = _misfits(cfg, shape, info, plan, need, em, engine_gpu, gpu_memory, here)
    # A plan for declared GPUs, or for this machine's GPUs when the run would use them, that cannot fit is refused;
    # one for a remote cluster (ray_address) checked on a machine with other GPUs only warns.
    if misfits and (declared is not None or (gpu_memory and cfg.ray_address is None)):
        raise ValueError("; ".join(misfits))
    plan.warnings += misfits


def _misfits(cfg: RunConfig, shape: ModelShape, info: CheckpointInfo, plan: Plan, need: float, em: EngineMemory,
             engine_gpu: float | None, gpu_memory: float | None, here: str) -> list[str]:
    """What of the memory plan does not fit the GPUs (or the host, for a CPU trainer), each naming the key to change."""
    eng, tr = cfg.engine, cfg.train
    out = []
    if engine_gpu and not em.fits:
        fit = fewest_gpus(cfg, shape, info, engine_gpu).tensor_parallel
        out.append(f"engine.tensor_parallel_size: at {eng.tensor_parallel_size}, an engine GPU needs {gb(em.weights)} "
                   f"of weights and {gb(em.sequence)} for one max_model_len sequence, more than gpu_memory_utilization "
                   f"{eng.gpu_memory_utilization} of {here} ({gb(engine_gpu)}) holds; " + (
                       f"use {fit}" if fit else "no tensor_parallel_size up to 8 fits: lower engine.max_model_len or "
                                                "use bigger GPUs"))
    if tr.device != "cuda":
        if need > _host_memory():
            out.append(f"train.device: the trainer needs about {gb(need)} of host memory, this machine has "
                       f"{gb(_host_memory())}")
        return out
    if not gpu_memory:
        return out
    gpus = cfg.cluster.gpus if cfg.cluster.gpus is not None else plan.gpus_visible
    shared = tr.workers == 1 and eng.device == "cuda" and gpus <= plan.gpus_needed
    room = gpu_memory * (1 - eng.gpu_memory_utilization) if shared else gpu_memory
    if need <= room:
        return out
    where = (f"the {gb(room)} that engine.gpu_memory_utilization {eng.gpu_memory_utilization} leaves on GPU 0"
             if shared else f"the {gb(gpu_memory)} of {here}")
    layout = fewest_gpus(cfg, shape, info, gpu_memory)
    if layout.ranks is None:
        change = (f"lower train.micro_batch_size or engine.max_model_len ({layout.reason}, more than {here}; the "
                  "trainer recomputes no activations)")
    else:
        change = f"{layout.ranks} ranks fit (train.workers {layout.ranks})"
    out.append(f"train.workers: a trainer rank needs about {gb(need)}, more than {where}: {change}")
    return out

def _environments(cfg: RunConfig, envs: list[Environment], has_tools: dict[str, bool], plan: Plan) -> None:
    rows: Rows = []
    for env_cfg, env in zip(cfg.envs, envs):
        server = f"NeMo Gym server {env.server.module}" if env.server else "NeMo Gym server"
        where = f"attached: {env_cfg.url}" if env_cfg.url else f"launched: {server} on a free loopback port"
        if env_cfg.is_nemo_gym:
            where += f"; tasks from {env.config['data']}" + (f", held out from {env.config['eval_data']}"
                                                            if env.config["eval_data"] else "")
        counts = f"{len(env.tasks('train'))} train / {len(env.tasks('eval'))} eval tasks"
        rows.append((env.name, f"weight {env_cfg.weight:g}; {counts}{'; tools' if has_tools[env.name] else ''}; "
                               f"{where}"))
    gym_python = gym_python_of(cfg)
    if any(e.url is None for e in cfg.envs) and not gym_python.is_file():
        plan.warnings.append(f"env_servers.gym_python: no Python at '{gym_python}' here to launch the servers "
                             "(make demo creates .venv-gym)")
    plan.sections["environments"] = rows


def _sampling(cfg: RunConfig, has_tools: dict[str, bool], parser_rows: Rows, plan: Plan) -> None:
    sp, tool_sp = cfg.sampling, cfg.sampling.for_tools()
    tool_envs = ", ".join(n for n, t in has_tools.items() if t) or "no environment has tools"
    template = cfg.rollout.chat_template_kwargs
    plan.sections["sampling"] = [
        ("default", f"temperature {sp.temperature:g}, top_p {sp.top_p:g}, max_tokens {sp.max_tokens}"),
        ("tool calling", f"temperature {tool_sp.temperature:g}, top_p {tool_sp.top_p:g} ({tool_envs})"),
        ("eval", "greedy (temperature 0)"),
        ("chat template", json.dumps(template) if template else "defaults"),
        *parser_rows,
    ]


def make_plan(cfg: RunConfig) -> Plan:
    """Check ``cfg`` as a run would, without starting anything, and lay out where it would run."""
    plan = Plan()
    envs = list(open_environments(cfg).values())
    has_tools = {env.name: any(t.tools for s in ("train", "eval") for t in env.tasks(s)) for env in envs}
    model_path, info = _model(cfg, envs, plan)
    parser_rows = _names(cfg, model_path, info, any(has_tools.values()), plan)
    plan.sections["model"].append(("prompt lengths", _check_prompts(cfg, envs, model_path, info)))
    _engines(cfg, model_path, info, plan)
    _trainer(cfg, plan)
    _memory(cfg, model_path, info, plan)
    _environments(cfg, envs, has_tools, plan)
    _sampling(cfg, has_tools, parser_rows, plan)
    plan.sections["gpus"] = plan.sections.pop("gpus")  # shown last
    return plan


def render(plan: Plan, config: str, console: Console) -> None:
    console.print(f"[bold]dry run of {config}[/]: nothing was started, no weights were loaded", highlight=False,
                  soft_wrap=True)
    table = Table(show_header=False, box=None, padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for title, rows in plan.sections.items():
        table.add_row(f"[bold]{title}[/]", "")
        for key, value in rows:
            table.add_row(f"  [cyan]{key}[/]", value)
    console.print(table)
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if plan.warnings:
        console.print(f"plan valid, with {len(plan.warnings)} warning(s) above", highlight=False)
    else:
        console.print("plan valid; no warnings", highlight=False)
